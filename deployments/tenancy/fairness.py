"""Fair sharing between tenants inside one priority class: the Virtual Token Counter.

Arrival order lets a tenant that sends ten times more requests take ten times
the capacity, and makes everyone else wait behind its backlog. The Virtual
Token Counter (Sheng et al., "Fairness in Serving Large Language Models",
OSDI 2024, Algorithm 2) serves instead the waiting tenant that has been
served the fewest tokens so far:

- each tenant has a counter of weighted tokens served: prompt tokens x 1,
  output tokens x 2 (the paper's weights: an output token costs a decode step);
- when a request starts, its tenant's counter is charged its prompt and its
  ``max_tokens`` (what it may cost); when it ends, the charge is corrected to
  the tokens really produced;
- a tenant that arrives to find none of its requests waiting has its counter
  lifted to the smallest counter among the tenants that are waiting (or, with
  nobody waiting, to the last started tenant's), so idleness banks no credit;
- the next request to start is the oldest of the waiting tenant with the
  smallest counter.

A tenant alone gets everything; a light tenant beside a heavy one gets its
turn at once instead of after the heavy one's backlog, and the heavy one
keeps whatever the light one leaves unused (work conserving).
``FairQueue`` is one class's queue ordered that way; with ``fair=False`` it is
first-come-first-served, for comparison. Pure: no asyncio, no Ray.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Deque, Dict, Generic, Iterator, Optional, Protocol, TypeVar

PROMPT_WEIGHT = 1.0
OUTPUT_WEIGHT = 2.0


class Queued(Protocol):
    tenant: str
    enqueued_at: float


W = TypeVar("W", bound=Queued)


def cost(prompt_tokens: int, output_tokens: int) -> float:
    return PROMPT_WEIGHT * prompt_tokens + OUTPUT_WEIGHT * output_tokens


class VirtualTokenCounter:
    """Weighted tokens served per tenant (shared by every class queue of a pool)."""

    def __init__(self):
        self.counters: Dict[str, float] = {}
        self._last_started: Optional[str] = None

    def of(self, tenant: str) -> float:
        return self.counters.get(tenant, 0.0)

    def lift(self, tenant: str, waiting: Iterator[str]) -> None:
        """``tenant`` arrives with none of its requests waiting: no credit for having been idle."""
        floor = min((self.of(t) for t in waiting), default=None)
        if floor is None and self._last_started is not None:
            floor = self.of(self._last_started)
        if floor is not None and floor > self.of(tenant):
            self.counters[tenant] = floor

    def charge(self, tenant: str, amount: float) -> None:
        """Add (or, for a correction, subtract) weighted tokens."""
        self.counters[tenant] = self.of(tenant) + amount
        if amount > 0:
            self._last_started = tenant


class FairQueue(Generic[W]):
    """One class's waiters: per tenant in arrival order; the next is the least-served tenant's oldest."""

    def __init__(self, counter: VirtualTokenCounter, fair: bool = True):
        self._counter, self.fair = counter, fair
        self._by_tenant: Dict[str, Deque[W]] = {}
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def __contains__(self, waiter: W) -> bool:
        return waiter in self._by_tenant.get(waiter.tenant, ())

    def __iter__(self) -> Iterator[W]:
        """Waiters by their tenant's counter, then age: not the order VTC starts them in (that interleaves
        tenants as counters are charged); ``positions()`` gives that."""
        return iter(sorted(self._waiters(), key=self._rank_waiter))

    def ahead_of(self, tenant: str) -> int:
        """About how many waiters start before a new one of ``tenant``: all of them in arrival order; under
        fair sharing its own backlog and, from each other tenant, at most one more than that (the turns
        VTC gives them meanwhile), so a light tenant's wait is not forecast as the heavy one's backlog."""
        if not self.fair:
            return self._size
        return self._turns_before(tenant, len(self._by_tenant.get(tenant, ())))

    def positions(self) -> list[tuple[W, int]]:
        """Each waiter with about how many of this queue start before it, soonest first: arrival order, or
        under fair sharing as ``ahead_of`` counts for it (its tenant's earlier waiters and, from each other
        tenant, at most one more). Sorting by the counters alone would put every waiter of the less served
        tenant first, however long its backlog: the light tenant's one request then looked hopeless behind
        the heavy one's whole queue, and was refused though its turn was next (bench/fairness.py)."""
        if not self.fair:
            return [(w, i) for i, w in enumerate(sorted(self._waiters(), key=lambda w: w.enqueued_at))]
        placed = [(w, self._turns_before(tenant, k)) for tenant, q in self._by_tenant.items() for k, w in enumerate(q)]
        return sorted(placed, key=lambda p: (p[1], self._rank_waiter(p[0])))

    def _turns_before(self, tenant: str, own_before: int) -> int:
        return own_before + sum(min(len(q), own_before + 1) for t, q in self._by_tenant.items() if t != tenant)

    def _waiters(self) -> Iterator[W]:
        return (w for q in self._by_tenant.values() for w in q)

    def append(self, waiter: W) -> None:
        queue = self._by_tenant.get(waiter.tenant)
        if not queue:
            self._counter.lift(waiter.tenant, (t for t, q in self._by_tenant.items() if q))
            queue = self._by_tenant[waiter.tenant] = deque()
        queue.append(waiter)
        self._size += 1

    def _rank_waiter(self, waiter: W):
        return (self._counter.of(waiter.tenant), waiter.enqueued_at) if self.fair else (waiter.enqueued_at,)

    def _next_tenant(self) -> str:
        heads = [(self._rank_waiter(q[0]), tenant) for tenant, q in self._by_tenant.items() if q]
        return min(heads)[1]

    def tenants(self) -> set[str]:
        """The tenants with requests waiting."""
        return {tenant for tenant, queue in self._by_tenant.items() if queue}

    def has(self, tenant: str) -> bool:
        return bool(self._by_tenant.get(tenant))

    def first_tenant_where(self, wanted: Callable[[str], bool]) -> str | None:
        """The tenant, among those for whom ``wanted`` holds, whose turn comes first; None if none."""
        heads = [(self._rank_waiter(q[0]), tenant) for tenant, q in self._by_tenant.items() if q and wanted(tenant)]
        return min(heads)[1] if heads else None

    def popleft_of(self, tenant: str) -> W:
        """That tenant's oldest waiter. KeyError if it has none."""
        return self._take(tenant, first=True)

    def peek(self) -> W:
        return self._by_tenant[self._next_tenant()][0]

    def popleft(self) -> W:
        """The next waiter to start. IndexError when empty."""
        if not self._size:
            raise IndexError("pop from an empty FairQueue")
        return self._take(self._next_tenant(), first=True)

    def pop(self) -> W:
        """The waiter to drop under overload: the newest of the most-served tenant (the newest overall, FIFO)."""
        if not self._size:
            raise IndexError("pop from an empty FairQueue")
        if self.fair:
            tenant = max((self._counter.of(t), q[-1].enqueued_at, t) for t, q in self._by_tenant.items() if q)[2]
        else:
            tenant = max((q[-1].enqueued_at, t) for t, q in self._by_tenant.items() if q)[1]
        return self._take(tenant, first=False)

    def _take(self, tenant: str, first: bool) -> W:
        queue = self._by_tenant[tenant]
        waiter = queue.popleft() if first else queue.pop()
        self._size -= 1
        if not queue:
            del self._by_tenant[tenant]
        return waiter

    def remove(self, waiter: W) -> None:
        """ValueError if absent."""
        queue = self._by_tenant.get(waiter.tenant)
        if queue is None:
            raise ValueError("waiter not queued")
        queue.remove(waiter)
        self._size -= 1
        if not queue:
            del self._by_tenant[waiter.tenant]
