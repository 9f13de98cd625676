"""The engine's own load figures, as vLLM's scheduler reports them each step.

``EngineLoadLogger`` is a vLLM stat-logger plugin (entry point group
``vllm.stat_logger_plugins`` in pyproject.toml): vLLM instantiates it inside
the replica process, next to ray.serve.llm's Prometheus logger, and hands it
every ``SchedulerStats``. It keeps the latest one per engine so the replica can
answer "how busy is my engine" without scraping Prometheus.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from vllm.v1.metrics.loggers import StatLoggerBase


@dataclass(frozen=True)
class EngineLoad:
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    updated_at: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


_latest: dict[int, EngineLoad] = {}


def current_load() -> EngineLoad:
    """Summed over this process's engines (data-parallel ranks), mean KV usage."""
    loads = list(_latest.values())
    if not loads:
        return EngineLoad()
    return EngineLoad(
        running=sum(l.running for l in loads),
        waiting=sum(l.waiting for l in loads),
        kv_cache_usage=sum(l.kv_cache_usage for l in loads) / len(loads),
        updated_at=max(l.updated_at for l in loads),
    )


class EngineLoadLogger(StatLoggerBase):
    def __init__(self, vllm_config, engine_index: int = 0):
        self._engine_index = engine_index

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        if scheduler_stats is None:
            return
        _latest[engine_idx] = EngineLoad(
            running=scheduler_stats.num_running_reqs,
            waiting=scheduler_stats.num_waiting_reqs,
            kv_cache_usage=scheduler_stats.kv_cache_usage,
            updated_at=time.time(),
        )

    def log_engine_initialized(self):
        pass
