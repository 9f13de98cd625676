"""Names of the autoscaling signals the deployments report (record_autoscaling_stats)."""

LLM_METRICS = ("engine_waiting", "engine_running", "kv_cache_usage", "gpu_utilization")
ROUTER_QUEUED = "router_queued"


def router_queued_metric(pool: str) -> str:
    """The router's queued requests for one LLM pool."""
    return f"{ROUTER_QUEUED}:{pool}"
