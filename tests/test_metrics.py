"""The metrics module without Ray running: bounded labels, and recording never raises."""

from __future__ import annotations

import re
from pathlib import Path

from deployments.observability import metrics
from deployments.router.dispatch import RequestLife, _usage_tokens
from deployments.server.engine_load import EngineSamples
from deployments.server.load_report import ReplicaLoad

ROUTER = Path(__file__).resolve().parents[1] / "deployments" / "router"


def test_every_reason_the_router_records_is_in_the_fixed_set():
    found = set()
    for path in ROUTER.glob("*.py"):
        text = path.read_text()
        found |= set(re.findall(r'reason="([a-z_]+)"', text))
        found |= set(re.findall(r'refused_at_door\(\d+, "([a-z_]+)"\)', text))
        found |= set(re.findall(r'_(?:counted|problem_response)\(\w+, "([a-z_]+)"\)', text))
        found |= set(re.findall(r'status, reason = \w+, "([a-z_]+)"', text))
    assert found, "no reasons found: the pattern above no longer matches the router's calls"
    assert found <= metrics.REASONS, found - metrics.REASONS


def test_outcomes_are_bounded():
    assert metrics.outcome_of(200) == "200"
    assert metrics.outcome_of(429) == "429"
    assert metrics.outcome_of(418) == "4xx"
    assert metrics.outcome_of(502) == "5xx"
    assert metrics._reason("some free text from an engine") == "engine_error"


def test_exported_names_follow_rays_convention():
    assert metrics.exported(metrics.REQUESTS) == "ray_llm_router_requests_total"
    assert metrics.exported(metrics.QUEUE_DEPTH) == "ray_llm_router_queue_depth"


def test_recording_never_raises(monkeypatch):
    def broken(name):
        raise RuntimeError("metrics backend down")

    monkeypatch.setattr(metrics, "_metric", broken)
    metrics.request_finished("main", "high", 200, "ok")
    metrics.refused_at_door(400, "schema")
    metrics.engine_work("main", "high", prompt_tokens=3, output_tokens=4, served=True, ttft_s=0.1, tpot_s=0.01,
                        e2e_s=0.2, within_slo=True)
    metrics.pool_state("main", depths={"high": 1}, running={"high": 0}, window=4, circuit="open", ready=True,
                       replicas=1)
    metrics.autoscaling_decision("d", "main", current=1, target=2, signal="queue")
    metrics.gpu_group("main", "r", utilization=0.5, memory_used_bytes=1, memory_total_bytes=2)
    metrics.engine_series("main", "r", ReplicaLoad(running=1), EngineSamples(prompt_tokens=3))


class _Recorder:
    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def __getattr__(self, method):  # set / inc / observe
        return lambda value, tags: self.calls.append((self.name, method, value, tags["pool"], tags["replica"]))


def test_an_engine_export_records_one_call_per_step_and_request_not_per_token(monkeypatch):
    calls = []
    monkeypatch.setattr(metrics, "_metric", lambda name: _Recorder(name, calls))
    samples = EngineSamples(prompt_tokens=40, generation_tokens=512, prefix_cache_queries=40, prefix_cache_hits=0)
    samples.ttft_s.extend([0.1, 0.2])
    samples.step_itl_s.extend([0.02, 0.03, 0.025])
    metrics.engine_series("main", "r1", ReplicaLoad(running=256, waiting=3, kv_cache_usage=0.5), samples)

    by_name = {}
    for name, method, value, pool, replica in calls:
        assert (pool, replica) == ("main", "r1")
        by_name.setdefault(name, []).append((method, value))
    assert by_name[metrics.ENGINE_RUNNING] == [("set", 256)]
    assert by_name[metrics.ENGINE_KV_CACHE_USAGE] == [("set", 0.5)]
    assert by_name[metrics.ENGINE_GENERATION_TOKENS] == [("inc", 512)]
    assert metrics.ENGINE_PREFIX_CACHE_HITS not in by_name  # Ray's counters refuse 0: nothing recorded
    assert [v for _, v in by_name[metrics.ENGINE_TTFT]] == [0.1, 0.2]
    assert len(by_name[metrics.ENGINE_STEP_ITL]) == 3  # 512 tokens, 3 steps: 3 observations


def test_usage_tokens_from_a_body_or_a_stream_event():
    assert _usage_tokens(b'{"usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}}') == 12
    assert _usage_tokens('data: {"choices": [], "usage": {"completion_tokens":7}}\n\ndata: [DONE]\n\n') == 7
    assert _usage_tokens('data: {"choices": [{"delta": {"content": "x"}}]}\n\n') is None


# --- what RequestLife records, against the fake replica of tests/test_dispatch.py -------------------

import asyncio  # noqa: E402

import pytest  # noqa: E402
from starlette.responses import JSONResponse  # noqa: E402

from tests.test_dispatch import make_pool, plan, replica_call, run, run_stream  # noqa: E402


@pytest.fixture
def recorded(monkeypatch):
    calls = {"finished": [], "work": []}
    monkeypatch.setattr(metrics, "request_finished", lambda *a: calls["finished"].append(a))
    monkeypatch.setattr(metrics, "engine_work", lambda *a, **kw: calls["work"].append((a, kw)))
    return calls


def test_a_served_answer_is_recorded_once_with_its_tokens(recorded):
    pool = make_pool()

    async def call():
        replica_call(pool)
        return JSONResponse({"usage": {"prompt_tokens": 5, "completion_tokens": 4}})

    p = plan(pool)
    p.prompt_tokens = 5
    assert run(RequestLife(p, pool).run(call)).status_code == 200
    assert recorded["finished"] == [("main", "high", 200, "ok")]
    (args, kw), = recorded["work"]
    assert kw["served"] and kw["output_tokens"] == 4 and kw["prompt_tokens"] == 5 and kw["ttft_s"] is None


def test_a_refusal_spends_no_engine_work(recorded):
    pool = make_pool(ready=False)

    async def never():
        raise AssertionError

    run(RequestLife(plan(pool), pool).run(never))
    assert recorded["finished"] == [("main", "high", 503, "loading")] and recorded["work"] == []


def test_a_stream_counts_its_events_and_times_its_first_token(recorded):
    pool = make_pool()
    run_stream(plan(pool, stream=True), pool, [
        'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n',
        'data: {"choices":[{"delta":{"content":"a"}}]}\n\ndata: {"choices":[{"delta":{"content":"b"}}]}\n\n',
        "data: [DONE]\n\n"])
    assert recorded["finished"] == [("main", "high", 200, "ok")]
    (args, kw), = recorded["work"]
    assert kw["output_tokens"] == 2 and kw["ttft_s"] is not None and kw["tpot_s"] is not None


def test_a_timed_out_answer_is_a_504_with_its_reason(recorded):
    pool = make_pool()

    async def slow():
        replica_call(pool)
        await asyncio.sleep(5)

    assert run(RequestLife(plan(pool, timeout="1"), pool).run(slow)).status_code == 504
    assert recorded["finished"] == [("main", "high", 504, "client_timeout")]
