"""What an output token costs on each RTX 4090D profile: pure arithmetic.

The physical decode ceiling (weight bytes each GPU reads per step over its memory bandwidth), the
H200's measured throughput carried over to the 4090D by the ratio of the resource that binds, and
the cost per million output tokens at one GPU-hour price. ``bench/cost_report.py`` feeds it the
committed measurements and the profiles and writes docs/cost.md.
"""

from __future__ import annotations

# The one price every cost figure uses: US dollars per RTX 4090D GPU-hour. An assumption for
# illustration (a typical rental price for a 24 GB consumer card), not a quote; every cost in
# docs/cost.md scales linearly with it.
GPU_HOUR_PRICE_USD = 0.50

# Memory bandwidth, GB/s (1e9 bytes per second).
RTX_4090D_BANDWIDTH_GBS = 1008.0  # NVIDIA's spec: 384-bit GDDR6X at 21 Gbps
H200_BANDWIDTH_GBS = 4300.0  # measured on the lent H200: ../shared/gpu/README.md, "the measured 4.3 TB/s"

# Dense FP16 tensor-core throughput with FP32 accumulation (what vLLM's fp16 GEMMs use), TFLOPS.
# Spec-sheet figures, not measured here: H200 SXM 989; RTX 4090 165.2 (GeForce runs FP32
# accumulation at half rate), the 4090D scaled from it by its SM count, 114 of 128.
H200_FP16_TFLOPS = 989.0
RTX_4090D_FP16_TFLOPS = 165.2 * 114 / 128

BANDWIDTH_RATIO = RTX_4090D_BANDWIDTH_GBS / H200_BANDWIDTH_GBS
COMPUTE_RATIO = RTX_4090D_FP16_TFLOPS / H200_FP16_TFLOPS


def decode_ceiling_tok_s(bytes_per_step: float, bandwidth_gbs: float) -> float:
    """One stream's tokens/s if every step only had to read ``bytes_per_step`` at full bandwidth."""
    return bandwidth_gbs * 1e9 / bytes_per_step


def batch_decode_ceiling_tok_s(weight_bytes_per_step: float, kv_bytes_per_token: float, batch: int,
                               context_tokens: int, bandwidth_gbs: float) -> float:
    """Output tokens/s of ``batch`` streams at ``context_tokens`` each, bandwidth-bound: one step
    reads the weights once and every stream's KV cache, and yields ``batch`` tokens."""
    step_bytes = weight_bytes_per_step + batch * context_tokens * kv_bytes_per_token
    return batch * bandwidth_gbs * 1e9 / step_bytes


def flops_per_output_token(linear_params: float, lm_head_params: float, prompt_tokens: int,
                           output_tokens: int) -> float:
    """Matmul FLOPs spent per output token of a request: 2 per parameter per token; every prompt
    and output token passes the linear layers, only sampled positions the LM head. Attention's
    own FLOPs (about 1% at 800 tokens of context for this model) are left out."""
    total = 2 * (linear_params * (prompt_tokens + output_tokens) + lm_head_params * output_tokens)
    return total / output_tokens


def compute_share(tok_s: float, flops_per_token: float, peak_tflops: float) -> float:
    """Share of the GPU's peak matmul throughput a measured tokens/s implies (MFU)."""
    return tok_s * flops_per_token / (peak_tflops * 1e12)


def single_stream_to_4090d(h200_tok_s: float) -> float:
    """One stream decodes bandwidth-bound: the 4090D reaches the H200's share of its ceiling."""
    return h200_tok_s * BANDWIDTH_RATIO


def concurrent_to_4090d(engine_h200_tok_s: float, path_h200_tok_s: float | None = None) -> float:
    """Many streams: the engine's figure by the lower of the two ratios (the batch turns
    compute-bound sooner on the 4090D, whose compute is a smaller share of the H200's than its
    bandwidth), capped by what the serving path passed on the H200, which does not depend on
    the GPU (the app's CPU-bound router path)."""
    estimate = engine_h200_tok_s * min(BANDWIDTH_RATIO, COMPUTE_RATIO)
    return estimate if path_h200_tok_s is None else min(estimate, path_h200_tok_s)


def cost_per_million_tokens(tok_s_per_gpu: float, price_per_gpu_hour: float = GPU_HOUR_PRICE_USD) -> float:
    """Dollars per million output tokens for one GPU producing ``tok_s_per_gpu`` around the clock."""
    return price_per_gpu_hour / (tok_s_per_gpu * 3600) * 1e6


def requests_per_day(concurrency: float, latency_s: float) -> float:
    """Little's law: requests completed per day with ``concurrency`` in flight, each ``latency_s``."""
    return concurrency / latency_s * 86400
