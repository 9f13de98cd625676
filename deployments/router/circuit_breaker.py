"""Decide whether requests may reach a pool's replicas at all.

Closed: everything passes. After ``failure_threshold`` consecutive *faults*
(replica errors, engine death; never overload: a 429 or a deadline expiry
says the service is busy, not broken), or at once on a stall (``trip``), it opens: callers get 503 with
Retry-After at once instead of piling onto a dead deployment. After
``open_s`` it is half-open and the router sends one probe of its own (a
one-token request, router/pool.py), so a pool recovers without client
traffic: the probe's success closes the circuit, its failure opens it again.
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
        self._probing = False
        self.last_fault: str | None = None  # why the latest fault counted, for /health

    def apply(self, settings: CircuitSettings) -> None:
        """New thresholds (a reconfigure); the faults counted so far still count."""
        self._settings = settings

    @property
    def state(self) -> CircuitState:
        if self._opened_at is None:
            return CircuitState.CLOSED
        if self._clock() - self._opened_at < self._settings.open_s:
            return CircuitState.OPEN
        return CircuitState.HALF_OPEN

    def try_pass(self) -> int | None:
        """None if a client request may go on; else the Retry-After seconds for a 503."""
        if self.state is CircuitState.CLOSED:
            return None
        remaining = self._settings.open_s - (self._clock() - self._opened_at)
        return max(1, math.ceil(remaining))

    def probe_due(self) -> bool:
        """Half-open and no probe out: the router should send its one-token probe now."""
        return self.state is CircuitState.HALF_OPEN and not self._probing

    def begin_probe(self) -> None:
        self._probing = True

    def record_success(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._probing = False

    def record_failure(self, reason: str = "unspecified fault") -> None:
        """A fault: a replica error, a dead engine, a stall, or a failed probe. ``reason`` is shown by /health."""
        self.last_fault = reason
        self._failures += 1
        if self._probing or self._failures >= self._settings.failure_threshold:
            self._opened_at = self._clock()
        self._probing = False

    def trip(self, reason: str) -> None:
        """Open at once, whatever the count: a stall (an engine that was streaming went silent for
        ``stall_s``) is a hung engine, not a transient error; waiting for ``failure_threshold`` of them
        would need that many streams running, and new requests would hang meanwhile. The half-open
        probe tells when it answers again."""
        self.last_fault = reason
        self._failures += 1
        self._opened_at = self._clock()
        self._probing = False

    def describe(self) -> dict:
        return {"state": self.state.value, "consecutive_faults": self._failures, "last_fault": self.last_fault}
