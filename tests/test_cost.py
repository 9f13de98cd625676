"""Unit tests of the cost arithmetic (deployments/capacity/cost.py) and docs/cost.md's freshness."""

from pathlib import Path

import pytest

from deployments.capacity import cost
from deployments.capacity.planner import QWEN25_7B, GroupSettings, decode_bytes_per_step, kv_bytes_per_token

ROOT = Path(__file__).resolve().parent.parent


def test_decode_bytes_per_step_leave_out_the_input_embedding():
    fp16 = decode_bytes_per_step(QWEN25_7B, "fp16")
    # 6.53e9 linear + 0.545e9 LM head parameters, 2 bytes each; the checkpoint's 15.24 GB less the
    # 1.09 GB input embedding table, gathered a row per token.
    assert fp16 / 1e9 == pytest.approx(14.15, abs=0.01)
    assert decode_bytes_per_step(QWEN25_7B, "fp16", 2) == pytest.approx(fp16 / 2)
    assert decode_bytes_per_step(QWEN25_7B, "awq-int4") / 1e9 == pytest.approx(4.56, abs=0.01)


def test_decode_ceiling():
    fp16 = decode_bytes_per_step(QWEN25_7B, "fp16")
    assert cost.decode_ceiling_tok_s(fp16, cost.RTX_4090D_BANDWIDTH_GBS) == pytest.approx(71.2, abs=0.1)
    # ../shared/gpu/README.md: 15.2 GB per step at the measured 4.3 TB/s -> 283 tok/s
    assert cost.decode_ceiling_tok_s(15.2e9, cost.H200_BANDWIDTH_GBS) == pytest.approx(283, abs=1)
    assert cost.decode_ceiling_tok_s(fp16, cost.H200_BANDWIDTH_GBS) == pytest.approx(303.9, abs=0.1)


def test_batch_ceiling_adds_each_streams_kv_cache():
    fp16 = decode_bytes_per_step(QWEN25_7B, "fp16")
    kv = kv_bytes_per_token(QWEN25_7B, GroupSettings())
    one = cost.batch_decode_ceiling_tok_s(fp16, kv, 1, 0, 1008)
    assert one == pytest.approx(cost.decode_ceiling_tok_s(fp16, 1008))
    # batch 8 at 4,096 tokens: 14.15 GB + 8 x 4096 x 57,344 B = 16.03 GB per step, 8 tokens each
    assert cost.batch_decode_ceiling_tok_s(fp16, kv, 8, 4096, 1008) == pytest.approx(8 * 1008e9 / 16.029e9, rel=1e-3)


def test_ratios_and_estimates():
    assert cost.BANDWIDTH_RATIO == pytest.approx(1008 / 4300)
    assert cost.COMPUTE_RATIO < cost.BANDWIDTH_RATIO
    assert cost.single_stream_to_4090d(207.0) == pytest.approx(207.0 * 1008 / 4300)
    assert cost.concurrent_to_4090d(10_000) == pytest.approx(10_000 * cost.COMPUTE_RATIO)
    # the serving path's H200 figure caps the estimate only when it is lower
    assert cost.concurrent_to_4090d(10_000, 5_000) == pytest.approx(10_000 * cost.COMPUTE_RATIO)
    assert cost.concurrent_to_4090d(10_000, 1_000) == 1_000


def test_flops_and_compute_share():
    m = QWEN25_7B
    # decode only: 2 FLOPs per parameter read, 14.15 GFLOP per token
    assert cost.flops_per_output_token(m.linear_params, m.lm_head_params, 0, 1) == pytest.approx(14.15e9, rel=1e-3)
    per_token = cost.flops_per_output_token(m.linear_params, m.lm_head_params, 518, 256)
    assert per_token == pytest.approx(2 * (m.linear_params * 774 + m.lm_head_params * 256) / 256)
    assert cost.compute_share(1000, 1e12, 1000) == 1.0


def test_cost_per_million_tokens():
    # one GPU at $0.50/h making 1,000 tok/s: 3.6M tokens an hour -> $0.139 per million
    assert cost.cost_per_million_tokens(1000, 0.50) == pytest.approx(0.50 / 3.6)
    assert cost.cost_per_million_tokens(1000) == pytest.approx(cost.GPU_HOUR_PRICE_USD / 3.6)
    assert cost.cost_per_million_tokens(500, 1.0) == 2 * cost.cost_per_million_tokens(1000, 1.0)


def test_requests_per_day_is_littles_law():
    assert cost.requests_per_day(8, 0.4) == pytest.approx(1_728_000)


def _report():
    import importlib.util

    spec = importlib.util.spec_from_file_location("cost_report", ROOT / "bench" / "cost_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    return report


def test_cost_doc_is_current():
    assert (ROOT / "docs" / "cost.md").read_text() == _report().render(), "run: python bench/cost_report.py"


def test_check_flag_fails_on_a_stale_doc(tmp_path, monkeypatch):
    report = _report()
    doc = tmp_path / "cost.md"
    monkeypatch.setattr(report, "DOC", doc)
    doc.write_text(report.render())
    assert report.main(["--check"]) == 0
    doc.write_text(report.render().replace("$0.50 per RTX 4090D", "$0.40 per RTX 4090D"))
    assert report.main(["--check"]) == 1
