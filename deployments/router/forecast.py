"""When would a new request start? The router's answer, before it admits one.

Admission refuses a request at the door (429, with that prediction as an
honest Retry-After) when it could not start within its class's start deadline,
instead of letting it queue, burn engine time and expire. The prediction uses
what the router measures: how long a request of the class holds its slot
(``ServiceMeter``; before the first completion, its ``max_tokens`` at the
class's per-token SLO), how many slots run, and how many requests must start
before this one.

Pure: no Ray, no asyncio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Weight of the newest completion in the mean service time: about the last ten
# completions make the figure, so it follows a change of load quickly.
_WEIGHT = 0.2


class ServiceMeter:
    """Mean seconds a request of one class holds its slot (slot taken -> last token), smoothed.

    Service time, not completion rate: a quiet pool finishes few requests per
    second because few arrive, not because it is slow, so a rate measured while
    idle would refuse the next burst. Little's law turns it into a rate: with
    ``slots`` running, one frees every ``mean / slots`` seconds.
    """

    def __init__(self) -> None:
        self.mean_s: float | None = None
        self.mean_tokens: float | None = None

    def record(self, service_s: float, max_tokens: int) -> None:
        if self.mean_s is None:
            self.mean_s, self.mean_tokens = service_s, float(max_tokens)
            return
        self.mean_s += _WEIGHT * (service_s - self.mean_s)
        self.mean_tokens += _WEIGHT * (max_tokens - self.mean_tokens)

    def estimate_s(self, max_tokens: int) -> float | None:
        """One request's own service time: the mean, scaled by its max_tokens against the mean's."""
        if self.mean_s is None:
            return None
        return self.mean_s * max_tokens / max(1.0, self.mean_tokens)


@dataclass(frozen=True)
class WaitForecast:
    """seconds: predicted wait for a slot (0: starts now)."""

    seconds: float

    @property
    def retry_after_s(self) -> int:
        return max(1, math.ceil(self.seconds))


def forecast_wait(ahead: int, slots: int, service_s: float, remaining_s: list[float]) -> WaitForecast:
    """Wait of a request with ``ahead`` requests to start before it.

    ``slots`` requests may run at once; ``remaining_s`` holds, for each one running now, the seconds
    it is expected to go on (its expected service time less what it has run). The slots not running
    are free now; the running ones free as their remaining times run out, and every slot then frees
    again each ``service_s``. A burst that started together therefore frees together, which a mean
    rate (Little's law) would not see.
    """
    running = sorted(remaining_s)[:slots]
    needed = ahead + 1 - max(0, slots - len(running))
    if needed <= 0:
        return WaitForecast(0.0)
    if not running:
        return WaitForecast(needed * service_s / max(1, slots))
    rounds, index = divmod(needed - 1, len(running))
    return WaitForecast(running[index] + rounds * service_s)


def admits(forecast: WaitForecast, start_deadline_s: float, admit_within: float) -> bool:
    """Admit when the predicted wait fits the start deadline with margin."""
    return forecast.seconds <= admit_within * start_deadline_s
