"""Decide whether requests may reach the replicas at all.

Closed: everything passes. After ``failure_threshold`` consecutive failures it
opens: callers get 503 with Retry-After at once instead of piling onto a dead
deployment. After ``open_s`` it is half-open: one probe passes; its success
closes the circuit, its failure opens it again.
"""

from __future__ import annotations

import math
import time
from enum import Enum
from typing import Callable

from deployments.router.settings import CircuitSettings


class CircuitState(str, Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(self, settings: CircuitSettings, clock: Callable[[], float] = time.monotonic):
        self._settings = settings
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probe_in_flight = False

    @property
    def state(self) -> CircuitState:
        if self._opened_at is None:
            return CircuitState.CLOSED
        if self._clock() - self._opened_at < self._settings.open_s:
            return CircuitState.OPEN
        return CircuitState.HALF_OPEN

    def try_pass(self) -> int | None:
        """None if the request may go on; else the Retry-After seconds for a 503."""
        state = self.state
        if state is CircuitState.CLOSED:
            return None
        if state is CircuitState.HALF_OPEN and not self._probe_in_flight:
            self._probe_in_flight = True
            return None
        remaining = self._settings.open_s - (self._clock() - self._opened_at)
        return max(1, math.ceil(remaining))

    def record_success(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._probe_in_flight = False

    def record_failure(self) -> None:
        self._failures += 1
        if self._probe_in_flight or self._failures >= self._settings.failure_threshold:
            self._opened_at = self._clock()
        self._probe_in_flight = False

    def abandon(self) -> None:
        """A passed request never reached a replica: free the probe turn, change nothing else."""
        self._probe_in_flight = False
