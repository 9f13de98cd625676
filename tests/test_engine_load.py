"""The replica's engine-load stat logger (deployments/server/engine_load.py) fed synthetic vLLM step stats."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from deployments.server import engine_load
from deployments.server.engine_load import EngineLoadLogger, step_tpots_since, steps_recorded


def step(latencies, field="inter_token_latencies_iter"):
    return SimpleNamespace(num_generation_tokens=len(latencies), **{field: latencies})


def test_the_warm_up_reads_exactly_the_steps_of_its_own_request():
    logger = EngineLoadLogger(vllm_config=None)
    logger.record(None, step([0.5]))  # a step before the mark: someone else's
    mark = steps_recorded()
    for latencies in ([0.06], [0.07, 0.09], [0.05]):
        logger.record(None, step(latencies))
    assert step_tpots_since(mark) == pytest.approx([0.06, 0.08, 0.05])  # one mean per step
    assert step_tpots_since(steps_recorded()) == []


def test_vllm_026s_field_name_is_read_too_and_prefill_only_steps_are_not_steps():
    logger = EngineLoadLogger(vllm_config=None)
    mark = steps_recorded()
    logger.record(None, step([0.004], field="time_per_output_tokens_iter"))  # vLLM 0.26 on the GPU stack
    logger.record(None, step([]))  # a step that only prefilled: no inter-token latency
    assert step_tpots_since(mark) == pytest.approx([0.004])


def test_only_the_newest_steps_are_kept():
    logger = EngineLoadLogger(vllm_config=None)
    mark = steps_recorded()
    kept = engine_load._step_tpots.maxlen
    for i in range(kept + 10):
        logger.record(None, step([float(i)]))
    since = step_tpots_since(mark)
    assert len(since) == kept and since[-1] == kept + 9 and since[0] == 10


def test_samples_gather_what_the_dashboards_show_and_start_afresh_when_taken():
    logger = EngineLoadLogger(vllm_config=None)
    engine_load.take_samples()  # whatever earlier tests left
    prefix = SimpleNamespace(queries=40, hits=32)
    scheduler = SimpleNamespace(num_running_reqs=2, num_waiting_reqs=1, kv_cache_usage=0.25,
                                prefix_cache_stats=prefix)
    first = SimpleNamespace(num_generation_tokens=2, num_prompt_tokens=40, time_to_first_tokens_iter=[0.12, 0.3],
                            inter_token_latencies_iter=[])  # a prefill step: two first tokens, no ITL
    decode = SimpleNamespace(num_generation_tokens=2, num_prompt_tokens=0, time_to_first_tokens_iter=[],
                             inter_token_latencies_iter=[0.02, 0.04])
    logger.record(scheduler, first)
    logger.record(SimpleNamespace(num_running_reqs=2, num_waiting_reqs=0, kv_cache_usage=0.26,
                                  prefix_cache_stats=SimpleNamespace(queries=0, hits=0)), decode)

    taken = engine_load.take_samples()
    assert (taken.prompt_tokens, taken.generation_tokens) == (40, 4)
    assert (taken.prefix_cache_queries, taken.prefix_cache_hits) == (40, 32)
    assert list(taken.ttft_s) == pytest.approx([0.12, 0.3])
    assert list(taken.step_itl_s) == pytest.approx([0.03])  # one value per decoding step, its mean
    again = engine_load.take_samples()
    assert (again.prompt_tokens, again.generation_tokens, len(again.ttft_s), len(again.step_itl_s)) == (0, 0, 0, 0)


def test_a_stalled_export_keeps_only_the_newest_samples():
    logger = EngineLoadLogger(vllm_config=None)
    engine_load.take_samples()
    kept = engine_load._SAMPLES_KEPT
    for i in range(kept + 5):
        logger.record(None, step([float(i)]))
    taken = engine_load.take_samples()
    assert len(taken.step_itl_s) == kept and taken.step_itl_s[0] == 5.0
    assert taken.generation_tokens == kept + 5  # counts are never dropped


def test_waiting_counts_the_requests_vllm_skipped_this_step_as_its_own_gauge_does():
    logger = EngineLoadLogger(vllm_config=None)
    logger.record(SimpleNamespace(num_running_reqs=3, num_waiting_reqs=2, num_skipped_waiting_reqs=1,
                                  kv_cache_usage=0.1), None)
    assert (engine_load.current_load().running, engine_load.current_load().waiting) == (3, 3)
