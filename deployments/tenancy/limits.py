"""Requests and tokens per minute as token buckets, and the headers that report them.

A tier's ``requests_per_minute`` is a bucket that holds at most that many
requests and refills at that rate (so a tenant idle for a minute may burst a
minute's worth, then runs at the rate). Tokens the same way. The headers are
OpenAI's, so its clients' retry logic works unchanged:
``x-ratelimit-limit-requests``, ``x-ratelimit-remaining-requests``,
``x-ratelimit-reset-requests`` (time until the bucket is full again, written
like OpenAI's ``6m0s`` / ``1s`` / ``20ms``) and the ``-tokens`` trio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

REQUESTS, TOKENS = "requests", "tokens"
DIMENSIONS = (REQUESTS, TOKENS)


class TokenBucket:
    """``capacity`` units, refilled at ``capacity / 60`` per second. Times are the caller's clock, seconds."""

    def __init__(self, per_minute: int, now: float):
        self.capacity = float(per_minute)
        self.level = float(per_minute)
        self._at = now

    @property
    def rate_per_s(self) -> float:
        return self.capacity / 60.0

    def resize(self, per_minute: int, now: float) -> None:
        """A tier changed in the tenants file: keep what is used, change the size."""
        self._refill(now)
        used = self.capacity - self.level
        self.capacity = float(per_minute)
        self.level = max(0.0, self.capacity - used)

    def _refill(self, now: float) -> None:
        if now > self._at:
            self.level = min(self.capacity, self.level + (now - self._at) * self.rate_per_s)
        self._at = max(self._at, now)

    def take(self, amount: float, now: float) -> float:
        """Take up to ``amount`` units; returns how many were taken (0 when the bucket holds less than 1)."""
        self._refill(now)
        taken = min(amount, math.floor(self.level))
        self.level -= taken
        return max(0.0, taken)

    def take_exactly(self, amount: float, now: float) -> bool:
        self._refill(now)
        if self.level >= amount:
            self.level -= amount
            return True
        return False

    def give_back(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level = min(self.capacity, self.level + amount)

    def remaining(self, now: float) -> float:
        self._refill(now)
        return self.level

    def seconds_until(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` units are there (inf when more than the capacity)."""
        self._refill(now)
        if amount > self.capacity:
            return math.inf
        return max(0.0, (amount - self.level) / self.rate_per_s)

    def seconds_to_full(self, now: float) -> float:
        return self.seconds_until(self.capacity, now)


def duration(seconds: float) -> str:
    """OpenAI's duration format: ``1m30s``, ``6s``, ``250ms``."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    seconds = math.ceil(seconds)
    minutes, secs = divmod(seconds, 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


@dataclass(frozen=True)
class Allowance:
    """One dimension's state as a request sees it: the tier's limit, what is left, when the bucket is full."""

    limit: int
    remaining: float
    reset_s: float

    def headers(self, dimension: str) -> dict[str, str]:
        return {f"x-ratelimit-limit-{dimension}": str(self.limit),
                f"x-ratelimit-remaining-{dimension}": str(max(0, int(self.remaining))),
                f"x-ratelimit-reset-{dimension}": duration(self.reset_s)}
