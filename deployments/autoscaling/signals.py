"""Kept for old imports: the autoscaling metrics' names live in deployments/config/names.py."""

from deployments.config.names import LLM_METRICS, ROUTER_QUEUED, router_queued_metric  # noqa: F401
