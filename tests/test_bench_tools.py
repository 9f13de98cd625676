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
