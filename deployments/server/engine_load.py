"""The engine's own load figures, as vLLM's scheduler reports them each step.

``EngineLoadLogger`` is a vLLM stat-logger plugin (entry point group
``vllm.stat_logger_plugins`` in pyproject.toml): vLLM instantiates it inside
the replica process, next to vLLM's own loggers, and hands it every
``SchedulerStats`` and ``IterationStats``. It keeps the latest load per
engine, a smoothed time per output token and a count of generated tokens, so
the replica can answer "how busy and how fast is my engine" without scraping
Prometheus (the router's adaptive window feeds on the TPOT).

It also gathers the few engine series the dashboards show (``EngineSamples``:
token counts, prefix-cache lookups, engine-side TTFT per request, one
inter-token latency per decoding step), which the replica exports through Ray
once a second (``llm_server.py``). They replace ray.serve.llm's Ray stat
logger, which every profile turns off (``log_engine_metrics: false``): that
logger records some fifty series, with one histogram observation per
generated token, on the replica's busiest core; turning it off cut the
replica's CPU per output token at 256 streams on an H200 by 25%
(docs/streaming.md, passes 6 and 7). Here the work per step is a few
additions, and an export's cost grows with steps and requests, not tokens.
(vLLM still adds its in-process ``PrometheusStatLogger`` whenever no custom
Prometheus logger is given; nothing scrapes it.)
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from vllm.v1.metrics.loggers import StatLoggerBase

from deployments.server.load_report import ReplicaLoad


_latest: dict[int, ReplicaLoad] = {}
_tpot: dict[int, tuple[float, float]] = {}   # engine -> (smoothed TPOT s, when)
_generated: dict[int, int] = {}

# Each decoding step's mean inter-token latency, newest last, and how many were ever recorded: the
# replica's warm-up reads the steps of its measuring request from here (``step_tpots_since``).
_step_tpots: deque[float] = deque(maxlen=512)
_steps_recorded = 0

# Weight of the newest step in the smoothed TPOT: a handful of steps (tens of
# ms on a GPU) make up the figure, so it follows load changes within a second.
_TPOT_WEIGHT = 0.2


# What the replica has not exported yet (``take_samples``). Bounded: a stalled export loses the
# oldest observations, never memory.
_SAMPLES_KEPT = 4096


@dataclass
class EngineSamples:
    """Engine figures gathered since the last ``take_samples()``, summed over this process's engines.

    Token and lookup counts are deltas; ``ttft_s`` holds one engine-side time to first token per
    request that got its first token (seconds, from the engine's arrival stamp); ``step_itl_s`` one
    value per decoding step: the mean inter-token latency of the tokens it produced (seconds).
    """

    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_cache_queries: int = 0   # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0      # of those, tokens found cached
    ttft_s: deque = field(default_factory=lambda: deque(maxlen=_SAMPLES_KEPT))
    step_itl_s: deque = field(default_factory=lambda: deque(maxlen=_SAMPLES_KEPT))


_samples = EngineSamples()
_generated_at_take = 0  # sum(_generated) at the previous take_samples(): its generated tokens are the difference


def take_samples() -> EngineSamples:
    """What was gathered since the previous call; starts a new gathering."""
    global _samples, _generated_at_take
    taken, _samples = _samples, EngineSamples()
    generated = sum(_generated.values())
    taken.generation_tokens, _generated_at_take = generated - _generated_at_take, generated
    return taken


def current_load() -> ReplicaLoad:
    """Summed over this process's engines (data-parallel ranks), mean KV usage."""
    loads = list(_latest.values())
    tpots = list(_tpot.values())
    if not loads:
        return ReplicaLoad(generated_tokens=sum(_generated.values()))
    return ReplicaLoad(
        running=sum(l.running for l in loads),
        waiting=sum(l.waiting for l in loads),
        kv_cache_usage=sum(l.kv_cache_usage for l in loads) / len(loads),
        updated_at=max(l.updated_at for l in loads),
        tpot_s=max(t for t, _ in tpots) if tpots else None,
        tpot_at=max(at for _, at in tpots) if tpots else 0.0,
        generated_tokens=sum(_generated.values()),
    )


def steps_recorded() -> int:
    """How many decoding steps were recorded so far (a mark for ``step_tpots_since``)."""
    return _steps_recorded


def step_tpots_since(mark: int) -> list[float]:
    """Mean inter-token latency, seconds, of each decoding step recorded after ``mark`` (the last 512 at most)."""
    count = min(_steps_recorded - mark, len(_step_tpots))
    return list(_step_tpots)[len(_step_tpots) - count:] if count > 0 else []


def _count_prefix_cache(scheduler_stats) -> None:
    # Per step (vLLM resets these each step); absent in a vLLM without prefix-cache stats.
    stats = getattr(scheduler_stats, "prefix_cache_stats", None)
    if stats is not None:
        _samples.prefix_cache_queries += int(getattr(stats, "queries", 0) or 0)
        _samples.prefix_cache_hits += int(getattr(stats, "hits", 0) or 0)


def _step_inter_token_latencies(iteration_stats) -> list[float]:
    # vLLM renamed the field; both names are read so the GPU stack (vLLM 0.26) works too.
    for name in ("inter_token_latencies_iter", "time_per_output_tokens_iter"):
        values = getattr(iteration_stats, name, None)
        if values is not None:
            return values
    return []


class EngineLoadLogger(StatLoggerBase):
    def __init__(self, vllm_config, engine_index: int = 0):
        self._engine_index = engine_index

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        if iteration_stats is not None:
            self._record_iteration(iteration_stats, engine_idx)
        if scheduler_stats is None:
            return
        _count_prefix_cache(scheduler_stats)
        _latest[engine_idx] = ReplicaLoad(
            running=scheduler_stats.num_running_reqs,
            # As vLLM's own waiting gauge: requests skipped this step (waiting on a grammar, a LoRA
            # slot or their own earlier output) wait too.
            waiting=scheduler_stats.num_waiting_reqs + int(getattr(scheduler_stats, "num_skipped_waiting_reqs", 0) or 0),
            kv_cache_usage=scheduler_stats.kv_cache_usage,
            updated_at=time.time(),
        )

    @staticmethod
    def _record_iteration(iteration_stats, engine_idx: int) -> None:
        generated = int(iteration_stats.num_generation_tokens)
        _generated[engine_idx] = _generated.get(engine_idx, 0) + generated  # take_samples() derives its delta
        _samples.prompt_tokens += int(getattr(iteration_stats, "num_prompt_tokens", 0) or 0)
        _samples.ttft_s.extend(getattr(iteration_stats, "time_to_first_tokens_iter", None) or ())
        latencies = _step_inter_token_latencies(iteration_stats)
        if not latencies:
            return
        global _steps_recorded
        step = sum(latencies) / len(latencies)
        _samples.step_itl_s.append(step)
        _step_tpots.append(step)
        _steps_recorded += 1
        previous = _tpot.get(engine_idx)
        smoothed = step if previous is None else previous[0] + _TPOT_WEIGHT * (step - previous[0])
        _tpot[engine_idx] = (smoothed, time.time())

    def log_engine_initialized(self):
        pass
