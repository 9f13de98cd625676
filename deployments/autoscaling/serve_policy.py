"""Ray Serve adapter: the decision core as an application-level autoscaling policy.

Configured in serve_config.yaml::

    autoscaling_policy:
      policy_function: deployments.autoscaling.serve_policy:QueueGpuPolicy
      policy_kwargs: {target_queue_per_replica: 4, ...}   # AutoscalingConfig

Application level, because the decision needs two deployments' signals: the
router's class queues and the LLM replicas' engine and GPU figures (both
reported through ``record_autoscaling_stats``). The LLM deployment's
``autoscaling_config`` min/max bound it; every other deployment keeps its
target. Each decision's reason is logged when it changes and exported as a
metric.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Tuple

from deployments.autoscaling.decision import (
    AutoscalingConfig, FleetSignals, HysteresisState, decide, mean_of_reported,
)
from deployments.config.names import (
    ENGINE_RUNNING, ENGINE_WAITING, GPU_UTILIZATION, KV_CACHE_USAGE, LLM_METRICS, ROUTER_QUEUED, is_llm_deployment,
    pool_of_deployment, router_queued_metric,
)
from deployments.observability import metrics

logger = logging.getLogger("ray.serve")


def _summed(ctx, name: str) -> float:
    return float(sum((ctx.aggregated_metrics or {}).get(name, {}).values()))


def _mean(ctx, name: str):
    return mean_of_reported((ctx.aggregated_metrics or {}).get(name, {}).values())


def signals_from(llm_ctx, router_queued: float) -> FleetSignals:
    return FleetSignals(
        # Replicas asked for, starting ones included: capacity already on its way.
        replicas=llm_ctx.target_num_replicas,
        starting=max(0, llm_ctx.target_num_replicas - llm_ctx.current_num_replicas),
        engine_waiting=_summed(llm_ctx, ENGINE_WAITING),
        engine_running=_summed(llm_ctx, ENGINE_RUNNING),
        router_queued=router_queued,
        kv_cache_usage=_mean(llm_ctx, KV_CACHE_USAGE),
        gpu_utilization=_mean(llm_ctx, GPU_UTILIZATION),
    )


class QueueGpuPolicy:
    def __init__(self, **policy_kwargs: Any):
        self._config = AutoscalingConfig.model_validate(policy_kwargs)
        self._last_reason: Dict[str, tuple] = {}

    def __call__(self, contexts: Dict[Any, Any]) -> Tuple[Dict[Any, int], Dict[Any, dict]]:
        is_llm = {dep: _is_llm(ctx) for dep, ctx in contexts.items()}
        routers = [ctx for dep, ctx in contexts.items() if not is_llm[dep]]
        decisions, states = {}, {}
        for dep, ctx in contexts.items():
            if not is_llm[dep]:
                decisions[dep], states[dep] = ctx.target_num_replicas, {}
                continue
            config = self._config.model_copy(update={
                "min_replicas": ctx.capacity_adjusted_min_replicas,
                "max_replicas": ctx.capacity_adjusted_max_replicas,
                "scale_to_zero": ctx.capacity_adjusted_min_replicas == 0,
            })
            decision, state = decide(signals_from(ctx, _queued_for(dep.name, routers)),
                                     HysteresisState.from_dict(ctx.policy_state),
                                     ctx.current_time, config)
            self._report(dep.name, decision)
            decisions[dep], states[dep] = decision.target, state.as_dict()
        return decisions, states

    def _report(self, deployment: str, decision) -> None:
        # Log steps, and holds only when their kind changes (the numbers in a
        # reason move every tick; the controller calls the policy ~10x a second).
        kind = (decision.signal, decision.current, decision.target, decision.pending)
        if decision.direction != "hold" or self._last_reason.get(deployment) != kind:
            logger.info("autoscaling %s: %d -> %d (%s): %s", deployment, decision.current, decision.target,
                        decision.signal, decision.reason)
        self._last_reason[deployment] = kind
        self._export(deployment, decision)

    def _export(self, deployment: str, decision) -> None:
        # Target and current replicas, and the signal behind the decision as a one-hot gauge
        # (deployments/observability/metrics.py); best effort, a decision never fails on them.
        metrics.autoscaling_decision(deployment, pool_of_deployment(deployment), current=decision.current,
                                     target=decision.target, signal=decision.signal)


def _queued_for(deployment_name: str, routers) -> float:
    """Requests the router holds for this LLM deployment's pool."""
    pool = pool_of_deployment(deployment_name)
    metric = router_queued_metric(pool) if pool else ROUTER_QUEUED
    return sum(_summed(ctx, metric) for ctx in routers)


def _is_llm(ctx) -> bool:
    return any(name in (ctx.aggregated_metrics or {}) for name in LLM_METRICS) or is_llm_deployment(ctx.deployment_name)
