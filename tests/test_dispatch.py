"""One request's life (router/dispatch.py) against a fake replica handle: statuses, slots, circuit, aborts."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from starlette.responses import JSONResponse, StreamingResponse

from deployments.router.budgets import decide_budgets
from deployments.router.cancellation import TrackingHandle
from deployments.router.circuit_breaker import CircuitState
from deployments.router.dispatch import RequestLife, RequestPlan
from deployments.router.pool import PoolState
from deployments.router.pools import PoolRoute
from deployments.router.settings import CircuitSettings, PriorityClass as P, QueueSettings
from deployments.server.load_report import ReplicaLoad


class FakeCall:
    def __init__(self):
        self.cancelled = False

    def cancel(self):
        self.cancelled = True


class FakeMethod:
    def __init__(self):
        self.calls: list[FakeCall] = []

    def remote(self, *args, **kwargs):
        self.calls.append(FakeCall())
        return self.calls[-1]


class FakeHandle:
    deployment_name = "ObservedLLMServer:main:fake"

    def __init__(self):
        self.chat = FakeMethod()

    def options(self, **kwargs):
        return self


def make_pool(ready=True, window=2, max_window=8, **queues) -> PoolState:
    settings = QueueSettings(window={"initial": window, "min": 1, "max": max_window}, reserved_for_high=0, stall_s=0.3,
                             **queues)
    pool = PoolState(PoolRoute("main", frozenset({"high", "medium", "low"}), 4096, True), FakeHandle(), "fake",
                     settings, CircuitSettings(failure_threshold=2, open_s=30))
    pool.ready = ready
    return pool


def measured(pool: PoolState, tpot_s: float | None, last_s: float | None = None) -> None:
    """As if the watch had just polled the engine: a fresh TPOT (None: nothing decoded lately) and the
    last one measured at all."""
    pool._tpot_s = tpot_s
    pool._last_tpot_s = tpot_s if last_s is None else last_s


def plan(pool: PoolState, cls=P.HIGH, stream=False, timeout=None, max_tokens=4) -> RequestPlan:
    budgets = decide_budgets(pool.queue_settings.targets(cls), pool.queue_settings, max_tokens, time.monotonic(),
                             timeout)
    return RequestPlan(cls=cls, pool="main", max_tokens=max_tokens, budgets=budgets, stream=stream, headers={"x-request-id": "t"})


def replica_call(pool: PoolState):
    """What OpenAiIngress does: call the (tracked) handle; returns the fake call for inspection."""
    return TrackingHandle(pool.streaming_handle).chat.remote()


def run(coro):
    return asyncio.run(coro)


def status_and_message(response):
    body = json.loads(response.body)
    return response.status_code, body["error"]["message"]


async def read_stream(response: StreamingResponse) -> list[str]:
    return [chunk async for chunk in response.body_iterator]


def run_stream(request_plan: RequestPlan, pool: PoolState, chunks: list[str]) -> list[str]:
    """Run a streamed request whose replica answers ``chunks`` at once; return what the client read."""
    async def body():
        for chunk in chunks:
            yield chunk

    async def call():
        replica_call(pool)
        return StreamingResponse(body(), media_type="text/event-stream")

    async def scenario():
        return await read_stream(await RequestLife(request_plan, pool).run(call))

    return run(scenario())


def test_a_loading_pool_answers_503_at_once_and_spends_nothing():
    pool = make_pool(ready=False)

    async def never():
        raise AssertionError("the replica must not be called")

    response = run(RequestLife(plan(pool), pool).run(never))
    status, message = status_and_message(response)
    assert status == 503 and "loading" in message and int(response.headers["retry-after"]) >= 1


def test_served_request_releases_its_slot_and_counts_as_success():
    pool = make_pool()

    async def call():
        replica_call(pool)
        return JSONResponse({"ok": True})

    response = run(RequestLife(plan(pool), pool).run(call))
    assert response.status_code == 200 and response.headers["x-queue-wait-ms"] == "0"
    assert pool.scheduler.in_flight == 0 and pool.circuit.state is CircuitState.CLOSED


def test_predicted_wait_beyond_the_start_deadline_is_429_with_that_wait():
    pool = make_pool(window=1)
    pool.service[P.HIGH].record(50.0, 4)  # measured: a high request holds its slot for 50 s
    measured(pool, 0.045)  # and the engine is near its SLO: the window will not grow

    async def scenario():
        await pool.scheduler.acquire(P.HIGH, 1)  # the window is full

        async def never():
            raise AssertionError("the replica must not be called")

        return await RequestLife(plan(pool), pool).run(never)

    response = run(scenario())
    status, message = status_and_message(response)
    assert status == 429 and "start deadline" in message
    assert int(response.headers["retry-after"]) == 50  # one slot frees in 50 s


def test_start_deadline_in_prefill_aborts_the_engine_request_and_is_not_a_fault():
    pool = make_pool()
    pool.service[P.HIGH].record(0.01, 4)  # predicted to fit; this one then hangs in prefill
    measured(pool, 0.001)
    made = []

    async def slow_first_token():
        made.append(replica_call(pool))
        await asyncio.sleep(5)

    response = run(RequestLife(plan(pool, stream=True, timeout="0.2"), pool).run(slow_first_token))
    status, message = status_and_message(response)
    assert status == 504 and "start deadline" in message and made[0].cancelled
    assert pool.scheduler.in_flight == 0 and pool.circuit.describe()["consecutive_faults"] == 0


SHORT_START = {c: {"ttft_s": 1.0, "tpot_s": 0.05, "start_deadline_s": 0.1} for c in ("high", "medium", "low")}


@pytest.mark.parametrize("classes, timeout, status", [
    (None, "0.1", 504),          # the client's X-Request-Timeout ran out: its own timeout, 504
    (SHORT_START, None, 429),    # the class's start deadline: a refusal for load, with Retry-After
])
def test_expiry_in_the_queue_spends_no_engine_work(classes, timeout, status):
    pool = make_pool(window=1, **({"classes": classes} if classes else {}))
    pool.service[P.HIGH].record(0.01, 4)  # predicted to start at once; the running one then never ends
    measured(pool, 0.001)

    async def scenario():
        await pool.scheduler.acquire(P.HIGH, 1)

        async def never():
            raise AssertionError("the replica must not be called")

        return await RequestLife(plan(pool, timeout=timeout), pool).run(never)

    response = run(scenario())
    got, message = status_and_message(response)
    assert got == status and "no engine work" in message
    if status == 429:
        assert "start deadline" in message and int(response.headers["retry-after"]) >= 1


def test_before_anything_finished_a_queued_request_is_shed_on_the_engines_measured_speed():
    # Nothing of the class has finished (no service mean), but the engine's TPOT is known: 128 tokens
    # at 0.2 s are 25.6 s a request, so with one slot the second waiter cannot start within 30 s.
    pool = make_pool(window=1, max_window=1)
    measured(pool, 0.2)

    async def scenario():
        first = await RequestLife(plan(pool, max_tokens=128), pool)._acquire()
        assert first == 0.0
        pool.started("first", P.HIGH, 128)
        second = asyncio.create_task(RequestLife(plan(pool, max_tokens=128), pool)._acquire())
        third = asyncio.create_task(RequestLife(plan(pool, max_tokens=128), pool)._acquire())
        await asyncio.sleep(0)
        pool._shed_hopeless()
        refused = await third
        assert not second.done()
        second.cancel()
        return refused

    status, message = status_and_message(run(scenario()))
    assert status == 429 and "could no longer start by its start deadline" in message


def test_with_nothing_measured_at_all_nothing_is_shed_from_the_queue():
    pool = make_pool(window=1, max_window=1)

    async def scenario():
        await pool.scheduler.acquire(P.HIGH, 30, 4096)
        waiting = [asyncio.create_task(pool.scheduler.acquire(P.HIGH, 30, 4096)) for _ in range(3)]
        await asyncio.sleep(0)
        pool._shed_hopeless()
        assert pool.scheduler.depths()["high"] == 3
        for task in waiting:
            task.cancel()

    run(scenario())


def test_a_stall_ends_the_stream_aborts_it_and_counts_as_a_fault():
    pool = make_pool()
    made = []

    async def tokens_then_silence():
        yield "data: {}\n\n"
        await asyncio.sleep(10)

    async def call():
        made.append(replica_call(pool))
        return StreamingResponse(tokens_then_silence(), media_type="text/event-stream")

    async def scenario():
        response = await RequestLife(plan(pool, stream=True, max_tokens=1000), pool).run(call)
        return await read_stream(response)

    chunks = run(scenario())
    assert '"code": 504' in chunks[-2] and "no output" in chunks[-2] and chunks[-1] == "data: [DONE]\n\n"
    assert made[0].cancelled and pool.scheduler.in_flight == 0
    assert pool.circuit.state is CircuitState.OPEN  # one stall opens it: a hung engine, not a blip
    assert "stall" in pool.circuit.last_fault and "no output" in pool.circuit.last_fault


def test_an_engine_error_inside_a_stream_is_a_fault_not_a_success_and_the_stream_ends():
    pool = make_pool()
    made = []
    dead = '{"error": {"message": "EngineCore encountered an issue", "type": "InternalServerError", "code": 500}}'

    async def tokens_then_engine_error():
        yield "data: {}\n\n"
        yield f"data: {dead}\n\n"
        yield "data: {}\n\n"  # nothing after the error reaches the client

    async def call():
        made.append(replica_call(pool))
        return StreamingResponse(tokens_then_engine_error(), media_type="text/event-stream")

    async def scenario():
        response = await RequestLife(plan(pool, stream=True, max_tokens=100), pool).run(call)
        return await read_stream(response)

    chunks = run(scenario())
    assert dead in chunks[-2] and chunks[-1] == "data: [DONE]\n\n" and len(chunks) == 3
    assert pool.circuit.describe()["consecutive_faults"] == 1 and "EngineCore" in pool.circuit.last_fault
    assert pool.service[P.HIGH].mean_s is None  # not counted as served
    assert made[0].cancelled and pool.scheduler.in_flight == 0


def test_a_stream_that_keeps_flowing_is_not_killed_and_completes():
    pool = make_pool()

    async def steady():
        for _ in range(10):
            await asyncio.sleep(0.05)  # below stall_s, and 10 x 50 ms is within the budget
            yield "data: {}\n\n"

    async def call():
        replica_call(pool)
        return StreamingResponse(steady(), media_type="text/event-stream")

    async def scenario():
        response = await RequestLife(plan(pool, stream=True, max_tokens=10), pool).run(call)
        return await read_stream(response)

    assert len(run(scenario())) == 10 and pool.service[P.HIGH].mean_s > 0


def test_a_long_prompt_counts_as_in_prefill_until_its_first_token():
    seen = {}

    def call_on(pool):
        async def call():
            seen["during"] = pool.prefilling  # the replica is prefilling the prompt now
            replica_call(pool)

            async def tokens():
                yield "data: {}\n\n"
            return StreamingResponse(tokens(), media_type="text/event-stream")
        return call

    pool = make_pool()

    async def scenario():
        response = await RequestLife(plan(pool, cls=P.LOW, stream=True), pool).run(call_on(pool))
        seen["after_first_token"] = bool(pool._prefilling)
        await read_stream(response)

    run(scenario())
    assert seen == {"during": True, "after_first_token": False}
    assert pool.prefilling  # its steps are still in the engine's smoothed TPOT for a moment
    high = make_pool()
    run(RequestLife(plan(high, stream=True), high).run(call_on(high)))
    assert seen["during"] is False  # a short (high) prompt is not interference


def test_replica_errors_open_the_circuit_then_requests_get_503_without_a_call():
    pool = make_pool()

    async def broken():
        raise RuntimeError("engine dead")

    for _ in range(2):
        assert run(RequestLife(plan(pool), pool).run(broken)).status_code == 503
    assert pool.circuit.state is CircuitState.OPEN
    status, message = status_and_message(run(RequestLife(plan(pool), pool).run(broken)))
    assert status == 503 and "circuit open" in message


def test_two_router_replicas_each_keep_half_of_the_pools_window():
    alone, first, second = make_pool(window=8), make_pool(window=8), make_pool(window=8)
    for pool in (first, second):
        pool.set_router_replicas(2)
    assert first.scheduler.window + second.scheduler.window == alone.scheduler.window == 8

    async def fill(pool):
        started = 0
        while pool.scheduler.free_slots(P.HIGH) > 0:
            await pool.scheduler.acquire(P.HIGH, 1)
            started += 1
        return started

    assert run(fill(first)) + run(fill(second)) == run(fill(alone))  # together they run what one would
    # and each predicts from its own share: the same queue waits longer behind half the slots

    async def queue_four(pool):
        for _ in range(4):
            pool.scheduler._enqueue(P.HIGH)

    for pool in (first, alone):
        pool.service[P.HIGH].record(20.0, 4)
        measured(pool, 0.045)
        run(queue_four(pool))
    assert first.forecast(P.HIGH, 4).seconds == 40.0 and alone.forecast(P.HIGH, 4).seconds == 20.0


def test_a_client_deadline_the_request_could_not_meet_is_refused_before_any_engine_work():
    pool = make_pool(window=4)
    pool._unloaded_tpot_s = 0.02  # alone 100 tokens take 2 s: the 5 s timeout could be met on an idle engine
    measured(pool, 0.08)  # but the engine now decodes a token every 80 ms: 100 tokens take 8 s

    async def never():
        raise AssertionError("the replica must not be called")

    response = run(RequestLife(plan(pool, timeout="5", max_tokens=100), pool).run(never))
    status, message = status_and_message(response)
    assert status == 429 and "X-Request-Timeout" in message
    assert run(RequestLife(plan(pool, timeout="5", max_tokens=10), pool).run(
        lambda: asyncio.sleep(0, JSONResponse({})))).status_code == 200  # 0.8 s fits


@pytest.mark.parametrize("timeout, shown", [("5", "5.0s"), ("0.3", "0.3s"), ("0.001", "0.0s"), ("12.4", "12s")])
def test_a_client_deadline_shorter_than_the_engine_alone_needs_is_400_not_429(timeout, shown):
    pool = make_pool(window=4)
    pool._unloaded_tpot_s = 0.08  # alone, 100 tokens take 8 s: no wait or retry could fit them in less

    async def never():
        raise AssertionError("the replica must not be called")

    response = run(RequestLife(plan(pool, timeout=timeout, max_tokens=200), pool).run(never))
    status, message = status_and_message(response)
    assert status == 400 and f"X-Request-Timeout of {shown} is shorter" in message and "16s" in message
    assert json.loads(response.body)["error"]["param"] == "x-request-timeout"
    assert "retry-after" not in response.headers


def test_a_burst_on_an_engine_with_headroom_queues_for_the_growing_window_instead_of_429():
    # The H200 case: window 4, an idle fast engine, 256 requests at once. The window doubles each
    # second while TPOT stays well under the SLO, so admission predicts with it at its bound.
    pool = make_pool(window=4, max_window=256)
    pool.service[P.MEDIUM].record(1.3, 256)
    measured(pool, 0.005)  # far under the 50 ms SLO

    async def scenario():
        for _ in range(3):  # 3 of 4: a quarter is kept for high
            await pool.scheduler.acquire(P.MEDIUM, 1)
        for _ in range(200):
            pool.scheduler._enqueue(P.MEDIUM)
        with_headroom = RequestLife(plan(pool, cls=P.MEDIUM, max_tokens=256), pool)._refusal()
        measured(pool, 0.045)  # near the SLO: no headroom, the window is what it is
        return with_headroom, RequestLife(plan(pool, cls=P.MEDIUM, max_tokens=256), pool)._refusal()

    with_headroom, without = run(scenario())
    assert with_headroom is None and without.status_code == 429


def test_before_any_low_request_finished_a_flood_is_judged_at_the_engines_speed_not_the_slo():
    # The H200 flood: 128 long prompts at once, none finished yet, the engine decoding at 5 ms a token.
    pool = make_pool(window=256, max_window=512, max_in_flight_per_class={"low": 2})
    measured(pool, None, last_s=0.005)  # idle when the flood came: the last TPOT measured is stale, not gone

    async def scenario():
        for _ in range(2):
            await pool.scheduler.acquire(P.LOW, 1)
        for _ in range(125):
            pool.scheduler._enqueue(P.LOW)
        return RequestLife(plan(pool, cls=P.LOW, max_tokens=256), pool)._refusal()

    assert run(scenario()) is None  # 126 x 1.28 s over 2 slots = 81 s: within low's 600 s deadline


def test_a_stream_the_client_closes_on_done_is_served_not_gone():
    """The client (the openai library) closes on [DONE], which may be before the replica's stream reports
    its end: the answer was delivered whole, so it counts as served, and nothing is aborted."""
    pool = make_pool()
    recorded = []

    async def replica():
        yield 'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n'
        yield "data: [DONE]\n\n"
        await asyncio.sleep(30)  # the replica's end arrives late

    async def call():
        replica_call(pool)
        return StreamingResponse(replica(), media_type="text/event-stream")

    async def scenario():
        life = RequestLife(plan(pool, stream=True), pool)
        life._record = lambda status, reason, tokens: recorded.append((status, reason, tokens))
        response = await life.run(call)
        body = response.body_iterator
        read = [await anext(body), await anext(body)]
        await body.aclose()  # the client goes away right after [DONE]
        return read

    assert run(scenario())[-1] == "data: [DONE]\n\n"
    assert recorded == [(200, "ok", 1)]
    assert pool.service[P.HIGH].mean_s > 0 and not pool.streaming_handle.chat.calls[-1].cancelled


@pytest.mark.parametrize("status, reason, faults", [(400, "engine_rejected", 0), (500, "engine_error", 1)])
def test_an_engine_refusal_is_the_clients_not_a_fault_and_an_engine_failure_is(status, reason, faults):
    from ray.llm._internal.serve.core.configs.openai_api_models import OpenAIHTTPException

    pool = make_pool()
    recorded = []

    async def call():
        replica_call(pool)
        raise OpenAIHTTPException(status_code=status, message="temperature must be >= 0 (parameter=temperature)",
                                  type="BadRequestError" if status == 400 else "InternalServerError")

    async def scenario():
        life = RequestLife(plan(pool), pool)
        life._record = lambda status, reason, tokens: recorded.append((status, reason))
        return await life.run(call)

    response = run(scenario())
    assert response.status_code == status and recorded == [(status, reason)]
    assert pool.circuit.describe()["consecutive_faults"] == faults and pool.scheduler.in_flight == 0


class LoadReporter:
    """The replica's ``engine_load`` method: answers ``load`` (change it between polls)."""

    def __init__(self, **load):
        self.load = load

    async def _answer(self):
        return ReplicaLoad(**self.load)

    def remote(self):
        return self._answer()


def test_the_pool_takes_its_tpot_slo_from_the_slowest_engine_alone_and_every_use_follows():
    pool = make_pool(tpot_slo_from_engine=3.0, max_window=64)
    engine = pool.handle.engine_load = LoadReporter(tpot_s=0.1, tpot_at=time.time(), unloaded_tpot_s=0.05)
    declared_budget = plan(pool, max_tokens=10).budgets.generation_s
    assert pool.queue_settings.tightest_tpot_s == 0.05 and not pool.window.has_headroom(0.1)  # over a 50 ms SLO

    run(pool._poll_engine())
    assert pool.describe()["tpot_slo_s"] == pytest.approx(0.15)  # 3 x 50 ms measured alone
    assert pool.window.has_headroom(0.1)  # the window now grows at 100 ms a token
    assert plan(pool, max_tokens=10).budgets.generation_s > declared_budget  # budgets at the scaled SLO

    engine.load["unloaded_tpot_s"] = 0.03  # a faster replica joins: the SLO must still hold on the slowest
    run(pool._poll_engine())
    assert pool.queue_settings.tightest_tpot_s == pytest.approx(0.15)

    pool.apply(make_pool(tpot_slo_from_engine=4.0).queue_settings, CircuitSettings())  # a reconfigure
    assert pool.queue_settings.tightest_tpot_s == pytest.approx(0.20)  # keeps what was measured


def test_running_requests_are_judged_at_the_engines_speed_now_not_at_their_start():
    # A burst started at an idle engine's TPOT (50 ms: 6.4 s for 128 tokens) and the engine then slowed
    # to 300 ms a token under it: the next request's wait is the running ones' 38 s, not the 6.4 s
    # expected when they started, so it is refused now rather than at its start deadline.
    pool = make_pool(window=2, max_window=2)
    measured(pool, 0.05)

    async def scenario():
        for key in ("a", "b"):
            await pool.scheduler.acquire(P.HIGH, 30, 4096)
            pool.started(key, P.HIGH, 128)
        assert pool.forecast(P.HIGH, 128).seconds == pytest.approx(6.4, abs=0.1)
        measured(pool, 0.3)
        return pool.forecast(P.HIGH, 128).seconds

    assert run(scenario()) == pytest.approx(38.4, abs=0.2)


def test_slow_start_looks_again_after_some_engine_steps_not_a_whole_poll_while_requests_wait():
    from deployments.router.pool import POLL_S, _RAMP_MIN_S, _RAMP_STEPS

    pool = make_pool(window=1, max_window=64)
    measured(pool, 0.005)  # far under the SLO: the window has headroom

    async def scenario():
        await pool.scheduler.acquire(P.HIGH, 1)
        pool._unloaded_tpot_s = 0.004
        intervals = {"nothing waits": pool.poll_interval_s()}
        pool.scheduler._enqueue(P.HIGH)  # waits only for the full window
        for unloaded in (None, 0.004, 0.067, 0.001):  # not measured yet; the H200; a slow CPU; a floor
            pool._unloaded_tpot_s = unloaded
            intervals[unloaded] = pool.poll_interval_s()
        return intervals

    intervals = run(scenario())
    assert intervals["nothing waits"] == POLL_S
    assert intervals[None] == POLL_S  # nothing measured: the plain poll
    assert intervals[0.004] == pytest.approx(_RAMP_STEPS * 0.004) and intervals[0.004] < POLL_S
    assert intervals[0.067] == POLL_S and intervals[0.001] == _RAMP_MIN_S


def test_after_the_first_cut_the_router_looks_every_poll_again():
    from deployments.router.pool import POLL_S
    from deployments.router.window import EngineSample

    pool = make_pool(window=2, max_window=64)
    pool._unloaded_tpot_s = 0.004

    async def scenario():
        for _ in range(2):
            await pool.scheduler.acquire(P.HIGH, 1)
        pool.scheduler._enqueue(P.HIGH)
        ramping = pool.poll_interval_s()
        slo = pool.queue_settings.tightest_tpot_s
        for _ in range(2):  # two looks clearly over the SLO: a cut, slow start ends
            pool.window.observe(EngineSample(tpot_s=slo * 2, kv_cache_usage=0.1, in_use=1, queued=1,
                                             window_bound=True, prefilling=False))
        return ramping, pool.poll_interval_s()

    ramping, after_cut = run(scenario())
    assert ramping < POLL_S and after_cut == POLL_S


def test_a_request_that_starts_to_wait_wakes_the_watch_before_the_plain_poll():
    from deployments.router.pool import POLL_S

    pool = make_pool(window=1, max_window=64)
    measured(pool, 0.005)
    pool._unloaded_tpot_s = 0.002  # the ramp interval: 20 steps = 40 ms, a tenth of the plain poll

    async def scenario():
        await pool.scheduler.acquire(P.HIGH, 1)
        idle_start = time.monotonic()
        idle = asyncio.create_task(pool._until_next_poll())
        await asyncio.sleep(POLL_S / 5)
        assert not idle.done()  # nobody waits: the plain poll
        waiter = asyncio.create_task(pool.scheduler.acquire(P.HIGH, 5))
        await idle
        woken_after = time.monotonic() - idle_start
        waiter.cancel()
        return woken_after

    assert run(scenario()) < POLL_S * 0.6  # woken at the waiter (~0.1 s), not at the 0.5 s poll
