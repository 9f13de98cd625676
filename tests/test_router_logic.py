"""Unit tests of the router's pure decisions: classification, admission, queues, circuit."""

from __future__ import annotations

import asyncio

import pytest

from deployments.router.admission import admit, decide_max_tokens, sequences
from deployments.router.circuit_breaker import CircuitBreaker, CircuitState
from deployments.router.classification import Classification, class_by_length, classify
from deployments.router.scheduler import (
    PriorityScheduler, QueueFull, QueueTimeout, Shed, class_to_shed, may_start, reserved_slots,
)
from deployments.router.settings import (
    AdmissionSettings, CircuitSettings, ClassificationSettings, PriorityClass as P, QueueSettings,
)
from deployments.router.validation import RequestProblem

CLS = ClassificationSettings()
ADM = AdmissionSettings()


# --- classification ----------------------------------------------------------


@pytest.mark.parametrize(
    "tokens, expected",
    [(0, P.HIGH), (127, P.HIGH), (128, P.MEDIUM), (2047, P.MEDIUM), (2048, P.LOW), (300_000, P.LOW)],
)
def test_class_by_length_boundaries(tokens, expected):
    assert class_by_length(tokens, CLS) is expected


def test_thresholds_come_from_settings():
    settings = ClassificationSettings(high_below_tokens=10, medium_below_tokens=20)
    assert class_by_length(15, settings) is P.MEDIUM


def test_thresholds_must_be_ordered():
    with pytest.raises(ValueError):
        ClassificationSettings(high_below_tokens=500, medium_below_tokens=100)


def test_header_may_lower_the_class():
    result = classify(10, "low", CLS)
    assert result == Classification(P.LOW, P.HIGH, overridden=True)


def test_header_may_not_raise_the_class_unless_allowed():
    refused = classify(5000, "high", CLS)
    assert isinstance(refused, RequestProblem) and refused.status == 400 and "5000 tokens" in refused.message
    allowed = classify(5000, "High ", ClassificationSettings(allow_priority_upgrade=True))
    assert allowed.priority is P.HIGH


@pytest.mark.parametrize("header", ["urgent", "0", "🔥", "x" * 10_000])
def test_unknown_header_value(header):
    problem = classify(10, header, CLS)
    assert isinstance(problem, RequestProblem) and problem.param == "x-priority"
    assert len(problem.message) < 200


def test_blank_header_is_ignored():
    assert classify(10, "  ", CLS).priority is P.HIGH


# --- admission -----------------------------------------------------------------


def test_unset_max_tokens_fits_cap_and_context():
    assert decide_max_tokens(None, 100, 8192, ADM) == (2048, False)
    assert decide_max_tokens(None, 2000, 2048, ADM) == (48, False)


def test_max_tokens_clamped_by_default():
    admitted = admit({"max_tokens": 5000}, 100, 32768, ADM)
    assert admitted.max_tokens == 2048 and admitted.clamped


def test_max_tokens_rejected_when_configured():
    problem = admit({"max_tokens": 5000}, 100, 32768, AdmissionSettings(over_cap="reject"))
    assert isinstance(problem, RequestProblem) and "2048" in problem.message


def test_prompt_plus_max_tokens_beyond_context_names_both_numbers():
    problem = admit({"max_tokens": 1000}, 1500, 2048, ADM)
    assert isinstance(problem, RequestProblem)
    assert "1500" in problem.message and "1000" in problem.message and "2048" in problem.message


def test_prompt_alone_beyond_context():
    problem = admit({}, 300_000, 2048, ADM)  # e.g. a 1 MB prompt
    assert isinstance(problem, RequestProblem) and "300000" in problem.message


def test_sampling_defaults_fill_only_unset_fields():
    admitted = admit({"temperature": 0.0, "top_p": None}, 10, 2048, ADM)
    assert "temperature" not in admitted.updates  # 0.0 is a real choice, not "unset"
    assert admitted.updates["top_p"] == 0.9
    assert admitted.updates["repetition_penalty"] == 1.1


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"n": 0}, "n"),
        ({"n": 5}, "n"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
    ],
)
def test_out_of_range_values_are_400(fields, param):
    problem = admit(fields, 10, 2048, ADM)
    assert isinstance(problem, RequestProblem) and problem.param == param and problem.status == 400


@pytest.mark.parametrize("prompts, n, refused", [(1, 4, False), (2, 2, False), (4, None, False),
                                                 (5, None, True), (2, 3, True), (64, 1, True)])
def test_a_completions_batch_counts_its_prompts_times_n_against_max_n(prompts, n, refused):
    problem = admit({"prompts": prompts, "n": n}, 10, 2048, ADM)
    assert isinstance(problem, RequestProblem) == refused
    if refused:
        assert problem.param == "prompt" and problem.status == 400
        assert f"{prompts} prompts" in problem.message and "separate requests" in problem.message


def test_sequences_are_prompts_times_n():
    assert sequences({}) == 1 and sequences({"n": 3}) == 3 and sequences({"prompts": 2, "n": 2}) == 4


def test_edges_at_the_limits_are_accepted():
    assert not isinstance(admit({"top_p": 1.0, "n": 4, "temperature": 2.0, "max_tokens": 2038}, 10, 2048, ADM), RequestProblem)


# --- queues and the concurrency window ------------------------------------------


def test_reserved_share_is_kept_for_high():
    settings = qs(window=8, reserved_for_high=0.25)
    assert reserved_slots(8, settings) == 2
    assert may_start(P.LOW, 5, settings) and not may_start(P.LOW, 6, settings)
    assert may_start(P.HIGH, 7, settings) and not may_start(P.HIGH, 8, settings)


def test_class_caps_inside_the_window():
    settings = qs(window=8, max_in_flight_per_class={"high": 8, "medium": 4, "low": 2})
    assert may_start(P.LOW, 1, settings, class_in_flight=1)
    assert not may_start(P.LOW, 2, settings, class_in_flight=2)
    assert may_start(P.MEDIUM, 2, settings, class_in_flight=0)


def test_capped_class_does_not_block_the_ones_below():
    async def scenario():
        sched = PriorityScheduler(qs(window=8, max_in_flight_per_class={"high": 1, "medium": 4, "low": 4}))
        await sched.acquire(P.HIGH, 1)
        queued_high = asyncio.create_task(sched.acquire(P.HIGH, 5))
        await asyncio.sleep(0)
        assert await sched.acquire(P.LOW, 1) == 0.0  # high is capped, the window is not full
        sched.release(P.HIGH)
        await queued_high
        assert sched.in_flight == 2

    run(scenario())


def test_yielding_class_starts_only_between_high_requests():
    settings = qs(window=8, yield_to_high={"low": 1, "medium": 4})
    assert not may_start(P.LOW, 1, settings, high_active=1)
    assert may_start(P.LOW, 0, settings, high_active=0)
    assert may_start(P.MEDIUM, 3, settings, high_active=3)
    assert not may_start(P.MEDIUM, 4, settings, high_active=4)
    assert may_start(P.MEDIUM, 4, settings, high_active=4, replicas=2)  # the threshold is per replica
    assert may_start(P.LOW, 1, QueueSettings(), high_active=5)  # no yielding unless configured


def test_yielding_low_waits_for_the_last_high_to_finish_or_give_up():
    async def scenario():
        sched = PriorityScheduler(qs(window=8, max_in_flight_per_class={"high": 1, "medium": 4, "low": 4},
                                                yield_to_high={"low": 1}))
        await sched.acquire(P.HIGH, 1)
        queued_high = asyncio.create_task(sched.acquire(P.HIGH, 0.05))
        low = asyncio.create_task(sched.acquire(P.LOW, 5))
        await asyncio.sleep(0)
        assert sched.depths() == {"high": 1, "medium": 0, "low": 1}
        with pytest.raises(QueueTimeout):
            await queued_high  # gives up: one high still runs, low still waits
        assert not low.done()
        sched.release(P.HIGH)
        await asyncio.wait_for(low, 1)
        assert sched.in_flight == 1

    run(scenario())


def test_window_reserve_and_caps_grow_with_the_pools_replicas():
    settings = qs(window=8, reserved_for_high=0.25, max_in_flight_per_class={"high": 8, "medium": 4, "low": 2})
    assert not may_start(P.HIGH, 8, settings, replicas=1) and may_start(P.HIGH, 31, settings, replicas=4)
    assert not may_start(P.MEDIUM, 24, settings, replicas=4)  # 32 less the 8 kept for high
    assert may_start(P.LOW, 7, settings, class_in_flight=7, replicas=4)
    assert not may_start(P.LOW, 8, settings, class_in_flight=8, replicas=4)
    assert may_start(P.HIGH, 0, settings, replicas=0)  # no replica counted yet: as one


def test_a_scaled_up_pool_lets_waiters_start():
    async def scenario():
        sched = PriorityScheduler(qs(window=1, reserved_for_high=0))
        await sched.acquire(P.HIGH, 1)
        waiting = asyncio.create_task(sched.acquire(P.HIGH, 5))
        await asyncio.sleep(0)
        assert not waiting.done()
        sched.set_replicas(2)
        await asyncio.wait_for(waiting, 1)
        assert sched.in_flight == 2 and sched.replicas == 2

    run(scenario())


def test_reserve_never_takes_the_whole_window():
    assert reserved_slots(1, QueueSettings(reserved_for_high=0.9)) == 0


def test_shedding_picks_the_least_urgent_class_below_the_arrival():
    assert class_to_shed({P.LOW: 3, P.MEDIUM: 1}, P.HIGH) is P.LOW
    assert class_to_shed({P.LOW: 0, P.MEDIUM: 1}, P.HIGH) is P.MEDIUM
    assert class_to_shed({P.LOW: 2}, P.LOW) is None
    assert class_to_shed({P.HIGH: 4}, P.MEDIUM) is None


def run(coro):
    return asyncio.run(coro)


def qs(window: int = 8, **fields) -> QueueSettings:
    """Queue settings whose window starts (and, unmeasured, stays) at ``window`` per replica."""
    fields.setdefault("max_in_flight_per_class", {"low": 2})
    return QueueSettings(window={"initial": window, "min": 1, "max": 256}, **fields)


def test_high_overtakes_queued_low_requests():
    async def scenario():
        sched = PriorityScheduler(qs(window=1, reserved_for_high=0))
        await sched.acquire(P.LOW, 1)  # occupies the only slot
        order = []

        async def worker(cls, tag):
            await sched.acquire(cls, 5)
            order.append(tag)
            sched.release(cls)

        tasks = [asyncio.create_task(worker(P.LOW, f"low{i}")) for i in range(3)]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(worker(P.HIGH, "high")))
        await asyncio.sleep(0)
        sched.release(P.LOW)
        await asyncio.gather(*tasks)
        return order

    assert run(scenario()) == ["high", "low0", "low1", "low2"]


def test_full_class_queue_is_refused():
    async def scenario():
        sched = PriorityScheduler(qs(window=1, capacity={"high": 1, "medium": 1, "low": 1}))
        await sched.acquire(P.HIGH, 1)
        waiting = asyncio.create_task(sched.acquire(P.LOW, 5))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await sched.acquire(P.LOW, 5)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert sched.depths()["low"] == 0 and sched.in_flight == 1

    run(scenario())


def test_overload_sheds_low_to_admit_high():
    async def scenario():
        sched = PriorityScheduler(qs(window=1, max_queued_total=2))
        await sched.acquire(P.LOW, 1)
        lows = [asyncio.create_task(sched.acquire(P.LOW, 5)) for _ in range(2)]
        await asyncio.sleep(0)
        high = asyncio.create_task(sched.acquire(P.HIGH, 5))
        await asyncio.sleep(0)
        with pytest.raises(Shed):
            await lows[1]  # the newest low request makes room
        sched.release(P.LOW)
        assert await high == pytest.approx(0, abs=1)
        assert sched.depths() == {"high": 0, "medium": 0, "low": 1}
        lows[0].cancel()

    run(scenario())


def test_deadline_while_queued_frees_the_place():
    async def scenario():
        sched = PriorityScheduler(qs(window=1))
        await sched.acquire(P.HIGH, 1)
        with pytest.raises(QueueTimeout):
            await sched.acquire(P.MEDIUM, 0.05)
        assert sched.depths()["medium"] == 0 and sched.in_flight == 1

    run(scenario())


# --- circuit breaker -----------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_circuit_opens_after_consecutive_faults_and_the_router_probes_it():
    clock = Clock()
    breaker = CircuitBreaker(CircuitSettings(failure_threshold=3, open_s=10), clock)
    for _ in range(2):
        breaker.record_failure()
    breaker.record_success()  # resets the streak
    for _ in range(3):
        assert breaker.try_pass() is None
        breaker.record_failure()
    assert breaker.state is CircuitState.OPEN and not breaker.probe_due()
    clock.now = 4.2
    assert breaker.try_pass() == 6  # Retry-After: the seconds left, rounded up
    clock.now = 10.5
    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.try_pass() is not None  # clients never probe; the router does
    assert breaker.probe_due()
    breaker.begin_probe()
    assert not breaker.probe_due()  # one probe at a time
    breaker.record_failure()
    assert breaker.state is CircuitState.OPEN
    clock.now = 21
    assert breaker.probe_due()
    breaker.begin_probe()
    breaker.record_success()
    assert breaker.state is CircuitState.CLOSED and breaker.try_pass() is None


def test_a_stall_trips_the_circuit_at_once_and_health_can_say_why():
    clock = Clock()
    breaker = CircuitBreaker(CircuitSettings(failure_threshold=5, open_s=10), clock)
    breaker.record_failure("engine error 500: boom")
    assert breaker.state is CircuitState.CLOSED and breaker.last_fault == "engine error 500: boom"
    breaker.trip("stall: no output for 15s")
    assert breaker.state is CircuitState.OPEN
    assert breaker.describe() == {"state": "open", "consecutive_faults": 2, "last_fault": "stall: no output for 15s"}


# --- settings changed on a running router (Router.reconfigure) ----------------------


def test_a_new_queue_capacity_applies_to_the_next_request_and_queued_ones_keep_their_places():
    async def scenario():
        sched = PriorityScheduler(qs(window=1, capacity={"high": 4, "medium": 4, "low": 4}))
        await sched.acquire(P.HIGH, 1)
        queued = [asyncio.create_task(sched.acquire(P.LOW, 5)) for _ in range(2)]
        await asyncio.sleep(0)
        sched.apply(qs(window=1, capacity={"high": 4, "medium": 4, "low": 1}))
        assert sched.depths()["low"] == 2  # nobody queued is dropped by the smaller capacity
        with pytest.raises(QueueFull):
            await sched.acquire(P.LOW, 5)
        sched.release(P.HIGH)
        assert await queued[0] >= 0  # the first in line still starts first
        queued[1].cancel()

    run(scenario())


def test_a_new_class_cap_lets_waiters_start_at_once():
    async def scenario():
        sched = PriorityScheduler(qs(window=4, max_in_flight_per_class={"low": 1}))
        await sched.acquire(P.LOW, 1)
        waiting = asyncio.create_task(sched.acquire(P.LOW, 5))
        await asyncio.sleep(0)
        assert not waiting.done()
        sched.apply(qs(window=4, max_in_flight_per_class={"low": 2}))
        assert sched.running(P.LOW) == 2  # started by the apply itself, not by the next release
        assert await asyncio.wait_for(waiting, 1) >= 0

    run(scenario())


def test_new_window_bounds_clamp_what_the_window_learnt():
    from deployments.router.settings import WindowSettings
    from deployments.router.window import AdaptiveWindow

    window = AdaptiveWindow(WindowSettings(initial=64, max=512), tpot_slo_s=0.05)
    window.apply(WindowSettings(initial=4, min=2, max=16), tpot_slo_s=0.1)
    assert window.per_replica == 16
    window.apply(WindowSettings(initial=32, min=32, max=64), tpot_slo_s=0.1)
    assert window.per_replica == 32


def test_new_circuit_thresholds_count_the_faults_already_seen():
    breaker = CircuitBreaker(CircuitSettings(failure_threshold=5))
    for _ in range(2):
        breaker.record_failure("replica error")
    assert breaker.state is CircuitState.CLOSED
    breaker.apply(CircuitSettings(failure_threshold=3))
    breaker.record_failure("replica error")
    assert breaker.state is CircuitState.OPEN
