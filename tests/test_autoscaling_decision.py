"""Unit tests of the pure autoscaling decision core."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from deployments.autoscaling.decision import (
    AutoscalingConfig, FleetSignals, HysteresisState, decide, wanted_replicas,
)

CFG = AutoscalingConfig(min_replicas=1, max_replicas=4, upscale_delay_s=10, downscale_delay_s=60)


def run(signals_over_time, config=CFG, start_replicas=1):
    """Feed (time, signals-without-replicas) through decide, applying each target."""
    n, state, decisions = start_replicas, HysteresisState(), []
    for t, kwargs in signals_over_time:
        decision, state = decide(FleetSignals(replicas=n, **kwargs), state, t, config)
        decisions.append(decision)
        n = decision.target
    return n, decisions


def test_queue_above_target_scales_up_after_the_delay():
    busy = {"engine_waiting": 20}
    n, decisions = run([(0, busy), (5, busy), (10, busy)])
    assert [d.target for d in decisions] == [1, 1, 3]  # 20 waiting / 4 per replica = 5, step 2
    assert decisions[-1].signal == "queue" and "queue 20.0/replica > target 4" in decisions[-1].reason
    assert "up in 10s" in decisions[0].reason


def test_a_blip_shorter_than_the_delay_does_nothing():
    n, decisions = run([(0, {"engine_waiting": 20}), (5, {"engine_waiting": 0, "kv_cache_usage": 0.5}),
                        (12, {"engine_waiting": 20})])
    assert n == 1  # the timer restarted at 12


def test_router_queue_counts_as_queue():
    want, reason, signal = wanted_replicas(FleetSignals(replicas=2, router_queued=30), CFG)
    assert want == 8 and signal == "queue"


def test_saturated_kv_or_gpu_adds_one():
    assert wanted_replicas(FleetSignals(replicas=2, kv_cache_usage=0.95), CFG)[0] == 3
    assert wanted_replicas(FleetSignals(replicas=2, gpu_utilization=0.97, router_queued=2), CFG)[2] == "gpu"


def test_busy_gpu_with_nothing_waiting_is_not_saturated():
    assert wanted_replicas(FleetSignals(replicas=2, gpu_utilization=1.0, engine_running=3, kv_cache_usage=0.2), CFG)[0] == 2


def test_missing_gpu_signal_is_not_faked():
    want, reason, signal = wanted_replicas(FleetSignals(replicas=2, kv_cache_usage=0.5), CFG)
    assert want == 2 and "GPU n/a" in reason


def test_down_only_when_queues_empty_and_utilisation_low():
    assert wanted_replicas(FleetSignals(replicas=3, engine_waiting=1, kv_cache_usage=0.0), CFG)[0] == 3
    assert wanted_replicas(FleetSignals(replicas=3, kv_cache_usage=0.1, engine_running=6, gpu_utilization=1.0), CFG)[0] == 2
    assert wanted_replicas(FleetSignals(replicas=3, kv_cache_usage=0.25), CFG)[0] == 3  # 0.375 on 2
    assert wanted_replicas(FleetSignals(replicas=3, engine_running=20), CFG)[0] == 3  # 10 each on 2


def test_scale_down_waits_and_steps_one_at_a_time():
    idle = {"kv_cache_usage": 0.0}
    n, decisions = run([(t, idle) for t in range(0, 200, 10)], start_replicas=4)
    downs = [d for d in decisions if d.direction == "down"]
    assert [d.target for d in downs] == [3, 2]  # at t=60 and t=130: the delay restarts after each step
    assert n == 2
    assert all(d.signal == "idle" for d in downs)


def test_bounds_and_reasons():
    n, decisions = run([(t, {"engine_waiting": 100}) for t in (0, 10, 20, 30, 40)])
    assert n == 4 and decisions[-1].signal == "bounds" and "maximum" in decisions[-1].reason
    decision, _ = decide(FleetSignals(replicas=6), HysteresisState(), 0, CFG)
    assert decision.target == 4 and decision.signal == "bounds"


def test_min_one_unless_scale_to_zero():
    n, _ = run([(t, {}) for t in range(0, 400, 30)], start_replicas=1)
    assert n == 1
    zero = AutoscalingConfig(min_replicas=0, max_replicas=2, scale_to_zero=True, downscale_delay_s=30)
    n, _ = run([(t, {}) for t in range(0, 100, 10)], config=zero, start_replicas=1)
    assert n == 0
    n, decisions = run([(0, {"router_queued": 1})], config=zero.model_copy(update={"upscale_delay_s": 0}), start_replicas=0)
    assert n == 1 and "no replicas" in decisions[0].reason


def test_state_round_trips_through_a_dict():
    state = HysteresisState(up_since=12.5, starting_since=3.0)
    assert HysteresisState.from_dict(state.as_dict()) == state
    assert HysteresisState.from_dict(None) == HysteresisState()


@pytest.mark.parametrize("bad", [
    {"min_replicas": 5, "max_replicas": 2},
    {"kv_cache_low": 0.9, "kv_cache_high": 0.8},
    {"waiting_threshold": 0},
    {"scale_to_zero": True, "min_replicas": 1},
    {"target_queue_per_replica": 0},
])
def test_invalid_configs(bad):
    with pytest.raises(ValidationError):
        AutoscalingConfig(**bad)


def test_no_scale_down_while_replicas_start():
    idle_but_starting = FleetSignals(replicas=3, starting=1, kv_cache_usage=0.0)
    want, reason, signal = wanted_replicas(idle_but_starting, CFG)
    assert want == 3 and "start" in reason
    assert wanted_replicas(FleetSignals(replicas=3, starting=1, engine_waiting=40), CFG)[0] == 10  # up still allowed


def test_a_start_that_never_finishes_holds_the_fleet_only_for_max_start_hold_s():
    # Seen on the two-GPU lease: the second replica failed to start again and again (Serve retries it), and
    # the idle fleet stayed at 2 after the load had gone. The hold runs from the first tick with a starting
    # replica, uninterrupted; then the normal down rule (with its own delay) applies.
    config = CFG.model_copy(update={"max_start_hold_s": 300})
    idle, state, decisions = FleetSignals(replicas=2, starting=1, kv_cache_usage=0.0), HysteresisState(), []
    for t in range(0, 600, 10):
        decision, state = decide(idle, state, float(t), config)
        decisions.append((t, decision))
    held = [t for t, d in decisions if "start" in d.reason]
    down = [t for t, d in decisions if d.target == 1]
    assert held and max(held) < 300 and state.starting_since == 0.0
    assert down and down[0] >= 300 + config.downscale_delay_s  # then idle for the down delay, as any scale-down
    # A start that finishes resets the clock: the next start holds afresh.
    _, state = decide(FleetSignals(replicas=2, kv_cache_usage=0.0, engine_running=9), state, 700.0, config)
    assert state.starting_since is None
    decision, state = decide(idle, state, 710.0, config)
    assert "start" in decision.reason and state.starting_since == 710.0


def test_a_step_waiting_out_its_delay_says_so():
    config = AutoscalingConfig(min_replicas=1, max_replicas=4, upscale_delay_s=10, target_queue_per_replica=1)
    busy = FleetSignals(replicas=1, router_queued=8)
    decision, state = decide(busy, HysteresisState(), 0.0, config)
    assert (decision.target, decision.pending) == (1, "up")
    decision, _ = decide(busy, state, 11.0, config)
    assert decision.target > 1 and decision.pending is None
