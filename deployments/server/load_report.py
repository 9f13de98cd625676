"""What an LLM replica tells the router about its engine: one typed object across the handle call.

``ObservedLLMServer.engine_load()`` answers a ``ReplicaLoad``; the router's pool watch reads it every
poll (router/pool.py) and ``GET /health`` shows it per pool (``as_dict``). Both sides import this one
definition, so a renamed or added field is one edit that every reader sees. Free of Ray and vLLM
imports: the router and the tests load it without an engine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ReplicaLoad:
    """One replica's engine, summed over its data-parallel engines (KV usage: their mean).

    Times are ``time.time()`` seconds; ``gpu`` is the GPU group's latest NVML reading
    (``deployments/autoscaling/gpu.py`` ``GpuGroupReading.as_dict()``), None without GPUs.
    """

    running: int = 0                       # vLLM's running requests
    waiting: int = 0                       # vLLM's waiting requests
    kv_cache_usage: float = 0.0            # 0..1
    updated_at: float = 0.0                # the scheduler's last report
    tpot_s: float | None = None            # smoothed mean inter-token latency of recent steps, seconds
    tpot_at: float = 0.0                   # when a step last decoded tokens
    generated_tokens: int = 0              # output tokens since the engine started
    unfinished: int | None = None          # the frontend's requests not yet finished or aborted
    gpu: dict | None = None
    unloaded_tpot_s: float | None = None   # TPOT with one stream alone, measured at warm-up; None if not

    def as_dict(self) -> dict:
        return asdict(self)
