"""Unit tests of the capacity planner (Qwen2.5-7B on RTX 4090D)."""

import pytest

from deployments.capacity.planner import GIB, QWEN25_7B, CapacityError, GroupSettings, kv_bytes_per_token, plan


def test_kv_bytes_per_token_for_qwen25_7b():
    # 2 (K,V) x 28 layers x 4 KV heads x 128 x 2 bytes
    assert kv_bytes_per_token(QWEN25_7B, GroupSettings()) == 57344
    assert kv_bytes_per_token(QWEN25_7B, GroupSettings(tensor_parallel=2)) == 57344 / 2
    assert kv_bytes_per_token(QWEN25_7B, GroupSettings(tensor_parallel=4)) == 57344 / 4


def test_tp1_fp16_at_8k():
    p = plan(QWEN25_7B, GroupSettings(max_model_len=8192))
    assert p.weight_bytes_per_gpu / GIB == pytest.approx(14.2, abs=0.2)  # 15.2 GB
    assert 100_000 < p.kv_tokens < 120_000  # (21.6 - 14.2 - 1.5) GiB / 56 KiB
    assert p.concurrent_sequences == p.kv_tokens // 8192 >= 9


def test_quantised_weights_leave_more_kv():
    fp16 = plan(QWEN25_7B, GroupSettings(max_model_len=8192))
    awq = plan(QWEN25_7B, GroupSettings(weight_precision="awq-int4", max_model_len=8192))
    nf4 = plan(QWEN25_7B, GroupSettings(weight_precision="bnb-nf4", max_model_len=8192))
    assert awq.weight_bytes_per_gpu / GIB == pytest.approx(5.1, abs=0.3)
    assert awq.kv_tokens > 2.5 * fp16.kv_tokens and nf4.kv_tokens > 2.5 * fp16.kv_tokens


def test_tensor_parallel_shards_weights_and_kv():
    tp2 = plan(QWEN25_7B, GroupSettings(tensor_parallel=2, max_model_len=32768))
    tp4 = plan(QWEN25_7B, GroupSettings(tensor_parallel=4, max_model_len=131072))
    assert tp4.weight_bytes_per_gpu < tp2.weight_bytes_per_gpu
    assert tp4.concurrent_at(131072) >= 2


def test_fp16_on_one_card_cannot_hold_a_131072_token_sequence():
    with pytest.raises(CapacityError, match="fewer than one 131072-token sequence"):
        plan(QWEN25_7B, GroupSettings(max_model_len=131072))


def test_weights_that_do_not_fit():
    with pytest.raises(CapacityError, match="exceed"):
        plan(QWEN25_7B, GroupSettings(gpu_memory_gib=12))


@pytest.mark.parametrize("bad", [{"tensor_parallel": 3}, {"weight_precision": "fp8-magic"}])
def test_refused_settings(bad):
    with pytest.raises(CapacityError):
        plan(QWEN25_7B, GroupSettings(**bad))


def test_capacity_doc_is_current():
    from pathlib import Path

    from deployments.capacity.report import render

    assert Path("docs/capacity.md").read_text() == render(), "run: python -m deployments.capacity.report docs/capacity.md"


def test_every_gpu_profile_fits():
    from deployments.capacity.report import gpu_profiles, group_settings

    for name, profile in gpu_profiles().items():
        assert plan(QWEN25_7B, group_settings(profile)).concurrent_sequences >= 1, name


# vLLM's own figures for the TP1 FP16 profile's engine (Qwen2.5-7B-shaped FP16 dummy weights,
# gpu_memory_utilization 0.9, max_model_len 8192, max_num_batched_tokens 2048), vLLM 0.26.0 on the
# lent H200, quoted from docs/bench/streaming/pass2/server_ours_steps_a.txt (docs/gpu.md):
#   "Available KV cache memory: 110.96 GiB"
#   "GPU KV cache size: 2,077,680 tokens"
#   "Free memory on device (139.29/139.8 GiB) on startup. Desired GPU memory utilization is (0.9,
#    125.82 GiB). Actual usage is 14.29 GiB for weight, 0.35 GiB for peak activation, 0.22 GiB for
#    non-torch memory, and 0.89 GiB for CUDAGraph memory."
H200_TOTAL_GIB = 139.8
VLLM_WEIGHTS_GIB = 14.29
VLLM_KV_GIB = 110.96
VLLM_KV_TOKENS = 2_077_680
VLLM_PEAK_ACTIVATION_GIB, VLLM_NON_TORCH_GIB, VLLM_CUDAGRAPH_GIB = 0.35, 0.22, 0.89


def test_planner_weights_match_vllm_on_the_h200():
    p = plan(QWEN25_7B, GroupSettings(gpu_memory_gib=H200_TOTAL_GIB, max_model_len=8192))
    assert p.weight_bytes_per_gpu / GIB == pytest.approx(VLLM_WEIGHTS_GIB, rel=0.05)  # 14.19 vs 14.29


def test_planner_kv_bytes_per_token_match_vllm_on_the_h200():
    # vLLM's KV memory over its token count is the bytes per token it allocated
    per_token = VLLM_KV_GIB * GIB / VLLM_KV_TOKENS
    assert kv_bytes_per_token(QWEN25_7B, GroupSettings()) == pytest.approx(per_token, rel=0.05)
    assert kv_bytes_per_token(QWEN25_7B, GroupSettings()) == pytest.approx(per_token, rel=0.001)


def test_planner_kv_tokens_and_overhead_match_vllm_on_the_h200():
    p = plan(QWEN25_7B, GroupSettings(gpu_memory_gib=H200_TOTAL_GIB, max_model_len=8192))
    assert p.kv_tokens == pytest.approx(VLLM_KV_TOKENS, rel=0.05)  # 2,062,338 vs 2,077,680
    # The planner's 1.5 GiB overhead is activations + non-torch + CUDA graphs (1.46 GiB measured).
    # vLLM 0.26 left the CUDA graphs out of the KV budget (125.82 - 14.29 - 0.35 - 0.22 = 110.96);
    # later vLLM subtracts them (VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS, default on in 0.29).
    measured = VLLM_PEAK_ACTIVATION_GIB + VLLM_NON_TORCH_GIB + VLLM_CUDAGRAPH_GIB
    assert GroupSettings().overhead_gib == pytest.approx(measured, rel=0.05)
    assert H200_TOTAL_GIB * 0.9 - VLLM_WEIGHTS_GIB - VLLM_PEAK_ACTIVATION_GIB - VLLM_NON_TORCH_GIB == pytest.approx(
        VLLM_KV_GIB, abs=0.02)
