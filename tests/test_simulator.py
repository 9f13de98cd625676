"""The trace-replay simulator: fleet model, policies, CLI (fast, no Ray)."""

from __future__ import annotations

import csv
import json

import pytest

from deployments.autoscaling.decision import AutoscalingConfig
from sim.fleet import Fleet, ReplicaModel, Request
from sim.policies import OursPolicy, RayDefaultPolicy, StaticPolicy
from sim.run import load_profile, load_trace, main, simulate, slo_attainment

MODEL = ReplicaModel(gpus_per_replica=1, prefill_tokens_per_s=1000, decode_tokens_per_s_single=50,
                     decode_tokens_per_s_max=200, max_batch=4, kv_capacity_tokens=10_000, cold_start_s=10)


def test_single_request_timing_follows_the_model():
    fleet = Fleet(MODEL, 1)
    request = Request(0.0, prompt_tokens=500, output_tokens=50, cls="high")
    fleet.submit(request)
    t = 0.0
    while request.done_s is None and t < 10:
        fleet.step(t, 0.1)
        t += 0.1
    assert request.first_token_s == pytest.approx(0.5, abs=0.11)  # 500 tokens at 1000/s
    assert request.done_s == pytest.approx(1.5, abs=0.2)  # + 50 tokens at 50/s


def test_high_prefills_before_low_on_the_same_replica():
    fleet = Fleet(MODEL, 1)
    low, high = Request(0.0, 3000, 10, "low"), Request(0.0, 50, 10, "high")
    fleet.submit(low), fleet.submit(high)
    for i in range(5):
        fleet.step(i * 0.1, 0.1)
    assert high.first_token_s is not None and low.first_token_s is None


def test_cold_start_and_gpu_hours():
    fleet = Fleet(MODEL, 1)
    fleet.scale_to(2, now=0.0)
    assert not fleet.replicas[1].ready(5.0) and fleet.replicas[1].ready(10.0)
    for i in range(36000):
        fleet.step(i * 0.1, 0.1)
    assert fleet.gpu_seconds / 3600 == pytest.approx(2.0, rel=0.01)


def write_trace(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["arrival_s", "prompt_tokens", "output_tokens", "class"])
        writer.writerows(rows)


def test_autoscaling_saves_gpu_hours_after_a_peak(tmp_path):
    # A busy first minute, then a long quiet tail.
    rows = [(i * 0.2, 100, 100, "high") for i in range(300)] + [(60 + i * 10.0, 100, 20, "high") for i in range(60)]
    write_trace(tmp_path / "t.csv", rows)
    trace = load_trace(tmp_path / "t.csv")
    config = AutoscalingConfig(min_replicas=1, max_replicas=4, upscale_delay_s=2, downscale_delay_s=30)
    ours = simulate(trace, MODEL, OursPolicy(config), 1)
    static = simulate(trace, MODEL, StaticPolicy(4), 4)
    assert ours["gpu_hours"] < 0.7 * static["gpu_hours"]
    assert max(t[3] for t in ours["timeline"]) > 1  # it did scale up for the peak
    assert ours["timeline"][-1][3] == 1  # and back down
    assert slo_attainment(static["requests"], {"high": 10, "medium": 10, "low": 10})["high"] == 1.0


def test_ray_default_waits_its_delays():
    from deployments.autoscaling.decision import FleetSignals

    policy = RayDefaultPolicy(1, 4, target_ongoing_requests=2, upscale_delay_s=30, downscale_delay_s=600)
    busy = FleetSignals(replicas=1, engine_running=8)
    assert policy(busy, 0) == 1 and policy(busy, 29) == 1 and policy(busy, 30) == 4


def test_unknown_class_in_trace(tmp_path):
    write_trace(tmp_path / "bad.csv", [(0, 10, 10, "urgent")])
    with pytest.raises(ValueError, match="urgent"):
        load_trace(tmp_path / "bad.csv")


def test_shipped_profiles_and_traces_load():
    assert load_profile("4090d-tp1-qwen2.5-7b-fp16").gpus_per_replica == 1
    for name in ("diurnal", "burst", "step"):
        assert len(load_trace(__import__("pathlib").Path(f"sim/traces/{name}.csv"))) > 1000


def test_cli_prints_a_table_and_writes_a_plot(tmp_path, capsys):
    write_trace(tmp_path / "small.csv", [(i * 0.5, 100, 50, "high") for i in range(100)])
    summary = main([str(tmp_path / "small.csv"), "--out", str(tmp_path / "out"), "--max-replicas", "2"])
    out = capsys.readouterr().out
    assert "| ours |" in out and "| ray-default |" in out and "| static-peak |" in out
    assert (tmp_path / "out" / "small.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "out" / "small.json").read_text()) == json.loads(json.dumps(summary))
