"""LLM serving on Ray Serve: router, vLLM replicas, autoscaling, observability."""
