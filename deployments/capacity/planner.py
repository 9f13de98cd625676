"""Decide what a GPU group can hold: weights, KV cache, concurrent sequences.

Pure arithmetic from the model's shape and the group's settings. Figures are
per GPU (tensor parallelism shards weights and KV heads evenly). ``plan``
refuses configurations that cannot serve even one sequence of
``max_model_len`` tokens, with the numbers that show why.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    kv_heads: int
    head_dim: int
    linear_params: float  # parameters in quantisable linear layers
    embedding_params: float  # embeddings + LM head: kept in 16 bits by AWQ/GPTQ/NF4
    # The LM head's share of embedding_params: every decode step reads it in full, while the
    # input embedding table is only gathered a row per token.
    lm_head_params: float = 0.0


# Qwen2.5-7B-Instruct config.json: 28 layers, 4 KV heads, head dim 128 (3584/28),
# vocab 152064 x hidden 3584, untied LM head; 7.62e9 parameters in all.
QWEN25_7B = ModelShape("Qwen2.5-7B-Instruct", layers=28, kv_heads=4, head_dim=128,
                       linear_params=7.62e9 - 2 * 152064 * 3584, embedding_params=2 * 152064 * 3584,
                       lm_head_params=152064 * 3584)

# Bytes per linear-layer parameter, scales included.
WEIGHT_BYTES = {
    "fp16": 2.0,
    "bf16": 2.0,
    "awq-int4": 0.5 + 2 * 2 / 128,  # 4-bit, fp16 scale + zero per group of 128
    "gptq-int4": 0.5 + 2 * 2 / 128,
    "bnb-nf4": 0.5 + 4 / 64 / 4 + 4 / 256 / 64,  # 4-bit, double-quantised absmax per 64
}


class CapacityError(ValueError):
    """The configuration cannot serve one sequence of max_model_len."""


@dataclass(frozen=True)
class GroupSettings:
    gpu_memory_gib: float = 24.0  # RTX 4090D
    tensor_parallel: int = 1
    weight_precision: str = "fp16"
    kv_cache_bytes: float = 2.0  # fp16 KV cache
    max_model_len: int = 8192
    gpu_memory_utilization: float = 0.90
    # Activations, CUDA graphs, allocator slack; measured by vLLM's profiler at
    # start-up. 1.5 GiB is what vLLM typically reports for a 7B model at
    # max_num_batched_tokens 2048; TP adds NCCL buffers.
    overhead_gib: float = 1.5
    nccl_overhead_gib: float = 0.25


@dataclass(frozen=True)
class CapacityPlan:
    settings: GroupSettings
    weight_bytes_per_gpu: float
    kv_bytes_per_token_per_gpu: float
    kv_budget_bytes_per_gpu: float
    kv_tokens: int
    concurrent_sequences: int  # at max_model_len tokens each

    def concurrent_at(self, context_tokens: int) -> int:
        return self.kv_tokens // context_tokens


def kv_bytes_per_token(model: ModelShape, settings: GroupSettings) -> float:
    """K and V, every layer, the KV heads this GPU holds."""
    heads_per_gpu = max(1, model.kv_heads // settings.tensor_parallel)  # replicated when tp > heads
    return 2 * model.layers * heads_per_gpu * model.head_dim * settings.kv_cache_bytes


def weight_bytes(model: ModelShape, precision: str) -> float:
    if precision not in WEIGHT_BYTES:
        raise CapacityError(f"unknown weight precision {precision!r}; known: {sorted(WEIGHT_BYTES)}")
    return model.linear_params * WEIGHT_BYTES[precision] + model.embedding_params * 2.0


def decode_bytes_per_step(model: ModelShape, precision: str, tensor_parallel: int = 1) -> float:
    """Weight bytes one GPU reads per decode step: its shard of the linear layers and the LM head.

    Not the whole checkpoint: the input embedding table is gathered a row per token. The KV cache
    read per step (context tokens x ``kv_bytes_per_token``) comes on top.
    """
    if precision not in WEIGHT_BYTES:
        raise CapacityError(f"unknown weight precision {precision!r}; known: {sorted(WEIGHT_BYTES)}")
    return (model.linear_params * WEIGHT_BYTES[precision] + model.lm_head_params * 2.0) / tensor_parallel


def plan(model: ModelShape, settings: GroupSettings) -> CapacityPlan:
    tp = settings.tensor_parallel
    if tp < 1 or model.kv_heads % tp and tp % model.kv_heads:
        raise CapacityError(f"tensor_parallel {tp} does not divide {model.name}'s {model.kv_heads} KV heads")
    usable = settings.gpu_memory_gib * GIB * settings.gpu_memory_utilization
    weights = weight_bytes(model, settings.weight_precision) / tp
    overhead = (settings.overhead_gib + (settings.nccl_overhead_gib if tp > 1 else 0)) * GIB
    budget = usable - weights - overhead
    per_token = kv_bytes_per_token(model, settings)
    if budget <= 0:
        raise CapacityError(
            f"{model.name} {settings.weight_precision} on TP{tp}: weights {weights / GIB:.1f} GiB + overhead "
            f"{overhead / GIB:.1f} GiB per GPU exceed {usable / GIB:.1f} GiB "
            f"({settings.gpu_memory_utilization:.0%} of {settings.gpu_memory_gib:g} GiB)"
        )
    tokens = int(budget // per_token)
    if tokens < settings.max_model_len:
        raise CapacityError(
            f"{model.name} {settings.weight_precision} on TP{tp}: the KV cache holds {tokens} tokens "
            f"({budget / GIB:.2f} GiB at {per_token / 1024:.0f} KiB/token per GPU), fewer than one "
            f"{settings.max_model_len}-token sequence; lower max_model_len or use more GPUs per replica"
        )
    return CapacityPlan(settings, weights, per_token, budget, tokens, tokens // settings.max_model_len)
