"""The router: the OpenAI-compatible front door in front of the LLM replicas."""
