"""The pure overload decisions on synthetic rates: adaptive window, wait forecast, budgets."""

from __future__ import annotations

import pytest

from deployments.router.budgets import decide_budgets
from deployments.router.forecast import ServiceMeter, admits, forecast_wait
from deployments.router.settings import ClassTargets, PriorityClass as P, QueueSettings, WindowSettings
from deployments.router.validation import RequestProblem
from deployments.router.window import AdaptiveWindow, EngineSample, WindowMove, batch_at_slo

SLO = 0.05  # 50 ms per output token


def busy(tpot, in_use, queued=5, kv=0.3, bound=None):
    """A sample; by default requests wait for the window whenever some are queued."""
    return EngineSample(tpot_s=tpot, kv_cache_usage=kv, in_use=in_use, queued=queued,
                        window_bound=queued > 0 if bound is None else bound)


class Engine:
    """A synthetic engine: TPOT grows linearly with the batch beyond a knee.

    ``base_s`` per token alone; every request beyond ``knee`` adds ``per_extra_s``.
    """

    def __init__(self, base_s, knee, per_extra_s):
        self.base_s, self.knee, self.per_extra_s = base_s, knee, per_extra_s

    def tpot(self, batch):
        return self.base_s + max(0, batch - self.knee) * self.per_extra_s


def settle(engine: Engine, rounds=200, settings=WindowSettings()) -> list[int]:
    """Saturating demand: the window is always full and requests queue. Returns the window after each round."""
    window = AdaptiveWindow(settings, SLO)
    seen = []
    for _ in range(rounds):
        batch = window.per_replica
        window.observe(busy(engine.tpot(batch), in_use=batch))
        seen.append(window.per_replica)
    return seen


def test_window_grows_while_tpot_is_under_the_slo_and_the_window_is_full():
    window = AdaptiveWindow(WindowSettings(initial=4), SLO)
    decision = window.observe(busy(0.01, in_use=4))
    # slow start grows by the measured headroom: 0.8 x 50 ms / 10 ms = x4
    assert decision.move is WindowMove.GROW and window.per_replica == 16
    window.observe(busy(0.035, in_use=16))  # little headroom (x1.14): still at least doubles
    assert window.per_replica == 32
    window.observe(busy(0.001, in_use=32))  # huge headroom: at most x8 per measurement
    assert window.per_replica == 256
    window.observe(busy(0.001, in_use=256))
    assert window.per_replica == 512  # the bound
    window = AdaptiveWindow(WindowSettings(initial=64), SLO)
    window.observe(busy(0.08, in_use=64))  # the first cut ends slow start
    assert window.per_replica == 51
    window.observe(busy(0.01, in_use=51))
    assert window.per_replica == 64  # x1.25 from now on


def test_a_fast_engine_reaches_hundreds_in_a_few_polls_from_idle():
    gpu = Engine(base_s=0.008, knee=64, per_extra_s=0.0001)  # H200-like: 8 ms per token, flat to 64
    window = AdaptiveWindow(WindowSettings(), SLO)
    polls = 0
    while window.per_replica < 256:
        window.observe(busy(gpu.tpot(window.per_replica), in_use=window.per_replica, queued=256))
        polls += 1
    assert polls <= 3  # 4 -> 20 -> 100 -> 256+: doubling needed six


def test_in_slow_start_a_prefilling_burst_under_the_slo_still_grows_the_window():
    window = AdaptiveWindow(WindowSettings(initial=32), SLO)
    near = EngineSample(0.045, 0.1, 32, 200, True)  # 90% of the SLO
    assert window.observe(near).move is WindowMove.HOLD  # decode alone this near the SLO: hold
    assert window.observe(EngineSample(0.045, 0.1, 32, 200, True, prefilling=True)).move is WindowMove.GROW
    assert window.per_replica == 64
    window.observe(busy(0.08, in_use=64))  # a cut ends slow start; then prefill no longer grows it
    assert window.observe(EngineSample(0.045, 0.1, 51, 200, True, prefilling=True)).move is WindowMove.HOLD


def test_prefill_interference_is_not_decode_congestion():
    cpu = Engine(base_s=0.03, knee=1, per_extra_s=0.004)  # the SLO (50 ms) at 6 per replica
    window = AdaptiveWindow(WindowSettings(initial=8), SLO)
    for batch in (1, 2, 3, 4, 5):  # clean samples teach the TPOT line
        window.observe(busy(cpu.tpot(batch), in_use=batch, queued=0))
    limit = window.per_replica
    # a long prompt in prefill pushes TPOT over the SLO at a batch the line says fits: hold, learn nothing
    decision = window.observe(EngineSample(0.09, 0.3, 4, 3, True, prefilling=True))
    assert decision.move is WindowMove.HOLD and window.per_replica == limit
    assert dict(window.points)[4] == pytest.approx(cpu.tpot(4))
    # at a batch the clean line says is too big, over the SLO is congestion even with a prefill
    assert window.observe(EngineSample(0.09, 0.3, 8, 3, True, prefilling=True)).move is WindowMove.SHRINK
    # nothing learnt yet: an over-SLO sample cuts, prefill or not
    fresh = AdaptiveWindow(WindowSettings(initial=8), SLO)
    assert fresh.observe(EngineSample(0.09, 0.3, 8, 3, True, prefilling=True)).move is WindowMove.SHRINK


def test_near_the_slo_the_window_grows_only_while_the_learnt_line_fits_one_more():
    # The line through clean samples puts the SLO at 8.6 per replica: window 7 (TPOT under the 50 ms
    # SLO but past the 40 ms growth band) grows to 8, and holds there (9 would be past the line).
    cpu = Engine(base_s=0.03, knee=1, per_extra_s=0.02 / 7.6)
    window = AdaptiveWindow(WindowSettings(initial=7, slow_start_increase=2), SLO)
    for batch in (2, 3, 4, 5, 6):
        window.observe(busy(cpu.tpot(batch), in_use=batch, queued=0))
    assert batch_at_slo(window.points, SLO) == pytest.approx(8.6)
    assert window.observe(busy(cpu.tpot(7), in_use=7)).move is WindowMove.GROW and window.per_replica == 8
    assert window.observe(busy(0.049, in_use=8)).move is WindowMove.HOLD
    assert window.observe(busy(0.051, in_use=8)).move is WindowMove.HOLD  # just over, once: confirm
    assert window.observe(busy(0.051, in_use=8)).move is WindowMove.SHRINK  # over on the second look: cut


def test_one_look_just_over_the_slo_is_confirmed_before_a_cut_but_one_clearly_over_cuts_at_once():
    window = AdaptiveWindow(WindowSettings(initial=8), SLO)
    for _ in range(10):  # noise around the SLO, never over twice in a row: no cut
        assert window.observe(busy(0.052, in_use=8)).move is WindowMove.HOLD
        assert window.observe(busy(0.047, in_use=8)).move is WindowMove.HOLD
    assert window.per_replica == 8
    # clearly over (past SLO / grow_below = 62.5 ms): cut on the first look
    assert window.observe(busy(0.07, in_use=8)).move is WindowMove.SHRINK and window.per_replica == 6
    # while a long prompt is prefilled and no measured line vouches for the batch, no second look
    prefill = AdaptiveWindow(WindowSettings(initial=8), SLO)
    sample = EngineSample(tpot_s=0.052, kv_cache_usage=0.3, in_use=8, queued=5, window_bound=True, prefilling=True)
    assert prefill.observe(sample).move is WindowMove.SHRINK


def test_window_holds_when_not_full_or_near_the_slo():
    window = AdaptiveWindow(WindowSettings(initial=8), SLO)
    assert window.observe(busy(0.01, in_use=3, bound=False)).move is WindowMove.HOLD  # spare room: no evidence
    assert window.observe(busy(0.01, in_use=8, queued=0)).move is WindowMove.HOLD  # nobody waits
    # waiting only for a class cap (say, low) is no reason to grow
    assert window.observe(busy(0.01, in_use=6, queued=3, bound=False)).move is WindowMove.HOLD
    fresh = AdaptiveWindow(WindowSettings(initial=8), SLO)
    assert fresh.observe(busy(0.045, in_use=8)).move is WindowMove.HOLD  # 80-100% of the SLO, nothing learnt
    assert window.observe(EngineSample(None, 0.1, 8, 3, True)).move is WindowMove.HOLD  # nothing decoded
    assert window.per_replica == 8


def test_window_shrinks_over_the_slo_and_on_a_full_kv_cache_but_not_below_min():
    window = AdaptiveWindow(WindowSettings(initial=10, min=2), SLO)
    assert window.observe(busy(0.08, in_use=10)).move is WindowMove.SHRINK
    assert window.per_replica == 8
    assert window.observe(busy(0.08, in_use=10)).move is WindowMove.HOLD  # 10 still run: the cut drains first
    assert window.observe(busy(0.01, in_use=8, kv=0.97)).move is WindowMove.SHRINK
    for _ in range(30):
        window.observe(busy(0.2, in_use=window.per_replica))
    assert window.per_replica == 2


def test_same_settings_settle_far_apart_on_a_slow_and_a_fast_engine():
    cpu = Engine(base_s=0.03, knee=1, per_extra_s=0.01)  # one core: every extra stream costs
    gpu = Engine(base_s=0.012, knee=64, per_extra_s=0.0002)  # memory-bound: batching is nearly free
    cpu_window = settle(cpu)[-50:]
    gpu_window = settle(gpu)[-50:]
    assert max(cpu_window) <= 4 and min(gpu_window) >= 100
    # where it settles, TPOT meets the SLO most of the time
    assert sum(cpu.tpot(w) <= SLO for w in cpu_window) >= 25


def test_window_follows_a_slower_engine_down_and_back_up():
    window = AdaptiveWindow(WindowSettings(initial=64), SLO)
    for _ in range(30):  # the engine got slower (say, long prompts arrived)
        window.observe(busy(Engine(0.03, 4, 0.01).tpot(window.per_replica), window.per_replica))
    low = window.per_replica
    for _ in range(30):
        window.observe(busy(Engine(0.01, 64, 0.001).tpot(window.per_replica), window.per_replica))
    assert low < 8 < window.per_replica


def test_router_replicas_split_the_window():
    one = AdaptiveWindow(WindowSettings(initial=8, max=100), SLO)
    half = AdaptiveWindow(WindowSettings(initial=8, max=100), SLO, share=0.5)
    assert half.per_replica == 4 == one.per_replica // 2
    one.set_share(0.5)
    assert one.per_replica == 4
    for _ in range(100):
        one.observe(busy(0.001, in_use=one.per_replica))
    assert one.per_replica == 50  # the max is shared too: two routers never exceed it together
    assert not one.has_headroom(0.001)  # at its bound: admission predicts with it as it is


# --- forecast -------------------------------------------------------------------


def test_service_meter_follows_recent_completions():
    meter = ServiceMeter()
    assert meter.mean_s is None
    for _ in range(20):
        meter.record(10.0, 100)
    assert meter.mean_s == pytest.approx(10.0)
    for _ in range(10):
        meter.record(2.0, 100)  # the load changed: ten completions later the figure follows
    assert meter.mean_s < 3.0
    assert meter.estimate_s(50) == pytest.approx(meter.mean_s / 2)  # half the tokens, half the time


def test_service_time_scales_only_its_decode_part_with_max_tokens():
    # The fresh-eye trial: a 2k-token prompt asking for 3 tokens held its slot 20 s, nearly all prefill;
    # scaling the whole 20 s by max_tokens forecast a 200-token request at ~1,300 s.
    meter = ServiceMeter()
    meter.record(20.0, 3, first_token_s=19.8)
    assert meter.estimate_s(200) == pytest.approx(19.8 + 200 * 0.2 / 3)  # prefill once, ~0.07 s a token
    assert meter.estimate_s(200) < 40
    whole = ServiceMeter()  # whole answers alone: their first token is unknown, all counts as decode
    whole.record(10.0, 100)
    assert whole.estimate_s(50) == pytest.approx(5.0)
    whole.record(10.0, 100, first_token_s=2.0)  # once a stream shows the prefill, it is kept apart
    assert whole.first_s == pytest.approx(2.0)
    assert whole.estimate_s(100) == pytest.approx(2.0 + 100 * (0.1 + 0.2 * (0.08 - 0.1)))  # smoothed per token


def test_forecast_counts_the_requests_ahead_and_when_the_running_ones_end():
    assert forecast_wait(ahead=0, slots=4, service_s=8.0, remaining_s=[3.0, 5.0]).seconds == 0  # 2 free
    # 4 slots, all running, ending in 1, 2, 3 and 4 s: the 3rd one ahead starts when the 4th ends
    busy = [4.0, 1.0, 3.0, 2.0]
    assert forecast_wait(ahead=3, slots=4, service_s=8.0, remaining_s=busy).seconds == pytest.approx(4.0)
    assert forecast_wait(ahead=0, slots=4, service_s=8.0, remaining_s=busy).seconds == pytest.approx(1.0)
    # then every slot frees again a service time later
    assert forecast_wait(ahead=5, slots=4, service_s=8.0, remaining_s=busy).seconds == pytest.approx(2.0 + 8.0)


def test_a_burst_that_started_together_frees_together():
    # 10 started at once, 6 s each, 0.5 s ago: the 11th waits 5.5 s, not 6/10 s as a mean rate says
    assert forecast_wait(ahead=0, slots=10, service_s=6.0, remaining_s=[5.5] * 10).seconds == pytest.approx(5.5)


def test_admission_refuses_a_wait_beyond_the_start_deadline_with_an_honest_retry_after():
    forecast = forecast_wait(ahead=59, slots=4, service_s=2.0, remaining_s=[2.0] * 4)  # 14 rounds + 2 s
    assert forecast.seconds == pytest.approx(30.0)
    assert not admits(forecast, start_deadline_s=30, admit_within=0.8)
    assert admits(forecast, start_deadline_s=600, admit_within=0.8)  # low waits for room instead
    assert forecast.retry_after_s == 30


# --- budgets --------------------------------------------------------------------

TARGETS = ClassTargets(ttft_s=1, tpot_s=0.05, start_deadline_s=30)
QUEUES = QueueSettings(generation_slack=2.0, stall_s=10)


def test_budgets_from_the_class_and_max_tokens():
    b = decide_budgets(TARGETS, QUEUES, max_tokens=100, arrived_at=1000.0, requested_timeout=None)
    assert b.start_by == 1030 and b.end_by is None and b.stall_s == 10
    assert b.generation_s == pytest.approx(2.0 * 100 * 0.05 + 10)
    assert b.finish_by(first_token_at=1005) == pytest.approx(1005 + 20)


def test_a_client_timeout_shortens_either_budget_never_extends():
    b = decide_budgets(TARGETS, QUEUES, 100, 1000.0, "5")
    assert b.start_by == 1005 and b.finish_by(1001) == 1005
    long = decide_budgets(TARGETS, QUEUES, 100, 1000.0, "600")
    assert long.start_by == 1030 and long.finish_by(1001) == pytest.approx(1021)


@pytest.mark.parametrize("header", ["0", "-1", "soon", "nan", "inf"])
def test_bad_timeout_header(header):
    assert isinstance(decide_budgets(TARGETS, QUEUES, 10, 0.0, header), RequestProblem)


def test_every_class_must_have_targets():
    with pytest.raises(ValueError, match="missing"):
        QueueSettings(classes={"high": TARGETS})
    assert QueueSettings().targets(P.LOW).start_deadline_s >= 300  # low waits for room, in minutes


def test_medium_traffic_alone_grows_the_window_past_the_high_reserve():
    # With a quarter of the window kept for high, medium alone can fill only 3 of 4 slots; the
    # scheduler still says medium waits for the window, so the window grows (found on the H200).
    import asyncio

    from deployments.router.scheduler import PriorityScheduler

    async def scenario():
        sched = PriorityScheduler(QueueSettings(window={"initial": 4}))
        for _ in range(3):
            await sched.acquire(P.MEDIUM, 1)
        waiting = asyncio.create_task(sched.acquire(P.MEDIUM, 5))
        await asyncio.sleep(0)
        bound = sched.window_bound()
        waiting.cancel()
        return bound, sched.in_flight

    bound, in_flight = asyncio.run(scenario())
    assert bound and in_flight == 3
    window = AdaptiveWindow(WindowSettings(initial=4), SLO)
    assert window.observe(busy(0.005, in_use=in_flight, queued=1, bound=bound)).move is WindowMove.GROW


def test_hopeless_waiters_are_refused_from_the_queue_not_left_to_expire():
    import asyncio

    from deployments.router.scheduler import PriorityScheduler, Shed

    async def scenario():
        sched = PriorityScheduler(QueueSettings(window={"initial": 1, "min": 1}, reserved_for_high=0))
        await sched.acquire(P.HIGH, 1)
        soon = asyncio.create_task(sched.acquire(P.HIGH, 30))
        late = asyncio.create_task(sched.acquire(P.HIGH, 5))
        await asyncio.sleep(0)
        # each start takes 4 s: the first waiter starts in 4 s (fits 30), the second in 8 s (not 5)
        shed = sched.shed_hopeless(lambda cls, ahead, max_tokens: 4.0 * (ahead + 1), time.monotonic())
        with pytest.raises(Shed):
            await late
        assert shed == 1 and not soon.done() and sched.depths()["high"] == 1
        soon.cancel()

    import time
    asyncio.run(scenario())


def test_the_window_learns_where_tpot_reaches_the_slo_and_predicts_with_it():
    cpu = Engine(base_s=0.03, knee=1, per_extra_s=0.01)  # reaches 50 ms at a batch of 3
    window = AdaptiveWindow(WindowSettings(initial=1, min=1, max=256), SLO)
    assert window.expected_limit() == 256  # nothing learned: the bound
    for batch in (1, 2, 3, 4, 5, 2, 3, 4):
        window.observe(busy(cpu.tpot(batch), in_use=batch, bound=False))
    assert batch_at_slo(window.points, SLO) == pytest.approx(3.0)
    assert window.expected_limit() == pytest.approx(3.0)
    gpu = AdaptiveWindow(WindowSettings(initial=1, min=1, max=256), SLO)
    for batch in (10, 50, 100, 150):
        gpu.observe(busy(Engine(0.012, 64, 0.0002).tpot(batch), in_use=batch, bound=False))
    assert gpu.expected_limit() == 256  # TPOT barely grows: the bound, not a guess beyond it


def test_near_the_slo_the_window_still_grows_one_by_one_up_to_where_the_measured_line_meets_it():
    cpu = Engine(base_s=0.02, knee=0, per_extra_s=0.005)  # TPOT = 50 ms at a batch of 6
    window = AdaptiveWindow(WindowSettings(initial=2), SLO)
    for _ in range(40):
        window.observe(busy(cpu.tpot(window.per_replica), in_use=window.per_replica))
    assert window.per_replica in (5, 6)  # past 80% of the SLO (4.8) by the line, not beyond the SLO


def test_the_measured_line_predicts_the_tpot_of_the_batch_a_request_joins():
    """A burst admitted against an idle engine's TPOT runs at a full batch's: the client-timeout forecast
    (dispatch.RequestLife._refusal) prices each request at the batch it joins, from the measured line."""
    from deployments.router.window import tpot_at

    cpu = Engine(base_s=0.03, knee=1, per_extra_s=0.01)
    window = AdaptiveWindow(WindowSettings(initial=8), SLO)
    assert window.tpot_at(16) is None  # nothing measured: no prediction
    for batch in (1, 2, 3, 4):
        window.observe(busy(cpu.tpot(batch), in_use=batch, queued=0))
    assert window.tpot_at(16) == pytest.approx(cpu.tpot(16))  # linear: extrapolates exactly
    assert window.tpot_at(16) > 4 * window.tpot_at(1)
    assert tpot_at([(1, 0.03), (2, 0.03), (3, 0.03)], 50) is None  # TPOT not growing with the batch: no line


def test_a_profile_measured_on_its_machine_scales_its_tpot_slo_from_the_engine_alone():
    declared = QueueSettings(classes={name: {"ttft_s": 1.0, "tpot_s": 0.10, "start_deadline_s": 30}
                                      for name in ("high", "medium", "low")}, tpot_slo_from_engine=3.0)
    slow = declared.scaled_to_engine(0.08)  # 80 ms a token alone: the 2.6x slower machine
    assert slow.tightest_tpot_s == pytest.approx(0.24) and slow.targets(P.LOW).tpot_s == pytest.approx(0.24)
    assert slow.targets(P.HIGH).ttft_s == 1.0 and slow.window == declared.window  # only the TPOT SLO moves
    assert declared.scaled_to_engine(0.02).tightest_tpot_s == 0.10  # a fast machine keeps the declared floor
    assert declared.scaled_to_engine(None) is declared  # nothing measured yet
    web_chat = QueueSettings()  # no tpot_slo_from_engine: an absolute goal, whatever the engine does
    assert web_chat.scaled_to_engine(0.08) is web_chat
    with pytest.raises(ValueError):
        QueueSettings(tpot_slo_from_engine=1.0)  # an SLO at the engine's own unloaded speed is no SLO


def test_a_full_window_with_headroom_grows_before_anyone_waits():
    window = AdaptiveWindow(WindowSettings(initial=5), SLO)
    full = EngineSample(tpot_s=0.02, kv_cache_usage=0.1, in_use=5, queued=0, window_bound=False, window_full=True)
    decision = window.observe(full)
    assert decision.move is WindowMove.GROW and "full" in decision.reason and window.per_replica == 10
    near = AdaptiveWindow(WindowSettings(initial=5), SLO)  # full but at 90% of the SLO: no evidence for more
    assert near.observe(EngineSample(0.045, 0.1, 5, 0, False, window_full=True)).move is WindowMove.HOLD


def test_the_scheduler_calls_the_window_full_when_a_running_classs_next_request_would_wait():
    import asyncio

    from deployments.router.scheduler import PriorityScheduler

    async def scenario():
        sched = PriorityScheduler(QueueSettings(window={"initial": 4}, max_in_flight_per_class={"low": 1}))
        seen = {"idle": sched.window_full()}
        await sched.acquire(P.LOW, 1)
        seen["low at its cap, window not full"] = sched.window_full()
        for _ in range(2):
            await sched.acquire(P.MEDIUM, 1)
        seen["3 of 4: all that medium and low may use"] = sched.window_full()
        return seen

    seen = asyncio.run(scenario())
    assert seen == {"idle": False, "low at its cap, window not full": False,
                    "3 of 4: all that medium and low may use": True}


def test_a_light_tenants_waiter_is_judged_at_its_fair_turn_not_behind_the_heavy_backlog():
    # bench/fairness.py: beside a heavy tenant's backlog, 5 of the light tenant's 15 requests were refused
    # "the high queue moves slower than predicted" though fair sharing would have started them next: the
    # queue was judged in the order of the tenants' counters, the light one (served a little more) last.
    import asyncio
    import time

    from deployments.router.scheduler import PriorityScheduler, Shed

    async def scenario():
        sched = PriorityScheduler(QueueSettings(window={"initial": 1, "min": 1}, reserved_for_high=0))
        sched.set_sharing(True)
        await sched.acquire(P.HIGH, 1, tenant="light", cost=100.0)  # runs; it has been served more than heavy
        heavy = [asyncio.create_task(sched.acquire(P.HIGH, 20, tenant="heavy", cost=10.0)) for _ in range(30)]
        await asyncio.sleep(0)
        light = asyncio.create_task(sched.acquire(P.HIGH, 20, tenant="light", cost=10.0))
        await asyncio.sleep(0)
        # each start takes 1 s: a waiter with n ahead starts in n + 1 s; the start deadline is 20 s
        shed = sched.shed_hopeless(lambda cls, ahead, max_tokens: 1.0 * (ahead + 1), time.monotonic())
        outcomes = await asyncio.gather(*heavy[-shed:], return_exceptions=True)
        assert not light.done()  # its turn comes after one of heavy's: 2 s, not 31 s
        assert 8 <= shed <= 12 and all(isinstance(o, Shed) for o in outcomes)  # heavy's newest, beyond ~20 s
        assert sched.depths()["high"] == 31 - shed
        for task in [light, *heavy]:
            task.cancel()
        await asyncio.gather(light, *heavy, return_exceptions=True)

    asyncio.run(scenario())
