"""The benchmarks' own bookkeeping: which process is which hop, and why a request was refused.

Pure: no Ray, no engine. The benchmarks print what these compute, so a wrong
role or a lost refusal message would mislead a whole report.
"""

from __future__ import annotations

from bench.fairness import Sample, refusal_reasons, summarise, table
from bench.hop_cpu import HopCpu, per_token_us, role_of


def test_process_titles_map_to_hops():
    assert role_of("ray::ProxyActor", None, 10) == "proxy"
    assert role_of("ray::ServeReplica:llm:Router", None, 11) == "ingress"
    assert role_of("ray::ServeReplica:bench:OpenAiIngress", None, 11) == "ingress"
    assert role_of("ray::ServeReplica:llm:LLMServer:SmolLM2", None, 12) == "llm_replica"
    assert role_of("ray::ServeReplica:llm:ObservedLLMServer", None, 12) == "llm_replica"
    assert role_of("ray::ServeReplica:llm:TenantLedger", None, 12) == "other_replica"  # not a hop of a request
    assert role_of("VLLM::EngineCore", None, 13) == "engine_core"
    assert role_of("VLLM::Worker_TP0", None, 14) == "engine_worker"
    assert role_of("/usr/bin/python -m vllm.entrypoints.openai.api_server", 15, 15) == "api_server"
    assert role_of("/venv/lib/ray/core/src/ray/raylet/raylet --x", None, 16) == "raylet"
    assert role_of("python3 bench/overload.py", None, 17) is None


def test_cpu_per_token_is_a_ratio_of_what_was_used():
    with HopCpu() as hop:  # nothing of a serving path runs here: nothing to count, no error
        pass
    assert all(seconds >= 0 for seconds in hop.used.values())
    assert per_token_us({"ingress": 0.5, "engine_core": 2.0}, 1000) == {"ingress": 500.0, "engine_core": 2000.0}
    assert per_token_us({"ingress": 0.5}, 0) == {}


def test_refusals_are_counted_by_message_with_numbers_folded():
    samples = [Sample("fair", "B", 0.0, 429, None, 0, 1.0, error="tenant B is over its share: wait 3.2 s"),
               Sample("fair", "B", 0.1, 429, None, 0, 1.1, error="tenant B is over its share: wait 12 s"),
               Sample("fair", "B", 0.2, 200, 0.3, 16, 2.0),
               Sample("fair", "B", 0.3, 599, None, 0, 2.0, error="ReadTimeout()")]
    assert refusal_reasons(samples) == {"429 tenant B is over its share: wait N s": 2, "599 ReadTimeout()": 1}
    rows = summarise(samples)
    assert rows[0]["refused_429"] == 2 and rows[0]["other"] == 1
    assert "2 x 429 tenant B is over its share: wait N s" in table(rows)


def _otlp_json(*spans) -> bytes:
    """An OTLP/HTTP JSON export of ``spans``: (name, trace id, start ms, end ms, events {name: ms}, request id)."""
    import json

    def one(name, trace_id, start, end, events, request_id):
        return {"name": name, "traceId": trace_id, "startTimeUnixNano": str(start * 10**6),
                "endTimeUnixNano": str(end * 10**6),
                "events": [{"name": n, "timeUnixNano": str(t * 10**6)} for n, t in events.items()],
                "attributes": [{"key": "serve.request_id", "value": {"stringValue": request_id}}]}

    return json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [one(*s) for s in spans]}]}]}).encode()


def test_the_sink_splits_a_streams_ttft_with_the_llm_replicas_span():
    from bench.tracing_overhead import Sink

    sink = Sink()
    try:
        # The router's export: request 100..160 ms, replica call from 110, first token at 150.
        sink.record(_otlp_json(("llm.request", "t1", 100, 160, {}, "r1"),
                               ("router.replica_call", "t1", 110, 150, {"first_token": 150}, "")),
                    "application/json", "")
        # The LLM replica's, in another export and its own trace: reached at 114, first output at 146;
        # and a span of the replica's own warm-up (no Serve request): not joined to anything.
        sink.record(_otlp_json(("llm_replica.first_output", "x9", 114, 146, {}, "r1"),
                               ("llm_replica.first_output", "x8", 0, 5, {}, "")),
                    "application/json", "")
        split = sink.breakdown()
    finally:
        sink.close()
    assert split["hop_in"]["p50_ms"] == 4
    assert split["replica_to_first_output"]["p50_ms"] == 32
    assert split["hop_back"]["p50_ms"] == 4
    assert split["replica_call_to_first_token"]["p50_ms"] == 40 == 4 + 32 + 4
    assert split["request_to_first_token"]["p50_ms"] == 50
    assert split["llm_replica.first_output"]["n"] == 2  # durations keep every span received
