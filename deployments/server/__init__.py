"""The LLM replica: ray.serve.llm's LLMServer, extended where the router and autoscaler need it."""
