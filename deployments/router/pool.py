"""One LLM pool as the router sees it: its queues, window, circuit, readiness and measurements.

Each pool (one LLM deployment) gets a ``PoolState``. A background task per
pool (``watch``) keeps it honest without client traffic:

- **readiness**: until the pool's engine has answered a real one-token request,
  the pool is "loading" and requests get 503 at once (a Serve replica can be
  RUNNING long before its first generation is fast);
- **engine load**: every ``POLL_S`` it reads the engine's running / waiting
  requests, KV-cache usage and smoothed time per output token from one replica
  and feeds the adaptive window (router/window.py);
- **the SLO of a profile measured on its machine**: a profile with
  ``tpot_slo_from_engine`` scales its TPOT SLO from the unloaded TPOT the LLM
  replicas measured at warm-up (the slowest seen), and every use of the SLO
  here (window, budgets, goodput) follows;
- **circuit probe**: when the circuit is half-open it sends the one-token probe
  itself, so a pool recovers with no client request spent on it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from deployments.observability import metrics
from deployments.router.circuit_breaker import CircuitBreaker
from deployments.router.forecast import ServiceMeter, WaitForecast, forecast_wait
from deployments.router.pools import PoolRoute
from deployments.router.scheduler import PriorityScheduler
from deployments.router.settings import CircuitSettings, PriorityClass, QueueSettings
from deployments.router.window import AdaptiveWindow, EngineSample, WindowDecision
from deployments.server.load_report import ReplicaLoad
from deployments.warm_up import one_token_request

logger = logging.getLogger("ray.serve")

# How often the router looks at each pool's engine. One small remote call per
# pool per interval, off every request's path; fast enough that slow start
# takes the window from 4 to 512 in under 4 s (on the H200 a burst of 256
# chats from idle is over in 6 s).
POLL_S = 0.5
# A TPOT older than this many polls describes an engine that stopped decoding.
_STALE_POLLS = 3
# The engine's smoothed TPOT forgets a prefill's steps within about ten steps; samples this many polls
# after a long prompt's prefill still carry it.
_PREFILL_ECHO_POLLS = 2
# While slow start grows the window and requests wait for it, the router looks again after this many of
# the engine's decoding steps alone (its unloaded TPOT, measured at warm-up), no sooner than _RAMP_MIN_S
# and no later than POLL_S. Each look then sees steps run at the last window (TCP grows once per round
# trip for the same reason), and a burst from idle is not held for whole 0.5 s polls: on the H200
# (4.7 ms a step) the first burst of 64 streams waited 279 ms (p50) in the queue while four routers
# grew from one slot each (docs/streaming.md, pass 4). The CPU engine (30-90 ms a step) keeps POLL_S.
_RAMP_STEPS = 20
_RAMP_MIN_S = 0.05


class PoolState:
    """Everything the router keeps for one pool; owned by the Router, one per pool."""

    def __init__(self, route: PoolRoute, handle: Any, model_id: str, queues: QueueSettings,
                 circuit: CircuitSettings):
        self.route, self.handle, self.model_id = route, handle, model_id
        self.streaming_handle = handle.options(stream=True)
        self._declared = queues  # as configured; ``queue_settings`` is them scaled to the engine
        self._unloaded_tpot_s: float | None = None  # the slowest unloaded TPOT a replica reported, seconds
        self.queue_settings = queues
        self.scheduler = PriorityScheduler(queues)
        self._wake = asyncio.Event()  # a request started to wait: the watch may look sooner
        self.scheduler.on_wait = self._wake.set
        self.circuit = CircuitBreaker(circuit)
        self.window = AdaptiveWindow(queues.window, queues.tightest_tpot_s)
        self.service = {cls: ServiceMeter() for cls in PriorityClass}
        self.ready = False
        self.not_ready_reason = "the model is loading"
        self._tpot_s: float | None = None  # the engine's latest fresh TPOT
        self._last_tpot_s: float | None = None  # the latest TPOT measured at all, however old
        self._running: dict[object, tuple[PriorityClass, float, int]] = {}  # -> (class, started, max_tokens)
        self._prefilling: set[object] = set()  # long prompts (medium, low) started, first token not yet seen
        self._prefill_ended_at = -float("inf")
        self.last_window_decision: WindowDecision | None = None
        self._probe_timeout_s = circuit.probe_timeout_s
        self._router_replicas = 1

    def apply(self, queues: QueueSettings, circuit: CircuitSettings) -> None:
        """New settings from a reconfigure, applied in place: requests queued or running keep their places
        and budgets; what was measured (window, service times, TPOT) stays."""
        self._declared = queues
        self._apply_queues()
        self.circuit.apply(circuit)
        self._probe_timeout_s = circuit.probe_timeout_s

    def _apply_queues(self) -> None:
        queues = self.queue_settings = self._declared.scaled_to_engine(self._unloaded_tpot_s)
        self.scheduler.apply(queues)
        self.window.apply(queues.window, queues.tightest_tpot_s)
        self.scheduler.set_window(self.window.per_replica)

    @property
    def queued(self) -> int:
        return sum(self.scheduler.depths().values())

    def set_router_replicas(self, routers: int) -> None:
        """With N router replicas each keeps 1/N of the pool's window (and measures its own share)."""
        self._router_replicas = max(1, routers)
        self.window.set_share(1 / self._router_replicas)
        self.scheduler.set_window(self.window.per_replica)

    def service_s(self, cls: PriorityClass, max_tokens: int) -> float:
        """How long this request would hold its slot, seconds: measured for its class; until one of its
        class has finished, its decode time at the engine's TPOT (on the H200 a 256-token low request
        took 1.5 s where 256 x the 50 ms SLO said 12.8 s, and refused half a flood the engine could take)."""
        return self.service[cls].estimate_s(max_tokens) or self.decode_s(cls, max_tokens)

    def started(self, key: object, cls: PriorityClass, max_tokens: int) -> None:
        """A request of ``cls`` asking for up to ``max_tokens`` took its slot. A medium or low one (a long
        prompt, by classification) counts as in prefill until ``first_token`` or ``finished``."""
        self._running[key] = (cls, time.monotonic(), max_tokens)
        if cls is not PriorityClass.HIGH:
            self._prefilling.add(key)

    def first_token(self, key: object) -> None:
        if key in self._prefilling:
            self._prefilling.discard(key)
            self._prefill_ended_at = time.monotonic()

    def finished(self, key: object) -> None:
        self.first_token(key)  # a whole (non-streamed) answer: its prefill is over by its end at the latest
        self._running.pop(key, None)

    @property
    def prefilling(self) -> bool:
        """Is a long prompt in prefill, or was one a moment ago (its steps are still in the smoothed TPOT)?"""
        return bool(self._prefilling) or time.monotonic() - self._prefill_ended_at < _PREFILL_ECHO_POLLS * POLL_S

    def _remaining_s(self, cls: PriorityClass, service_s: float) -> list[float]:
        """Expected seconds left of each running request whose slot ``cls`` could take (its own class's
        when capped, else all); one not known here counts as just started.

        Judged by what is measured now, not by what was expected when each started: a burst of 32 chats
        that started at an idle engine's speed (9 s each on the slow 2-core machine) ran at a full
        batch's (36 s), and the queue behind it, told "a slot frees any moment", waited 20-30 s for its
        429 instead of getting it within a few polls."""
        capped = cls.label in self.queue_settings.max_in_flight_per_class
        count = self.scheduler.running(cls) if capped else self.scheduler.in_flight
        now = time.monotonic()
        known = [max(0.0, self.service_s(c, max_tokens) - (now - started))
                 for c, started, max_tokens in self._running.values() if not capped or c is cls]
        return (known + [service_s] * count)[:count]

    def decode_s(self, cls: PriorityClass, max_tokens: int, joining: int = 0) -> float:
        """Seconds to generate ``max_tokens`` at the engine's last measured TPOT (its class's SLO before
        any). A lower bound of the time after the first token: prefill is not in it. An idle engine's
        TPOT is stale but still the best guess: on the H200 a flood arriving at an idle engine was
        judged at the 50 ms SLO (12.8 s per request where it took 1.5 s) and 52 of 128 were refused.

        ``joining``: requests that will run beside this one (this router's, running and ahead of it). The
        TPOT is then at least what the measured TPOT-vs-batch line gives for that batch: a burst admitted
        against an idle engine's TPOT all ran at a full batch's (on 2 cores, 24 of 24 passed a 10 s client
        timeout)."""
        tpot = self._last_tpot_s or self.queue_settings.targets(cls).tpot_s
        if joining:  # it runs beside them, but never in more than the window
            replicas = max(1, self.scheduler.replicas)
            batch = min(joining + 1, self.scheduler.window * replicas) / replicas
            tpot = max(tpot, self.window.tpot_at(batch) or 0.0)
        return max_tokens * tpot

    def alone_s(self, max_tokens: int) -> float | None:
        """Seconds to generate ``max_tokens`` at the fastest TPOT this pool is known to reach: the unloaded
        TPOT a replica measured at warm-up, or the last measured one if faster. Less than this, no wait or
        retry can give a request. None before either is known (a guess from the SLO would refuse requests
        the engine could serve)."""
        known = [tpot for tpot in (self._unloaded_tpot_s, self._last_tpot_s) if tpot]
        return max_tokens * min(known) if known else None

    def forecast(self, cls: PriorityClass, max_tokens: int, tenant: str = "") -> WaitForecast:
        """Predicted wait for a slot of a new request of ``cls``, among requests like it.

        While the engine has measured headroom (idle, or TPOT well under the SLO) the window is about to
        grow, so the wait is predicted with the window where it is heading (the batch at which the
        measured TPOT would reach the SLO, or its bound before that is known); otherwise as it is.
        """
        return self._forecast(cls, self.scheduler.ahead_of(cls, tenant), self.service_s(cls, max_tokens), tenant)

    def _forecast(self, cls: PriorityClass, ahead: int, service_s: float, tenant: str | None = None) -> WaitForecast:
        if self.scheduler.free_slots(cls, tenant) > ahead:
            return WaitForecast(0.0)  # starts now (a cap or a yield shows as no free slot)
        window = self.window.expected_limit() if self.window.has_headroom(self._tpot_s) else None
        slots = self.scheduler.slots_for(cls, None if window is None else max(1, int(window)))
        return forecast_wait(ahead, slots, service_s, self._remaining_s(cls, service_s))

    def unavailable(self) -> tuple[str, int] | None:
        """(reason, Retry-After s) while the pool cannot take requests at all; None when it can."""
        if not self.ready:
            return f"pool {self.route.name!r}: {self.not_ready_reason}; retry shortly", max(1, round(POLL_S * 5))
        retry_after = self.circuit.try_pass()
        if retry_after is not None:
            return (f"model replicas of pool {self.route.name!r} are failing; circuit open "
                    f"(last fault: {self.circuit.last_fault})"), retry_after
        return None

    def describe(self) -> dict:
        decision = self.last_window_decision
        return {"classes": sorted(self.route.classes), "max_model_len": self.route.max_model_len,
                "ready": self.ready, "circuit": self.circuit.state.value, "queued": self.scheduler.depths(),
                "capacity": dict(self.queue_settings.capacity),
                "in_flight": self.scheduler.in_flight, "replicas": self.scheduler.replicas,
                "router_replicas": self._router_replicas,
                "window_per_replica": self.scheduler.window,
                "window_reason": decision.reason if decision else None,
                "tpot_slo_s": self.queue_settings.tightest_tpot_s, "unloaded_tpot_s": self._unloaded_tpot_s,
                "service_s": {cls.label: meter.mean_s for cls, meter in self.service.items()}}

    # --- the background watch --------------------------------------------------

    async def watch(self) -> None:
        """For the router replica's lifetime: readiness, engine load -> window, circuit probes."""
        while True:
            try:
                if not self.ready:
                    await self._warm_up()  # nothing to poll until the engine answers
                    continue
                if self.circuit.probe_due():
                    await self._probe_circuit()
                await self._poll_engine()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the watch die; the next round tries again
                logger.warning("pool %s: watch round failed", self.route.name, exc_info=True)
            finally:
                self.export_metrics()
                await self._until_next_poll()

    async def _until_next_poll(self) -> None:
        """Wait ``poll_interval_s()`` after this look. A request that starts to wait re-reads the interval
        at once: from idle, the first burst's waiters were held for the plain 0.5 s poll before slow start
        could speed up (H200, pass 5: queue wait p50 282 ms at 64 streams)."""
        looked = time.monotonic()
        while (rest := looked + self.poll_interval_s() - time.monotonic()) > 0:
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), rest)
            except TimeoutError:
                return

    def poll_interval_s(self) -> float:
        """Seconds until the next look at the engine: POLL_S, or _RAMP_STEPS unloaded decoding steps
        (within [_RAMP_MIN_S, POLL_S]) while slow start grows the window and requests wait for it."""
        ramping = (self.ready and self._unloaded_tpot_s and self.window.in_slow_start
                   and self.scheduler.window_bound() and self.window.has_headroom(self._tpot_s))
        if not ramping:
            return POLL_S
        return min(POLL_S, max(_RAMP_MIN_S, _RAMP_STEPS * self._unloaded_tpot_s))

    def export_metrics(self) -> None:
        """This pool's gauges (queue depth and in-flight per class, window, circuit, readiness, replicas)."""
        try:
            metrics.pool_state(self.route.name, depths=self.scheduler.depths(),
                               running={cls.label: self.scheduler.running(cls) for cls in PriorityClass},
                               window=self.scheduler.window, circuit=self.circuit.state.value, ready=self.ready,
                               replicas=self.scheduler.replicas)
        except Exception:  # metrics are best effort
            logger.debug("pool %s: could not export metrics", self.route.name, exc_info=True)

    async def _warm_up(self) -> None:
        error = await self.probe()
        if error is None:
            self.ready = True
            logger.info("pool %s: engine answered its warm-up request; ready", self.route.name)
        else:
            self.not_ready_reason = f"the model is loading ({error})"

    async def _probe_circuit(self) -> None:
        self.circuit.begin_probe()
        error = await self.probe()
        if error is None:
            self.circuit.record_success()
            logger.info("pool %s: circuit probe answered; circuit closed", self.route.name)
        else:
            self.circuit.record_failure(f"the router's probe failed: {error}")
            logger.warning("pool %s: circuit probe failed (%s); circuit open again", self.route.name, error)

    async def probe(self) -> str | None:
        """Send a one-token chat request to the pool; None if it answered, else why not."""
        request = one_token_request(self.model_id)
        try:
            async with asyncio.timeout(self._probe_timeout_s):
                async for response in self.streaming_handle.chat.remote(request):
                    items = response if isinstance(response, list) else [response]
                    for item in items:
                        if type(item).__name__ == "ErrorResponse":
                            return f"engine error: {item.error.message}"[:300]
            return None
        except TimeoutError:
            return f"no answer within {self._probe_timeout_s:.0f}s"
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"[:300]

    async def _poll_engine(self) -> None:
        async with asyncio.timeout(self._probe_timeout_s):
            load: ReplicaLoad = await self.handle.engine_load.remote()
        self._learn_unloaded_tpot(load.unloaded_tpot_s)
        tpot = load.tpot_s
        self._last_tpot_s = tpot or self._last_tpot_s
        if tpot is not None and time.time() - load.tpot_at > _STALE_POLLS * POLL_S:
            tpot = None
        self._tpot_s = tpot
        sample = EngineSample(tpot_s=tpot, kv_cache_usage=load.kv_cache_usage,
                              in_use=self.scheduler.in_flight, queued=self.queued,
                              window_bound=self.scheduler.window_bound(), prefilling=self.prefilling,
                              window_full=self.scheduler.window_full())
        decision = self.window.observe(sample, self.scheduler.replicas)
        if decision.move.value != "hold" or self.last_window_decision is None:
            logger.info("pool %s: window %s to %d per replica: %s", self.route.name, decision.move.value,
                        self.window.per_replica, decision.reason)
        self.last_window_decision = decision
        self.scheduler.set_window(self.window.per_replica)
        self._shed_hopeless()

    def _learn_unloaded_tpot(self, unloaded_tpot_s: float | None) -> None:
        """Keep the slowest unloaded TPOT the replicas reported (the SLO must be one every replica can meet)
        and re-derive the settings when it grows."""
        if unloaded_tpot_s is None or (self._unloaded_tpot_s is not None and unloaded_tpot_s <= self._unloaded_tpot_s):
            return
        self._unloaded_tpot_s = unloaded_tpot_s
        before = self.queue_settings.tightest_tpot_s
        self._apply_queues()
        after = self.queue_settings.tightest_tpot_s
        if after != before:
            logger.info("pool %s: TPOT SLO %.0f -> %.0f ms (%.1f x the engine's %.1f ms with one stream alone)",
                        self.route.name, before * 1000, after * 1000, self._declared.tpot_slo_from_engine,
                        unloaded_tpot_s * 1000)

    def _shed_hopeless(self) -> None:
        def predicted_wait(cls: PriorityClass, ahead: int, max_tokens: int) -> float | None:
            # The same prior admission used: before any request of the class has finished, its decode
            # time at the engine's TPOT. Without that, a burst admitted on a busy CPU expired in the
            # queue (504 after 30 s) because nothing had finished yet to judge by.
            if self.service[cls].mean_s is None and self._last_tpot_s is None:
                return None  # nothing measured at all: no evidence to refuse on
            return self._forecast(cls, ahead, self.service_s(cls, max_tokens)).seconds

        shed = self.scheduler.shed_hopeless(predicted_wait, time.monotonic())
        if shed:
            logger.info("pool %s: %d queued requests could no longer start in time; refused (429)",
                        self.route.name, shed)
