"""Bounded per-class queues and a concurrency window toward the replicas.

The router, not an unbounded engine queue, decides the order: at most
``window`` requests per running LLM replica run at once (the window is
adaptive, router/window.py, and set from outside); the rest wait here, high before medium before low;
within a class, tenants take turns by tokens served (tenancy/fairness.py), each tenant's requests in arrival order. A share of the window is
kept for high requests, so a flood of low ones can never take every slot, and
a class may be set to yield to high: it starts only in the gaps between them.
Decisions are the pure functions at the top; ``PriorityScheduler`` is the
asyncio bookkeeping around them.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import Callable

from deployments.router.settings import PriorityClass, QueueSettings
from deployments.tenancy.fairness import FairQueue, VirtualTokenCounter


class QueueFull(Exception):
    """Refused at the door: 429."""

    def __init__(self, cls: PriorityClass, reason: str):
        super().__init__(reason)
        self.cls = cls


class Shed(QueueFull):
    """Dropped from the queue to make room for a more urgent request: 429."""


class QueueTimeout(Exception):
    """The deadline passed while waiting: 504."""


def reserved_slots(window: int, settings: QueueSettings) -> int:
    # Keep at least one slot usable by every class.
    return min(math.ceil(window * settings.reserved_for_high), window - 1)


def limit_for(cls: PriorityClass, window: int, settings: QueueSettings, replicas: int = 1) -> int:
    """How many requests may run at once when ``cls`` wants to start: the window, less the high reserve."""
    replicas = max(1, replicas)
    limit = window * replicas
    if cls is not PriorityClass.HIGH:
        limit -= reserved_slots(window, settings) * replicas
    return limit


def may_start(cls: PriorityClass, in_flight: int, settings: QueueSettings, class_in_flight: int = 0,
              high_active: int = 0, replicas: int = 1, window: int = 8) -> bool:
    """Within the window (less the high reserve for other classes), the class's own cap,
    and, for a class that yields to high, only while fewer high requests run or wait
    than its threshold. Window, reserve, caps and thresholds are per LLM replica:
    a scaled-up pool takes more at once."""
    replicas = max(1, replicas)
    limit = limit_for(cls, window, settings, replicas)
    yield_below = settings.yield_to_high.get(cls.label)
    if yield_below is not None and high_active >= yield_below * replicas:
        return False
    class_cap = settings.max_in_flight_per_class.get(cls.label)
    return in_flight < limit and (class_cap is None or class_in_flight < class_cap * replicas)


def _decrement(counts: dict[str, int], key: str) -> None:
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


def class_to_shed(queued: dict[PriorityClass, int], arriving: PriorityClass) -> PriorityClass | None:
    """The least urgent class with waiters that is less urgent than the arrival."""
    for cls in sorted(PriorityClass, reverse=True):
        if cls > arriving and queued.get(cls, 0) > 0:
            return cls
    return None


@dataclass(eq=False)
class _Waiter:
    cls: PriorityClass
    future: asyncio.Future
    deadline: float = math.inf  # monotonic: must start by then
    max_tokens: int = 0  # what it asked for: how long it will hold its slot
    tenant: str = ""
    cost: float = 0.0  # weighted tokens charged to its tenant when it starts (tenancy/fairness.py)
    enqueued_at: float = field(default_factory=time.monotonic)


class PriorityScheduler:
    def __init__(self, settings: QueueSettings):
        self._settings = settings
        self.counter = VirtualTokenCounter()
        self._queues: dict[PriorityClass, FairQueue[_Waiter]] = {c: FairQueue(self.counter) for c in PriorityClass}
        self._running: dict[PriorityClass, int] = {c: 0 for c in PriorityClass}
        self._replicas = 1
        self._window = settings.window.initial
        self._tenant_running: dict[str, int] = {}
        self._tenant_reserve = False  # keep tenant_reserve slots for tenants under their fair share
        self._reserve_held: dict[str, int] = {}  # per tenant: its requests that started in the reserve
        # Called when a request starts to wait (the pool's watch then looks at the engine sooner).
        self.on_wait: Callable[[], None] | None = None

    @property
    def window(self) -> int:
        return self._window

    def set_window(self, per_replica: int) -> None:
        """The adaptive window per LLM replica (router/window.py)."""
        self._window = max(1, per_replica)
        self._dispatch()

    def apply(self, settings: QueueSettings) -> None:
        """New queue settings (a reconfigure): queued requests stay; new capacities count from now."""
        self._settings = settings
        self._dispatch()  # a larger cap or window share may let waiters start now

    def set_sharing(self, fair: bool, reserve: bool = False) -> None:
        """Tenants of a class share it by tokens served (True) or in arrival order (False); with
        ``reserve`` (keys on, fair sharing) ``tenant_reserve`` of the window waits for tenants running
        nothing or less than their fair share."""
        for queue in self._queues.values():
            queue.fair = fair
        if reserve != self._tenant_reserve:
            self._tenant_reserve = reserve
            self._dispatch()

    def reserved_for_tenants(self) -> int:
        """Slots (whole pool) only a tenant running nothing or under its fair share may take."""
        share = self._settings.tenant_reserve
        if not self._tenant_reserve or share <= 0:
            return 0
        return max(1, math.floor(self._window * share)) * self._replicas

    def settle(self, tenant: str, correction: float) -> None:
        """Correct a started request's charge to what it really cost (weighted tokens, usually negative)."""
        self.counter.charge(tenant, correction)

    @property
    def replicas(self) -> int:
        return self._replicas

    def set_replicas(self, replicas: int) -> None:
        """The pool's running LLM replicas; the window scales with them."""
        self._replicas = max(1, replicas)
        self._dispatch()  # a larger window may let waiters start now

    @property
    def in_flight(self) -> int:
        return sum(self._running.values())

    def _may_start(self, cls: PriorityClass, tenant: str | None = None) -> bool:
        """May a request of ``cls`` from ``tenant`` start now? (None: one from a tenant already running.)"""
        return self._slot_for(cls, tenant) is not None

    def _slot_for(self, cls: PriorityClass, tenant: str | None) -> str | None:
        """Which slot a request of ``cls`` from ``tenant`` would take now: "shared", "reserve" (the tenants'
        reserve, only for a tenant running nothing or less than its fair share), or None (none: it waits).

        The reserve is a pool of its own: the shared slots count it as taken, and a newcomer may use it
        even when a window cut left the shared slots over the new window (the heavy tenant's requests
        still running), so the window may be passed by at most the reserve until they drain."""
        high_active = self._running[PriorityClass.HIGH] + len(self._queues[PriorityClass.HIGH])
        reserve = self.reserved_for_tenants()
        if may_start(cls, self._shared_in_flight(), self._settings, self._running[cls], high_active, self._replicas,
                     self._window):
            return "shared"
        if (reserve and tenant is not None and self._may_use_reserve(tenant) and self._in_reserve < reserve
                and may_start(cls, 0, self._settings, self._running[cls], high_active, self._replicas, self._window)):
            return "reserve"  # (in flight 0: the window is the reserve's own; class caps and yields still hold)
        return None

    def _shared_in_flight(self) -> int:
        """Slots of the window taken for everyone but the tenants' reserve: those running outside it, and
        the reserve itself."""
        reserve = self.reserved_for_tenants()
        return self.in_flight - self._in_reserve + reserve if reserve else self.in_flight

    def running(self, cls: PriorityClass) -> int:
        return self._running[cls]

    def ahead_of(self, cls: PriorityClass, tenant: str = "") -> int:
        """Requests that start before a new one of ``cls`` from ``tenant``: those queued in more urgent
        classes, and in its own class those ahead of it (all, or under fair sharing its turn among tenants)."""
        return sum(len(self._queues[c]) for c in PriorityClass if c < cls) + self._queues[cls].ahead_of(tenant)

    def window_bound(self) -> bool:
        """Does some waiter wait only because the window is full (not for its class cap or a yield)?"""
        return self._window_used_up_by(lambda c: self._queues[c])

    def window_full(self) -> bool:
        """Has a class that runs used all the window it may (less the high reserve), so that its next
        request would wait? (Its class cap aside: the window would not help that one.)"""
        return self._window_used_up_by(lambda c: self._running[c])

    def _window_used_up_by(self, has_requests) -> bool:
        """Has some class with ``has_requests(class)`` used all the window it may use?"""
        # The tenants' reserve is kept free on purpose: the window counts as in use up to it.
        in_flight = self._shared_in_flight()
        return any(has_requests(c) and in_flight >= limit_for(c, self._window, self._settings, self._replicas)
                   for c in PriorityClass)

    def slots_for(self, cls: PriorityClass, window: int | None = None) -> int:
        """How many requests of ``cls`` can run at once: the window (this one, or ``window`` per replica)
        less the reserve, within the class's cap."""
        slots = limit_for(cls, window or self._window, self._settings, self._replicas)
        cap = self._settings.max_in_flight_per_class.get(cls.label)
        return slots if cap is None else min(slots, cap * self._replicas)

    def free_slots(self, cls: PriorityClass, tenant: str | None = None) -> int:
        """Slots a new request of ``cls`` (from ``tenant``: the tenants' reserve counts for one that may use
        it) could take now (0 when its cap or a yield holds it back)."""
        if not self._may_start(cls, tenant):
            return 0
        free = limit_for(cls, self._window, self._settings, self._replicas) - self._shared_in_flight()
        if tenant is not None and self._may_use_reserve(tenant):
            free = max(0, free) + max(0, self.reserved_for_tenants() - self._in_reserve)
        cap = self._settings.max_in_flight_per_class.get(cls.label)
        return free if cap is None else min(free, cap * self._replicas - self._running[cls])

    @property
    def _in_reserve(self) -> int:
        return sum(self._reserve_held.values())

    def _start(self, cls: PriorityClass, tenant: str) -> None:
        if self._slot_for(cls, tenant) == "reserve":
            self._reserve_held[tenant] = self._reserve_held.get(tenant, 0) + 1
        self._running[cls] += 1
        self._tenant_running[tenant] = self._tenant_running.get(tenant, 0) + 1

    def depths(self) -> dict[str, int]:
        return {c.label: len(q) for c, q in self._queues.items()}

    def _queued_total(self) -> int:
        return sum(len(q) for q in self._queues.values())

    async def acquire(self, cls: PriorityClass, timeout_s: float, max_tokens: int = 0, tenant: str = "",
                      cost: float = 0.0) -> float:
        """Wait for a slot; returns the seconds waited. Pair with ``release()``.

        ``tenant`` and ``cost`` (weighted tokens it may use) order tenants within the class.

        Raises ``QueueFull`` (no room to wait), ``Shed`` (dropped for a more urgent request, or by
        ``shed_hopeless``) or ``QueueTimeout`` (``timeout_s`` passed while waiting).
        """
        # Waiters of a more urgent class exist only when they cannot start: the
        # window is full (then neither can this one), their cap holds them, or
        # (for high) they make a yielding class wait anyway.
        queue = self._queues[cls]
        # Behind waiters of its class only through the tenants' reserve (they cannot use it: they would have).
        if self._may_start(cls, tenant) and (not queue or self._may_use_reserve(tenant) and not queue.has(tenant)):
            self._start(cls, tenant)
            self.counter.charge(tenant, cost)
            return 0.0
        waiter = self._enqueue(cls, tenant)
        waiter.deadline, waiter.max_tokens, waiter.cost = waiter.enqueued_at + timeout_s, max_tokens, cost
        if self.on_wait is not None:
            self.on_wait()
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), timeout_s)
        except asyncio.TimeoutError:
            if not self._withdraw(waiter):
                self.release(cls, tenant)  # granted in the same instant it timed out
            raise QueueTimeout(f"waited {timeout_s:.1f}s in the {cls.label} queue") from None
        except asyncio.CancelledError:
            if not self._withdraw(waiter):
                self.release(cls, tenant)
            raise
        return time.monotonic() - waiter.enqueued_at

    def release(self, cls: PriorityClass, tenant: str = "") -> None:
        self._running[cls] -= 1
        _decrement(self._tenant_running, tenant)
        _decrement(self._reserve_held, tenant)  # the tenant's slots are alike: one in the reserve frees first
        self._dispatch()

    def _may_use_reserve(self, tenant: str) -> bool:
        """May this tenant start in the tenants' reserve (reserve on)? When it runs nothing, or less than its
        fair share of the window: the window over the tenants with requests running or waiting."""
        if not self._tenant_reserve:
            return False
        running = self._tenant_running.get(tenant, 0)
        if not running:
            return True
        active = {t for t, n in self._tenant_running.items() if n}
        for queue in self._queues.values():
            active |= queue.tenants()
        sharing = len(active | {tenant})  # alone, a tenant's share is the window: the reserve is for others
        return sharing > 1 and running < self._window * self._replicas / sharing

    def _enqueue(self, cls: PriorityClass, tenant: str = "") -> _Waiter:
        queue = self._queues[cls]
        if len(queue) >= self._settings.capacity[cls.label]:
            raise QueueFull(cls, f"the {cls.label} queue is full ({len(queue)} waiting)")
        if self._queued_total() >= self._settings.max_queued_total:
            victim_cls = class_to_shed({c: len(q) for c, q in self._queues.items()}, cls)
            if victim_cls is None:
                raise QueueFull(cls, f"all queues are full ({self._queued_total()} waiting)")
            victim = self._queues[victim_cls].pop()  # newest of the least urgent class's most-served tenant
            victim.future.set_exception(Shed(victim_cls, f"shed from the {victim_cls.label} queue under overload"))
        waiter = _Waiter(cls, asyncio.get_running_loop().create_future(), tenant=tenant)
        queue.append(waiter)
        return waiter

    def shed_hopeless(self, predicted_wait: Callable[[PriorityClass, int, int], float | None], now: float) -> int:
        """Refuse (429, ``Shed``) every waiter that can no longer start by its deadline.

        ``predicted_wait(cls, ahead, max_tokens)``: seconds until a waiter of ``cls`` asking for
        ``max_tokens``, with ``ahead`` waiters before it, starts; None when there is no evidence to
        judge on (it stays). Admission predicted in time; when the pool turns out slower than predicted (the
        window stopped growing, a burst came in front), a queued request learns it now, with no engine
        work spent, instead of expiring into a 504. Returns how many were shed.
        """
        shed, in_classes_before = 0, 0
        for cls in PriorityClass:
            queue, shed_here = self._queues[cls], 0
            for waiter, in_class in queue.positions():  # in turn order: tenants' turns under fair sharing
                ahead = in_classes_before + max(0, in_class - shed_here)  # those shed no longer come first
                wait = predicted_wait(cls, ahead, waiter.max_tokens)
                if wait is not None and now + wait > waiter.deadline:
                    queue.remove(waiter)
                    waiter.future.set_exception(Shed(cls, f"the {cls.label} queue moves slower than predicted; "
                                                          "this request could no longer start by its start deadline"))
                    shed_here += 1
            in_classes_before += len(queue)
            shed += shed_here
        return shed

    def _next_startable(self, cls: PriorityClass, queue: FairQueue) -> _Waiter | None:
        """The waiter of ``cls`` to start now, taken off the queue: the next in turn if it may start,
        else (into the tenants' reserve) the first in turn of a tenant under its fair share; None."""
        if self._may_start(cls, queue.peek().tenant):
            return queue.popleft()
        if self.reserved_for_tenants():
            tenant = queue.first_tenant_where(self._may_use_reserve)
            if tenant is not None and self._may_start(cls, tenant):
                return queue.popleft_of(tenant)
        return None

    def _withdraw(self, waiter: _Waiter) -> bool:
        """Remove a waiter that gave up; False if it already held a slot."""
        queue = self._queues[waiter.cls]
        if waiter in queue:
            queue.remove(waiter)
            self._dispatch()  # a high waiter leaving may free a yielding class
            return True
        if waiter.future.done() and waiter.future.exception() is not None:
            return True  # it was shed: it never held a slot
        return False

    def _dispatch(self) -> None:
        for cls in PriorityClass:
            queue = self._queues[cls]
            while queue:
                waiter = self._next_startable(cls, queue)
                if waiter is None:
                    break
                if waiter.future.done():
                    continue
                self._start(cls, waiter.tenant)
                self.counter.charge(waiter.tenant, waiter.cost)
                waiter.future.set_result(None)
            if queue and self.in_flight >= self._window * self._replicas:
                return  # window full: nothing below may start either
            # A class held back only by its own cap does not block the classes below.
