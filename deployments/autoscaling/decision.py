"""Decide how many LLM replicas the fleet should have, and say why.

Pure: ``decide(signals, state, now, config)`` returns a ``ScalingDecision``
and the next ``HysteresisState``. The same function drives Ray Serve (through
``serve_policy.py``) and the trace-replay simulator, so what SREs tune in the
simulator is what runs.

Rules, in order:
1. Queue depth per replica above target: scale up to what clears it.
2. KV cache saturated, or GPU busy while requests wait: scale up by one.
3. Queues empty, no replica still starting (for at most ``max_start_hold_s``:
   a start that keeps failing must not pin the fleet), and the load (KV usage,
   running sequences) spread over one replica fewer stays low: scale down by one.
4. Otherwise hold.
An up (down) intent must persist for ``upscale_delay_s`` (``downscale_delay_s``)
before it is applied; steps are bounded; min/max bound the result; zero only
when allowed and idle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterable, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator


class AutoscalingConfig(BaseModel):
    """Every knob (``policy_kwargs`` in serve_config.yaml)."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_queue_per_replica: float = Field(4.0, gt=0, description="waiting requests per replica before scaling up")
    kv_cache_high: float = Field(0.85, gt=0, le=1, description="mean KV-cache usage that counts as saturated")
    gpu_util_high: float = Field(0.90, gt=0, le=1, description="mean GPU utilisation that counts as saturated")
    kv_cache_low: float = Field(
        0.30, ge=0, le=1, description="scale down only if KV usage spread over one replica fewer stays below this")
    running_low_per_replica: float = Field(
        8.0, gt=0, description="scale down only if running sequences spread over one replica fewer stay below this")
    waiting_threshold: float = Field(
        1.0, gt=0, description="average waiting requests that count as 'requests are waiting' (below: queues empty)")
    upscale_delay_s: float = Field(15.0, ge=0, description="an up intent must last this long")
    downscale_delay_s: float = Field(120.0, ge=0, description="a down intent must last this long")
    max_start_hold_s: float = Field(
        600.0, gt=0, description="a replica starting this long no longer holds the fleet from scaling down "
        "(measured cold starts: CPU 30-130 s, H200 with a 7B model 180-240 s, docs/gpu.md; a start that "
        "fails and is retried by Serve stays 'starting', seen on the two-GPU lease)")
    max_step_up: int = Field(2, ge=1)
    max_step_down: int = Field(1, ge=1)
    scale_to_zero: bool = Field(False, description="allow 0 replicas when idle (needs min_replicas 0)")

    @model_validator(mode="after")
    def _bounds(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        if self.scale_to_zero and self.min_replicas != 0:
            raise ValueError("scale_to_zero needs min_replicas: 0")
        if self.kv_cache_low >= self.kv_cache_high:
            raise ValueError("kv_cache_low must be below kv_cache_high (that gap is the hysteresis)")
        return self

    @property
    def floor(self) -> int:
        """The fewest replicas allowed; 0 only with scale_to_zero."""
        return 0 if self.scale_to_zero else max(1, self.min_replicas)


@dataclass(frozen=True)
class FleetSignals:
    """What the fleet looks like now; None = not measured (e.g. no GPU)."""

    replicas: int
    engine_waiting: float = 0.0  # summed over replicas
    engine_running: float = 0.0
    router_queued: float = 0.0  # requests waiting in the router's class queues
    kv_cache_usage: Optional[float] = None  # mean over replicas, 0..1
    gpu_utilization: Optional[float] = None  # mean over replicas' GPU groups, 0..1
    starting: int = 0  # replicas asked for but not running yet (included in `replicas`)

    @property
    def queued(self) -> float:
        return self.engine_waiting + self.router_queued


@dataclass(frozen=True)
class HysteresisState:
    up_since: Optional[float] = None
    down_since: Optional[float] = None
    starting_since: Optional[float] = None  # since when some replica has been starting, without a break

    def as_dict(self) -> dict:
        return {"up_since": self.up_since, "down_since": self.down_since, "starting_since": self.starting_since}

    @classmethod
    def from_dict(cls, data: dict | None) -> "HysteresisState":
        data = data or {}
        return cls(data.get("up_since"), data.get("down_since"), data.get("starting_since"))


@dataclass(frozen=True)
class ScalingDecision:
    current: int
    target: int
    reason: str
    signal: str  # which signal drove it: queue, kv_cache, gpu, idle, bounds, hold
    pending: str | None = None  # "up" / "down" while a step waits out its delay

    @property
    def direction(self) -> str:
        return "up" if self.target > self.current else "down" if self.target < self.current else "hold"


def mean_of_reported(values: Iterable[Optional[float]]) -> Optional[float]:
    """Mean over the replicas that report a value; None when none does."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _scaled(value: Optional[float], factor: float) -> Optional[float]:
    return None if value is None else value * factor


def _fits_in_fewer(s: FleetSignals, c: AutoscalingConfig) -> bool:
    """Would one replica fewer carry today's load below the low thresholds?

    Judged on occupancy that adds up across replicas: KV-cache usage and
    running sequences. NVML GPU utilisation is the share of time a kernel
    runs; decode keeps it near 1 at any batch size and it does not add up, so
    it says "saturated" (with waiting requests) but cannot say "one fewer
    would do". Zero replicas needs true idleness.
    """
    if s.replicas <= 1:
        return s.engine_running == 0
    grow = s.replicas / (s.replicas - 1)
    kv_ok = s.kv_cache_usage is None or s.kv_cache_usage * grow < c.kv_cache_low
    running_ok = s.engine_running / (s.replicas - 1) < c.running_low_per_replica
    return kv_ok and running_ok


def wanted_replicas(s: FleetSignals, c: AutoscalingConfig, start_holds: bool = True) -> tuple[int, str, str]:
    """The replica count the signals ask for right now, before delays and bounds. ``start_holds``: may
    replicas still starting hold the fleet (False once they have been starting ``max_start_hold_s``)."""
    n = s.replicas
    if n == 0:
        if s.queued > 0 or s.engine_running > 0:
            return 1, f"{s.queued:.0f} requests waiting with no replicas", "queue"
        return 0, "no replicas and no requests", "idle"
    per_replica = s.queued / n
    if per_replica > c.target_queue_per_replica:
        want = math.ceil(s.queued / c.target_queue_per_replica)
        return want, f"queue {per_replica:.1f}/replica > target {c.target_queue_per_replica:g}", "queue"
    if s.kv_cache_usage is not None and s.kv_cache_usage > c.kv_cache_high:
        return n + 1, f"KV cache {_fmt(s.kv_cache_usage)} > {c.kv_cache_high:g}", "kv_cache"
    # A decoding GPU reads near 100% on NVML at any batch size: busy alone is
    # not saturated; busy with requests waiting is.
    if s.gpu_utilization is not None and s.gpu_utilization > c.gpu_util_high and s.queued >= c.waiting_threshold:
        return n + 1, (f"GPU utilisation {_fmt(s.gpu_utilization)} > {c.gpu_util_high:g} "
                       f"with {s.queued:.0f} waiting"), "gpu"
    if s.starting > 0 and start_holds and s.queued < c.waiting_threshold:
        # Capacity is on its way; today's load says nothing about tomorrow's fleet.
        return n, f"holding while {s.starting} replica(s) start", "hold"
    if s.queued < c.waiting_threshold and _fits_in_fewer(s, c):
        if n == 1:
            return 0, "idle: nothing queued or running", "idle"
        grow = n / (n - 1)
        return n - 1, (f"idle: queues empty; on {n - 1} replicas KV would be {_fmt(_scaled(s.kv_cache_usage, grow))} "
                       f"< {c.kv_cache_low:g}, running {s.engine_running * grow / n:.1f}/replica "
                       f"< {c.running_low_per_replica:g}"), "idle"
    return n, (f"steady: queue {per_replica:.1f}/replica, KV {_fmt(s.kv_cache_usage)}, "
               f"GPU {_fmt(s.gpu_utilization)}"), "hold"


def _clamp(value: int, low: int, high: int) -> int:
    return min(max(value, low), high)


def decide(
    signals: FleetSignals, state: HysteresisState, now: float, config: AutoscalingConfig
) -> tuple[ScalingDecision, HysteresisState]:
    starting_since = None  # since when some replica has been starting, without a break
    if signals.starting:
        starting_since = now if state.starting_since is None else state.starting_since
    decision, next_state = _decide(signals, state, now, config,
                                   start_holds=starting_since is None or now - starting_since < config.max_start_hold_s)
    return decision, replace(next_state, starting_since=starting_since)


def _decide(signals: FleetSignals, state: HysteresisState, now: float, config: AutoscalingConfig,
            start_holds: bool) -> tuple[ScalingDecision, HysteresisState]:
    n, low, high = signals.replicas, config.floor, config.max_replicas
    if not low <= n <= high:  # e.g. bounds changed in the config: fix at once
        return ScalingDecision(n, _clamp(n, low, high), f"{n} replicas outside [{low}, {high}]", "bounds"), HysteresisState()
    want, reason, signal = wanted_replicas(signals, config, start_holds)
    bounded = _clamp(want, low, high)
    if bounded == n:
        if want != n:
            return ScalingDecision(n, n, f"{reason}, but already at the {'maximum' if want > n else 'minimum'}", "bounds"), HysteresisState()
        return ScalingDecision(n, n, reason, "hold"), HysteresisState()
    up = bounded > n
    since = (state.up_since if up else state.down_since)
    since = now if since is None else since
    delay = config.upscale_delay_s if up else config.downscale_delay_s
    if now - since < delay:
        pending = HysteresisState(up_since=since) if up else HysteresisState(down_since=since)
        wait = f"{'up' if up else 'down'} in {delay - (now - since):.0f}s if it lasts"
        return ScalingDecision(n, n, f"{reason}; {wait}", "hold", pending="up" if up else "down"), pending
    target = min(bounded, n + config.max_step_up) if up else max(bounded, n - config.max_step_down)
    return ScalingDecision(n, target, reason, signal), HysteresisState()
