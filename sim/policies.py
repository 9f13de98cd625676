"""The policies the simulator compares, each a function of the fleet's signals over time."""

from __future__ import annotations

import math
from typing import Protocol

from deployments.autoscaling.decision import AutoscalingConfig, FleetSignals, HysteresisState, decide


class Policy(Protocol):
    name: str

    def __call__(self, signals: FleetSignals, now: float) -> int: ...


class OursPolicy:
    """The production decision core (deployments/autoscaling/decision.py)."""

    name = "ours"

    def __init__(self, config: AutoscalingConfig):
        self.config, self.state, self.reasons = config, HysteresisState(), []

    def __call__(self, signals: FleetSignals, now: float) -> int:
        decision, self.state = decide(signals, self.state, now, self.config)
        if decision.direction != "hold":
            self.reasons.append((now, decision.current, decision.target, decision.reason))
        return decision.target


class RayDefaultPolicy:
    """Ray Serve's default request-based policy: ceil(ongoing / target_ongoing_requests),
    applied after the decision has held for upscale_delay_s / downscale_delay_s
    (Serve's defaults: 30 s and 600 s)."""

    name = "ray-default"

    def __init__(self, min_replicas: int, max_replicas: int, target_ongoing_requests: float = 16,
                 upscale_delay_s: float = 30.0, downscale_delay_s: float = 600.0):
        self.min, self.max, self.target = min_replicas, max_replicas, target_ongoing_requests
        self.up_delay, self.down_delay = upscale_delay_s, downscale_delay_s
        self.up_since = self.down_since = None

    def __call__(self, signals: FleetSignals, now: float) -> int:
        ongoing = signals.engine_running + signals.queued
        desired = min(max(math.ceil(ongoing / self.target), self.min), self.max)
        n = signals.replicas
        if desired > n:
            self.down_since, self.up_since = None, self.up_since if self.up_since is not None else now
            return desired if now - self.up_since >= self.up_delay else n
        if desired < n:
            self.up_since, self.down_since = None, self.down_since if self.down_since is not None else now
            return desired if now - self.down_since >= self.down_delay else n
        self.up_since = self.down_since = None
        return n


class StaticPolicy:
    """Provisioned for the peak, all the time."""

    name = "static-peak"

    def __init__(self, replicas: int):
        self.replicas = replicas

    def __call__(self, signals: FleetSignals, now: float) -> int:
        return self.replicas
