"""Tenancy's pure parts: the tenants file and keys, token buckets and headers, the quota ledger
shared by router replicas, and fair sharing by the Virtual Token Counter."""

from __future__ import annotations

import asyncio
import itertools

import pytest
import yaml
from pydantic import ValidationError

from deployments.router.scheduler import PriorityScheduler
from deployments.router.settings import PriorityClass, QueueSettings
from deployments.tenancy.fairness import FairQueue, VirtualTokenCounter, cost
from deployments.tenancy.ledger import Ledger, QuotaClient, RateLimited, Ticket
from deployments.tenancy.limits import TokenBucket, duration
from deployments.tenancy.tenants import (INCORRECT, MISSING, WRONG_SCHEME, AuthFailure, Caller, KeyRing, Tier,
                                         TenantsFile, digest)

KEY_A, KEY_B = "sk-tenant-a-0123456789", "sk-tenant-b-0123456789"


def tenants_doc(**tenants) -> dict:
    return {"sharing": "fair",
            "tiers": {"standard": {"max_class": "high", "requests_per_minute": 600, "tokens_per_minute": 100000,
                                   "max_concurrent": 8},
                      "batch": {"max_class": "low", "requests_per_minute": 6, "tokens_per_minute": 1000,
                                "max_concurrent": 1}},
            "tenants": tenants or {"a": {"tier": "standard", "key_sha256": [digest(KEY_A)]},
                                   "b": {"tier": "batch", "key_sha256": [digest(KEY_B)]}}}


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def write(path, doc):
    path.write_text(yaml.safe_dump(doc))


# --- the tenants file and keys ----------------------------------------------------------------------------------


def test_the_file_holds_digests_never_keys():
    doc = tenants_doc(a={"tier": "standard", "key_sha256": [KEY_A]})
    with pytest.raises(ValidationError, match="SHA-256 hex digests"):
        TenantsFile.model_validate(doc)


def test_a_tenant_must_name_a_known_tier_and_a_digest_belongs_to_one_tenant():
    with pytest.raises(ValidationError, match="names tier"):
        TenantsFile.model_validate(tenants_doc(a={"tier": "gold", "key_sha256": [digest(KEY_A)]}))
    with pytest.raises(ValidationError, match="both"):
        TenantsFile.model_validate(tenants_doc(a={"tier": "standard", "key_sha256": [digest(KEY_A)]},
                                               b={"tier": "batch", "key_sha256": [digest(KEY_A)]}))


@pytest.mark.parametrize("header, message", [
    (None, MISSING), ("", MISSING), ("Bearer", MISSING), ("Bearer   ", MISSING),
    (f"Basic {KEY_A}", WRONG_SCHEME), (KEY_A, WRONG_SCHEME),
    ("Bearer sk-unknown", INCORRECT),
    (f"Bearer {KEY_A[:-1]}8", INCORRECT),  # one character off: the same answer as an unknown key
    (f"Bearer {KEY_A} ", None), (f"bearer {KEY_A}", None),
])
def test_authentication_forms(tmp_path, header, message):
    path = tmp_path / "tenants.yaml"
    write(path, tenants_doc())
    ring = KeyRing(str(path))
    if message is None:
        assert ring.authenticate(header) == Caller("a", ring.file.tier_of("a"))
        return
    with pytest.raises(AuthFailure) as failure:
        ring.authenticate(header)
    assert str(failure.value) == message
    assert "a" not in str(failure.value).split() and KEY_A not in str(failure.value)


def test_rotation_two_keys_then_one_without_a_restart(tmp_path):
    path, clock = tmp_path / "tenants.yaml", Clock()
    write(path, tenants_doc())
    ring = KeyRing(str(path), reload_s=2, clock=clock)
    new_key = "sk-tenant-a-rotated"
    write(path, tenants_doc(a={"tier": "standard", "key_sha256": [digest(KEY_A), digest(new_key)]}))
    assert ring.authenticate(f"Bearer {KEY_A}").tenant == "a"
    with pytest.raises(AuthFailure):  # not re-read before reload_s
        ring.authenticate(f"Bearer {new_key}")
    clock.now += 2
    assert ring.authenticate(f"Bearer {new_key}").tenant == "a"
    assert ring.authenticate(f"Bearer {KEY_A}").tenant == "a"
    write(path, tenants_doc(a={"tier": "standard", "key_sha256": [digest(new_key)]}))
    clock.now += 2
    with pytest.raises(AuthFailure):
        ring.authenticate(f"Bearer {KEY_A}")
    assert ring.authenticate(f"Bearer {new_key}").tenant == "a"


def test_a_broken_edit_keeps_the_previous_file(tmp_path):
    path, clock = tmp_path / "tenants.yaml", Clock()
    write(path, tenants_doc())
    ring = KeyRing(str(path), reload_s=1, clock=clock)
    path.write_text("tiers: [this is not a tiers map")
    clock.now += 1
    assert ring.authenticate(f"Bearer {KEY_A}").tenant == "a"
    assert ring.version == 1


def test_a_missing_file_at_start_is_an_error(tmp_path):
    with pytest.raises(OSError):
        KeyRing(str(tmp_path / "absent.yaml"))


# --- buckets and headers ------------------------------------------------------------------------------------------


def test_token_bucket_refills_at_its_rate_and_reports_the_wait():
    bucket = TokenBucket(60, now=0.0)  # one per second
    assert bucket.take(100, 0.0) == 60
    assert bucket.take(1, 0.5) == 0
    assert bucket.seconds_until(1, 0.5) == pytest.approx(0.5)
    assert bucket.take(1, 1.0) == 1
    assert bucket.seconds_to_full(1.0) == pytest.approx(60)
    bucket.give_back(30, 1.0)
    assert bucket.remaining(1.0) == pytest.approx(30)
    assert bucket.seconds_until(61, 1.0) == float("inf")


def test_openai_duration_format():
    assert [duration(s) for s in (0.02, 0.9994, 1, 6, 59.2, 60, 361)] == ["20ms", "1000ms", "1s", "6s", "1m0s",
                                                                         "1m0s", "6m1s"]


# --- the ledger shared by router replicas ------------------------------------------------------------------------


class _Method:
    def __init__(self, fn):
        self.fn = fn

    async def remote(self, *args):
        return self.fn(*args)


class FakeHandle:
    """A TenantLedger deployment handle, in process: ``.lease.remote(...)``."""

    def __init__(self, ledger: Ledger):
        self.calls = 0

        def counted(fn):
            def call(*args):
                self.calls += 1
                return fn(*args)
            return call
        self.lease = _Method(counted(ledger.lease))
        self.give_back = _Method(ledger.give_back)
        self.renew = _Method(ledger.renew)


def tier(**limits) -> Tier:
    values = {"requests_per_minute": 600, "tokens_per_minute": 100000, "max_concurrent": 100} | limits
    return Tier(**values)


def run(coro):
    return asyncio.run(coro)


def test_a_limit_holds_across_two_router_replicas_exactly():
    clock = Clock()
    ledger = Ledger(clock)
    handle = FakeHandle(ledger)
    caller = Caller("a", tier(requests_per_minute=6))

    async def scenario():
        routers = [QuotaClient(handle, "r1", clock), QuotaClient(handle, "r2", clock)]
        results = [await router.admit(caller, 10) for router, _ in zip(itertools.cycle(routers), range(10))]
        for ticket in results:
            if isinstance(ticket, Ticket):
                ticket.finish(10)
        return results

    results = run(scenario())
    admitted = [r for r in results if isinstance(r, Ticket)]
    refused = [r for r in results if isinstance(r, RateLimited)]
    assert len(admitted) == 6 and len(refused) == 4
    assert refused[0].headers["x-ratelimit-limit-requests"] == "6"
    assert refused[0].headers["x-ratelimit-remaining-requests"] == "0"
    assert "requests per min" in refused[0].message and refused[0].retry_after_s >= 1


def test_a_busy_tenant_calls_the_ledger_once_per_chunk_not_per_request():
    clock = Clock()
    handle = FakeHandle(Ledger(clock))
    caller = Caller("a", tier(requests_per_minute=6000, tokens_per_minute=10_000_000, max_concurrent=1000))

    async def scenario():
        router = QuotaClient(handle, "r1", clock)
        for _ in range(200):
            ticket = await router.admit(caller, 100)
            assert isinstance(ticket, Ticket)
            ticket.finish(50)

    run(scenario())
    assert handle.calls <= 200 / (6000 * 0.05) + 1


def test_tokens_are_reserved_at_admission_and_corrected_at_the_end():
    clock = Clock()
    handle = FakeHandle(Ledger(clock))
    caller = Caller("a", tier(tokens_per_minute=1000))

    async def scenario():
        router = QuotaClient(handle, "r1", clock)
        first = await router.admit(caller, 600)
        assert isinstance(first, Ticket)
        second = await router.admit(caller, 600)  # 1200 reserved would pass the limit
        assert isinstance(second, RateLimited) and "tokens per min" in second.message
        first.finish(100)  # it used 100: 500 come back
        await asyncio.sleep(0)  # (what this replica holds beyond a chunk goes back in the background)
        third = await router.admit(caller, 600)
        assert isinstance(third, Ticket)
        too_large = await router.admit(caller, 1001)
        assert isinstance(too_large, RateLimited) and "too large" in too_large.message

    run(scenario())


def test_concurrency_across_replicas_and_a_finished_request_frees_its_slot_for_the_other():
    clock = Clock()
    handle = FakeHandle(Ledger(clock))
    caller = Caller("a", tier(max_concurrent=1))

    async def scenario():
        r1, r2 = QuotaClient(handle, "r1", clock), QuotaClient(handle, "r2", clock)
        first = await r1.admit(caller, 10)
        assert isinstance(first, Ticket)
        refused = await r2.admit(caller, 10)
        assert isinstance(refused, RateLimited) and "concurrent" in refused.message
        first.finish(10)
        await asyncio.sleep(0)  # the give-back is sent in the background
        assert isinstance(await r2.admit(caller, 10), Ticket)

    run(scenario())


def test_a_lost_router_replica_frees_its_slots():
    clock = Clock()
    ledger = Ledger(clock)
    limits = tier(max_concurrent=2)
    from deployments.tenancy.ledger import HOLDER_EXPIRY_S, Amounts
    assert ledger.lease("a", limits, Amounts(1, 1, 2), "gone").granted.slots == 2
    assert ledger.lease("a", limits, Amounts(1, 1, 1), "alive").granted.slots == 0
    clock.now += HOLDER_EXPIRY_S + 1
    assert ledger.lease("a", limits, Amounts(1, 1, 1), "alive").granted.slots == 1


def test_renew_corrects_the_ledger_to_what_a_replica_really_holds():
    clock = Clock()
    ledger = Ledger(clock)
    limits = tier(max_concurrent=2)
    from deployments.tenancy.ledger import Amounts
    ledger.lease("a", limits, Amounts(0, 0, 2), "r1", seq=1)
    ledger.renew("r1", {"a": 0}, seq=2)  # a give-back was lost; the replica holds none
    assert ledger.lease("a", limits, Amounts(0, 0, 2), "r2").granted.slots == 2


def test_a_renewal_overtaken_by_a_newer_lease_does_not_erase_it():
    ledger = Ledger(Clock())
    limits = tier(max_concurrent=1)
    from deployments.tenancy.ledger import Amounts
    ledger.lease("a", limits, Amounts(0, 0, 1), "r1", seq=5)  # sent after the renewal below, applied first
    ledger.renew("r1", {"a": 0}, seq=4)
    assert ledger.lease("a", limits, Amounts(0, 0, 1), "r2").granted.slots == 0


def test_an_unreachable_ledger_admits_without_limits():
    class Broken:
        class lease:
            @staticmethod
            async def remote(*args):
                raise ConnectionError("ledger restarting")

    async def scenario():
        ticket = await QuotaClient(Broken(), "r1").admit(Caller("a", tier()), 10)
        assert isinstance(ticket, Ticket)
        ticket.finish(5)  # nothing to give back

    run(scenario())


# --- fair sharing --------------------------------------------------------------------------------------------------


class W:
    def __init__(self, tenant, at):
        self.tenant, self.enqueued_at = tenant, at


def test_vtc_serves_the_light_tenant_before_the_heavy_ones_backlog():
    counter = VirtualTokenCounter()
    queue = FairQueue(counter)
    for i in range(10):
        queue.append(W("heavy", i))
    queue.append(W("light", 10))
    order = []
    while queue:
        waiter = queue.popleft()
        counter.charge(waiter.tenant, cost(100, 100))  # as the scheduler charges a start
        order.append(waiter.tenant)
    assert order.index("light") <= 1, order


def test_vtc_lifts_an_arriving_tenant_so_idleness_banks_no_credit():
    counter = VirtualTokenCounter()
    queue = FairQueue(counter)
    counter.charge("heavy", 1000)
    queue.append(W("heavy", 0))
    queue.append(W("light", 1))  # arrives with nothing waiting: lifted to heavy's 1000
    assert counter.of("light") == 1000
    assert queue.popleft().tenant == "heavy"  # a tie: the older first
    counter.charge("heavy", 10)
    assert queue.popleft().tenant == "light"


def test_fifo_mode_is_arrival_order_and_the_shed_victim_is_the_most_served_tenants_newest():
    counter = VirtualTokenCounter()
    queue = FairQueue(counter, fair=False)
    for i, tenant in enumerate(["a", "a", "b"]):
        queue.append(W(tenant, i))
    assert [queue.popleft().tenant for _ in range(3)] == ["a", "a", "b"]
    queue.fair = True
    for i, tenant in enumerate(["a", "b", "b"]):
        queue.append(W(tenant, i))
    counter.charge("a", 5000)
    assert queue.pop().tenant == "a"
    assert len(queue) == 2 and [w.tenant for w in queue] == ["b", "b"]


def test_scheduler_lets_a_light_tenant_start_next_and_settles_its_charge():
    settings = QueueSettings(window={"initial": 1, "min": 1, "max": 4}, reserved_for_high=0.0)

    async def scenario():
        scheduler = PriorityScheduler(settings)
        scheduler.set_window(1)
        high = PriorityClass.HIGH
        await scheduler.acquire(high, 10, 64, "heavy", cost(10, 64))  # runs
        started = []

        async def one(tenant, n):
            await scheduler.acquire(high, 10, 64, tenant, cost(10, 64))
            started.append((tenant, n))

        tasks = [asyncio.create_task(one("heavy", n)) for n in range(5)]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(one("light", 0)))
        await asyncio.sleep(0)
        for _ in range(6):
            scheduler.release(high)
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        assert started.index(("light", 0)) <= 1, started
        before = scheduler.counter.of("light")
        scheduler.settle("light", cost(10, 8) - cost(10, 64))
        assert scheduler.counter.of("light") == before - 2 * 56

    asyncio.run(scenario())


def test_a_light_tenants_forecast_counts_its_turn_not_the_heavy_backlog():
    counter = VirtualTokenCounter()
    queue = FairQueue(counter)
    for i in range(10):
        queue.append(W("heavy", i))
    assert queue.ahead_of("light") == 1  # one heavy turn, then its own
    assert queue.ahead_of("heavy") == 10
    queue.fair = False
    assert queue.ahead_of("light") == 10


# --- the tenants' reserve of the window ------------------------------------------------------------


def reserve_scheduler(window: int = 8, reserve: bool = True) -> PriorityScheduler:
    settings = QueueSettings(window={"initial": window, "min": 1, "max": 256}, reserved_for_high=0,
                             tenant_reserve=0.25, max_in_flight_per_class={})
    scheduler = PriorityScheduler(settings)
    scheduler.set_sharing(fair=True, reserve=reserve)
    return scheduler


def test_a_heavy_tenant_leaves_the_reserve_free_and_a_light_one_starts_at_once_past_its_backlog():
    async def scenario():
        sched = reserve_scheduler()
        assert sched.reserved_for_tenants() == 2  # 25% of 8
        for _ in range(6):
            assert await sched.acquire(PriorityClass.HIGH, 1, tenant="A", cost=10) == 0.0
        backlog = [asyncio.create_task(sched.acquire(PriorityClass.HIGH, 5, tenant="A", cost=10)) for _ in range(3)]
        await asyncio.sleep(0)
        assert sched.in_flight == 6 and sched.depths()["high"] == 3  # A stops short of the reserve
        assert sched.window_bound()  # the window counts as in use: it may grow
        assert sched.free_slots(PriorityClass.HIGH, "B") == 2 and sched.free_slots(PriorityClass.HIGH, "A") == 0
        # B runs less than its fair share (8 / 2 tenants): both its requests start at once, past A's backlog.
        assert await sched.acquire(PriorityClass.HIGH, 1, tenant="B", cost=10) == 0.0
        assert await sched.acquire(PriorityClass.HIGH, 1, tenant="B", cost=10) == 0.0
        third_b = asyncio.create_task(sched.acquire(PriorityClass.HIGH, 5, tenant="B", cost=10))
        await asyncio.sleep(0)
        assert not third_b.done()  # the reserve is full: B's next waits its turn like anyone's
        sched.release(PriorityClass.HIGH, "A")  # a shared slot: VTC lifted B to A's count, A came first
        assert sched.depths()["high"] == 3 and not third_b.done()
        sched.release(PriorityClass.HIGH, "B")  # one of B's reserve slots: B is under its share, so it is B's
        assert await asyncio.wait_for(third_b, 1) >= 0
        assert sched.depths()["high"] == 2
        for task in backlog:
            task.cancel()

    run(scenario())


def test_a_tenant_at_its_fair_share_does_not_take_the_reserve():
    async def scenario():
        sched = reserve_scheduler(window=8)  # reserve 2, fair share of two tenants: 4 each
        for _ in range(4):
            await sched.acquire(PriorityClass.HIGH, 1, tenant="A", cost=10)
        for _ in range(2):
            await sched.acquire(PriorityClass.HIGH, 1, tenant="B", cost=10)
        # shared slots (6) are full; B runs 2 < 4: reserve; A runs 4 = its share: waits
        waiting_a = asyncio.create_task(sched.acquire(PriorityClass.HIGH, 5, tenant="A", cost=10))
        await asyncio.sleep(0)
        assert not waiting_a.done()
        assert await sched.acquire(PriorityClass.HIGH, 1, tenant="B", cost=10) == 0.0
        waiting_a.cancel()

    run(scenario())


def test_a_newcomer_queued_behind_a_full_window_takes_the_reserve_when_it_frees():
    async def scenario():
        sched = reserve_scheduler(window=4)  # reserve: 1 slot
        for tenant in ("A", "A", "A", "C"):
            await sched.acquire(PriorityClass.HIGH, 1, tenant=tenant)  # C took the reserve
        waiting_b = asyncio.create_task(sched.acquire(PriorityClass.HIGH, 5, tenant="B"))
        waiting_a = asyncio.create_task(sched.acquire(PriorityClass.HIGH, 5, tenant="A"))
        await asyncio.sleep(0)
        assert not waiting_b.done() and not waiting_a.done()
        sched.release(PriorityClass.HIGH, "C")
        assert await asyncio.wait_for(waiting_b, 1) >= 0  # the reserve freed: only a newcomer may take it
        assert not waiting_a.done() and sched.depths()["high"] == 1
        waiting_a.cancel()

    run(scenario())


@pytest.mark.parametrize("reserve", [False, True])
def test_without_the_reserve_or_with_one_tenant_only_queued_the_window_fills(reserve):
    async def scenario():
        sched = reserve_scheduler(reserve=reserve)
        for _ in range(8 if not reserve else 6):
            assert await sched.acquire(PriorityClass.HIGH, 1, tenant="A") == 0.0
        assert sched.in_flight == (8 if not reserve else 6)

    run(scenario())


def test_after_a_window_cut_a_newcomer_still_starts_in_the_reserve():
    """A cut leaves the heavy tenant's running requests over the new window; the reserve is a pool of its
    own, so a light tenant still starts at once (the window is passed by at most the reserve)."""
    async def scenario():
        sched = reserve_scheduler(window=8)  # reserve: 2
        for _ in range(6):
            await sched.acquire(PriorityClass.HIGH, 1, tenant="A", cost=10)
        sched.set_window(4)  # TPOT over the SLO: cut; A's six keep running
        assert sched.reserved_for_tenants() == 1 and sched.free_slots(PriorityClass.HIGH, "A") == 0
        assert sched.free_slots(PriorityClass.HIGH, "B") == 1
        assert await sched.acquire(PriorityClass.HIGH, 1, tenant="B", cost=10) == 0.0
        late = asyncio.create_task(sched.acquire(PriorityClass.HIGH, 5, tenant="C", cost=10))
        await asyncio.sleep(0)
        assert not late.done()  # the reserve (one slot at window 4) is taken: C waits
        late.cancel()

    run(scenario())
