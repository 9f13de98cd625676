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
    """How long a request of one class holds its slot (slot taken -> last token), smoothed, as two parts:
    the time to its first token (prefill: the prompt's length, not ``max_tokens``) and the time per
    requested output token after it.

    Service time, not completion rate: a quiet pool finishes few requests per
    second because few arrive, not because it is slow, so a rate measured while
    idle would refuse the next burst. Little's law turns it into a rate: with
    ``slots`` running, one frees every ``mean / slots`` seconds.

    Two parts, because scaling the whole by ``max_tokens`` scaled the prefill too: after a low-class
    2k-token prompt asking for a few tokens (20 s, nearly all prefill), a 200-token low request was
    forecast at hundreds of seconds and a burst of them got ``Retry-After`` of 3,569-6,949 s for a backlog that
    cleared in 70 s.
    """

    def __init__(self) -> None:
        self.mean_s: float | None = None         # whole service time, seconds (shown in /health)
        self.mean_tokens: float | None = None    # max_tokens of the requests measured
        self.first_s: float | None = None        # slot taken -> first token, seconds
        self.per_token_s: float | None = None    # seconds per requested output token after the first

    def record(self, service_s: float, max_tokens: int, first_token_s: float | None = None) -> None:
        """One request served: ``service_s`` seconds in its slot for up to ``max_tokens`` tokens;
        ``first_token_s`` of them to its first token, when known (a stream; None for a whole answer,
        whose prefill is then taken to be the class's mean)."""
        fixed = first_token_s if first_token_s is not None else min(self.first_s or 0.0, service_s)
        per_token = max(0.0, service_s - fixed) / max(1, max_tokens)
        self.mean_s = _smoothed(self.mean_s, service_s)
        self.mean_tokens = _smoothed(self.mean_tokens, float(max_tokens))
        self.per_token_s = _smoothed(self.per_token_s, per_token)
        if first_token_s is not None:
            self.first_s = _smoothed(self.first_s, first_token_s)

    def estimate_s(self, max_tokens: int) -> float | None:
        """One request's own service time, seconds: the class's time to a first token plus its
        ``max_tokens`` at the measured time per token; None before any request of the class finished."""
        if self.per_token_s is None:
            return None
        return (self.first_s or 0.0) + self.per_token_s * max_tokens


def _smoothed(mean: float | None, value: float) -> float:
    return value if mean is None else mean + _WEIGHT * (value - mean)


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
