"""How many requests a pool may run at once: an adaptive concurrency limit.

A fixed window cannot fit both a one-core CPU engine (a few streams before
every stream slows below the SLO) and an H200 (hundreds). So the window is
measured, in the spirit of TCP congestion control and Netflix's
concurrency-limits: it grows multiplicatively while the engine's time per
output token (TPOT) is comfortably under the SLO *and* requests wait for the
window (evidence that more concurrency is wanted and affordable), and shrinks
multiplicatively once TPOT is over the SLO on two looks in a row (or clearly
over it on one) or the KV cache is nearly full (the engine would start
preempting). Between the two it holds. Like TCP
it starts in slow start (doubling per measurement) until its first cut, so a
GPU reaches hundreds within seconds of the first burst. In slow start each
step grows by the measured headroom (``grow_below`` x SLO / TPOT, at least x2,
at most ``max_increase``), as Netflix's gradient limit does: an H200 at 8 ms
per token against a 50 ms SLO goes 4 -> 20 -> 100 in two polls, where
doubling needed six and served the first burst of 256 chats at 0.62x the
stock app.

A long prompt in prefill inflates every stream's time per token for as long
as it is prefilled; that is interference, which the per-class caps bound, not
decode congestion, which the window bounds. So samples taken while one is in
prefill (``EngineSample.prefilling``) are not learnt, and an over-SLO sample
then cuts only if the TPOT line learnt from clean samples agrees the batch is
too big (on the CPU flood the window was cut to its minimum by prefill alone,
and high requests queued for seconds behind it).

Pure: no Ray, no asyncio. ``observe`` is fed one measurement at a time (the
pool's engine load, polled by router/pool.py) and returns the decision, so the
same code is unit-tested on synthetic rates.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum

from deployments.router.settings import WindowSettings


class WindowMove(str, Enum):
    GROW = "grow"
    SHRINK = "shrink"
    HOLD = "hold"


@dataclass(frozen=True)
class EngineSample:
    """One look at a pool's engine.

    tpot_s: recent mean time per output token, seconds (None: nothing decoded lately).
    kv_cache_usage: 0..1. in_use: requests this router runs in the pool now.
    queued: requests this router holds back for the pool now.
    window_bound: some of them wait only because the window is full (not for a class cap or a yield).
    prefilling: a long prompt (a medium or low request) is in prefill now, or was a moment ago.
    window_full: a class that runs has used all the window it may: its next request would wait.
    """

    tpot_s: float | None
    kv_cache_usage: float
    in_use: int
    queued: int
    window_bound: bool
    prefilling: bool = False
    window_full: bool = False


@dataclass(frozen=True)
class WindowDecision:
    move: WindowMove
    limit: float
    reason: str


# How TPOT grows with the batch is learnt as one smoothed TPOT per batch size (per replica), the
# most recently seen sizes kept: a long steady spell at one size does not erase what other sizes
# showed, and a changed workload (longer prompts) rewrites each size as it is seen again.
_SIZES = 32
_POINT_WEIGHT = 0.3


def _line(points) -> tuple[float, float, float] | None:
    """(mean batch, mean TPOT, slope) of the least-squares line through ``points`` [(batch, tpot_s)], one
    per batch size; None while fewer than three sizes were seen or TPOT does not grow with the batch."""
    if len(points) < 3:  # three batch sizes at least
        return None
    n = len(points)
    mean_b = sum(b for b, _ in points) / n
    mean_t = sum(t for _, t in points) / n
    var_b = sum((b - mean_b) ** 2 for b, _ in points)
    slope = sum((b - mean_b) * (t - mean_t) for b, t in points) / var_b
    return (mean_b, mean_t, slope) if slope > 0 else None


def batch_at_slo(points, tpot_slo_s: float) -> float | None:
    """The batch per replica at which TPOT would reach the SLO, from the line through ``points``; None
    without a line (then nothing measured bounds the window)."""
    line = _line(points)
    if line is None:
        return None
    mean_b, mean_t, slope = line
    return mean_b + (tpot_slo_s - mean_t) / slope


def tpot_at(points, batch: float) -> float | None:
    """The TPOT, seconds, that the line through ``points`` predicts at ``batch`` per replica; None without
    a line."""
    line = _line(points)
    if line is None:
        return None
    mean_b, mean_t, slope = line
    return max(0.0, mean_t + slope * (batch - mean_b))


class AdaptiveWindow:
    """The window per LLM replica (a float; the scheduler uses its floor, at least ``min``)."""

    def __init__(self, settings: WindowSettings, tpot_slo_s: float, share: float = 1.0):
        self._settings = settings
        self._tpot_slo_s = tpot_slo_s
        self._share = share
        self.limit = float(self._bounded(settings.initial * share))
        self._slow_start = True  # until the first cut
        self._over = 0  # consecutive looks with TPOT over the SLO
        self._curve: OrderedDict[int, float] = OrderedDict()  # batch per replica -> smoothed TPOT

    def apply(self, settings: WindowSettings, tpot_slo_s: float) -> None:
        """New bounds and steps (a reconfigure); the window keeps what it has learnt, within the new bounds."""
        self._settings, self._tpot_slo_s = settings, tpot_slo_s
        self.limit = self._bounded(self.limit)

    def set_share(self, share: float) -> None:
        """This router's share of the pool (1 / router replicas): bounds scale with it."""
        if share != self._share:
            self.limit = self._bounded(self.limit * share / self._share)
            self._share = share

    @property
    def in_slow_start(self) -> bool:
        """True until the first cut: the window still grows by the measured headroom."""
        return self._slow_start

    @property
    def per_replica(self) -> int:
        return max(1, int(self.limit))

    def _bounded(self, value: float) -> float:
        low = max(1.0, self._settings.min * self._share)
        return min(max(value, low), max(low, self._settings.max * self._share))

    def observe(self, sample: EngineSample, replicas: int = 1) -> WindowDecision:
        """One measurement in, one move out."""
        s = self._settings
        batch = sample.in_use / max(1, replicas)
        if sample.tpot_s is not None and sample.in_use > 0 and not sample.prefilling:
            self._learn(round(batch), sample.tpot_s)
        if sample.kv_cache_usage >= s.kv_cache_high and sample.queued > 0:
            self._slow_start = False
            return self._move(WindowMove.SHRINK, self.limit * s.decrease,
                              f"KV cache {sample.kv_cache_usage:.0%} >= {s.kv_cache_high:.0%}")
        if sample.tpot_s is None:
            return WindowDecision(WindowMove.HOLD, self.limit, "no tokens decoded lately")
        if sample.tpot_s > self._tpot_slo_s:
            at_slo = batch_at_slo(self.points, self._tpot_slo_s)
            if sample.prefilling and at_slo is not None and batch < at_slo:
                return WindowDecision(WindowMove.HOLD, self.limit,
                                      f"TPOT {sample.tpot_s * 1000:.0f} ms over the SLO while a long prompt is "
                                      f"prefilled; decode alone fits {at_slo:.1f} per replica")
            self._over += 1
            if self._over < 2 and not sample.prefilling and sample.tpot_s * s.grow_below <= self._tpot_slo_s:
                # Just over, once: a step that carried prefill chunks or a scheduling hiccup, not yet
                # congestion. On the CPU engine at 8 streams the engine's smoothed TPOT crossed the
                # SLO on single samples while clients saw 10-15% under it, and each cut queued
                # requests that would have met the SLO. A second look over, or one clearly over
                # (past SLO / grow_below), cuts. While a long prompt is prefilled the line check
                # above already decided: a confirmed cut there let the CPU flood's high TTFT p99
                # reach 2.6x idle (1.35x without).
                return WindowDecision(WindowMove.HOLD, self.limit,
                                      f"TPOT {sample.tpot_s * 1000:.0f} ms just over the SLO once; confirming")
            self._slow_start = False
            if sample.in_use > self.per_replica * max(1, replicas):
                # The last cut has not taken effect yet (requests drain as they finish); cutting
                # again on the same evidence would overshoot, as TCP cuts once per round trip.
                return WindowDecision(WindowMove.HOLD, self.limit, "TPOT over the SLO; draining to the last cut")
            return self._move(WindowMove.SHRINK, self.limit * s.decrease,
                              f"TPOT {sample.tpot_s * 1000:.0f} ms > SLO {self._tpot_slo_s * 1000:.0f} ms")
        self._over = 0
        if self.has_headroom(sample.tpot_s) and (sample.window_bound or sample.window_full):
            # A full window with headroom grows before anyone waits (TCP grows a window that is used in
            # full): under a light Poisson load on the CPU, arrivals that found it full waited up to a
            # poll (0.25-0.52 s) for the growth, and three of ten missed the 1 s TTFT SLO that way.
            return self._move(WindowMove.GROW, max(self.limit * self._growth(sample.tpot_s), self.limit + 1),
                              f"TPOT {sample.tpot_s * 1000:.0f} ms < {s.grow_below:.0%} of SLO, "
                              + ("requests wait" if sample.window_bound else "the window is full"))
        if self._slow_start and sample.prefilling and sample.window_bound:
            # Under the SLO though prompts are being prefilled: their chunks, not the batch, hold TPOT
            # near it (on the H200 a burst of 256 prompts of 518 tokens kept TPOT at 40-50 ms for the
            # 2 s its prefill took, and the window waited those 2 s at 241).
            return self._move(WindowMove.GROW, self.limit * s.slow_start_increase,
                              f"TPOT {sample.tpot_s * 1000:.0f} ms under the SLO while prompts are prefilled")
        at_slo = batch_at_slo(self.points, self._tpot_slo_s)
        if sample.window_bound and at_slo is not None and (self.per_replica + 1) <= at_slo * self._share:
            # Near the SLO but, by the TPOT-per-batch line measured so far, one more still fits it.
            return self._move(WindowMove.GROW, self.limit + 1,
                              f"TPOT {sample.tpot_s * 1000:.0f} ms; the measured line puts the SLO at "
                              f"{at_slo:.1f} per replica")
        return WindowDecision(WindowMove.HOLD, self.limit,
                              "no request waits for the window" if not sample.window_bound else "TPOT near the SLO")

    def _growth(self, tpot_s: float) -> float:
        """Growth factor with headroom: in slow start the measured headroom, bounded; after it, ``increase``."""
        s = self._settings
        if not self._slow_start:
            return s.increase
        headroom = s.grow_below * self._tpot_slo_s / max(tpot_s, 1e-6)
        return min(s.max_increase, max(s.slow_start_increase, headroom))

    def has_headroom(self, tpot_s: float | None) -> bool:
        """Would the window grow if the load asked? The engine is idle or well under the SLO, below max."""
        under = tpot_s is None or tpot_s < self._settings.grow_below * self._tpot_slo_s
        return under and self.limit < self._bounded(float("inf"))

    @property
    def max_limit(self) -> float:
        return self._bounded(float("inf"))

    def _learn(self, batch: int, tpot_s: float) -> None:
        before = self._curve.pop(batch, None)
        self._curve[batch] = tpot_s if before is None else before + _POINT_WEIGHT * (tpot_s - before)
        if len(self._curve) > _SIZES:
            self._curve.popitem(last=False)

    @property
    def points(self) -> list[tuple[int, float]]:
        return list(self._curve.items())

    def tpot_at(self, batch: float) -> float | None:
        """The TPOT the engine showed (by the measured line) at ``batch`` requests per replica, seconds;
        None until three batch sizes were measured."""
        return tpot_at(self.points, batch)

    def expected_limit(self) -> float:
        """Where the window is heading while the engine has headroom: the batch at which the measured
        TPOT-vs-batch line reaches the SLO (this router's share of it), else its bound."""
        at_slo = batch_at_slo(self.points, self._tpot_slo_s)
        if at_slo is None:
            return self.max_limit
        return max(self.limit, min(self.max_limit, at_slo * self._share))

    def _move(self, move: WindowMove, wanted: float, reason: str) -> WindowDecision:
        before = self.limit
        self.limit = self._bounded(wanted)
        if self.limit == before:
            return WindowDecision(WindowMove.HOLD, self.limit, f"{reason}; at the bound")
        return WindowDecision(move, self.limit, reason)
