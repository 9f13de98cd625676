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
