"""The names the app's parts share: one contract, imported by whoever sends and whoever reads.

- the LLM deployments' name prefix (``app.py`` names them, the autoscaling policy and the tests read
  a pool back from a deployment's name);
- the priority classes, most urgent first (their index is vLLM's request ``priority``), and the
  default prompt-token thresholds between them (the router's settings, the simulator's traces);
- the custom autoscaling metrics the LLM replicas and the router report
  (``record_autoscaling_stats``) and the application's autoscaling policy reads.

A rename is one edit here; tests/test_names.py checks that every sender and reader uses these.
Kept free of heavy imports: the Serve controller loads it with the autoscaling policy. The app's
Prometheus metrics are named in ``deployments/observability/metrics.py``.
"""

from __future__ import annotations

from typing import Optional

# --- deployments -------------------------------------------------------------------------------

DEPLOYMENT_PREFIX = "ObservedLLMServer:"
ROUTER_DEPLOYMENT = "Router"
# One replica beside the router replicas: the tenants' quota they all lease from (tenancy/ledger.py).
TENANT_LEDGER_DEPLOYMENT = "TenantLedger"


def deployment_name_prefix(pool: str) -> str:
    return f"{DEPLOYMENT_PREFIX}{pool}:"


def pool_of_deployment(deployment_name: str) -> Optional[str]:
    """The pool an LLM deployment serves, from the name the app gives it."""
    if not deployment_name.startswith(DEPLOYMENT_PREFIX):
        return None
    rest = deployment_name[len(DEPLOYMENT_PREFIX):]
    return rest.split(":", 1)[0] if ":" in rest else None


def is_llm_deployment(deployment_name: str) -> bool:
    return deployment_name.startswith(DEPLOYMENT_PREFIX)


# --- priority classes --------------------------------------------------------------------------

HIGH, MEDIUM, LOW = PRIORITY_CLASSES = ("high", "medium", "low")
# Defaults of router.classification: high < 128 prompt tokens <= medium < 2048 <= low.
HIGH_BELOW_TOKENS = 128
MEDIUM_BELOW_TOKENS = 2048

# --- autoscaling metrics (Serve's record_autoscaling_stats -> the policy) -----------------------

ENGINE_WAITING = "engine_waiting"  # per LLM replica: vLLM's waiting requests
ENGINE_RUNNING = "engine_running"  # per LLM replica: vLLM's running requests
KV_CACHE_USAGE = "kv_cache_usage"  # per LLM replica: 0..1
GPU_UTILIZATION = "gpu_utilization"  # per LLM replica: its GPU group, 0..1; absent without GPUs
LLM_METRICS = (ENGINE_WAITING, ENGINE_RUNNING, KV_CACHE_USAGE, GPU_UTILIZATION)
ROUTER_QUEUED = "router_queued"  # per router replica: requests queued, all pools


def router_queued_metric(pool: str) -> str:
    """The router's queued requests for one LLM pool."""
    return f"{ROUTER_QUEUED}:{pool}"
