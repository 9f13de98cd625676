"""The capacity table for every GPU profile in serve_config.yaml (docs/capacity.md).

    python -m deployments.capacity.report docs/capacity.md
"""

from __future__ import annotations

from deployments.capacity.planner import GIB, QWEN25_7B, CapacityError, GroupSettings, plan
from deployments.config.app_args import app_args_from_serve_config
from deployments.config.profiles import Profile

PRECISION_BY_QUANTIZATION = {None: "fp16", "awq": "awq-int4", "awq_marlin": "awq-int4",
                             "gptq": "gptq-int4", "gptq_marlin": "gptq-int4", "bitsandbytes": "bnb-nf4"}


def group_settings(profile: Profile) -> GroupSettings:
    engine = profile.llm_config.get("engine_kwargs", {})
    return GroupSettings(
        tensor_parallel=engine.get("tensor_parallel_size", 1),
        weight_precision=PRECISION_BY_QUANTIZATION[engine.get("quantization")],
        max_model_len=engine["max_model_len"],
        gpu_memory_utilization=engine.get("gpu_memory_utilization", 0.9),
    )


def gpu_profiles() -> dict[str, Profile]:
    return {name: p for name, p in app_args_from_serve_config().profiles.items()
            if p.llm_config.get("accelerator_config", {}).get("kind") == "gpu"}


def render() -> str:
    lines: list[str] = []
    print = lines.append  # noqa: A001 - the table is built line by line
    print("# Capacity of each 4090D profile (Qwen2.5-7B-Instruct)")
    print("")
    print("Computed by `deployments/capacity/planner.py` from serve_config.yaml "
          "(`python -m deployments.capacity.report`); per GPU, 24 GiB RTX 4090D, "
          "1.5 GiB activation/graph overhead (+0.25 GiB NCCL with TP).\n")
    print("| profile | TP | weights | max_model_len | weights/GPU GiB | KV/token/GPU KiB | KV budget/GPU GiB "
          "| KV tokens | seqs at max_model_len | seqs at 4k |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, profile in gpu_profiles().items():
        s = group_settings(profile)
        try:
            p = plan(QWEN25_7B, s)
        except CapacityError as exc:
            print(f"| {name} | {s.tensor_parallel} | {s.weight_precision} | {s.max_model_len} | refused: {exc} |")
            continue
        print(f"| {name} | {s.tensor_parallel} | {s.weight_precision} | {s.max_model_len} | "
              f"{p.weight_bytes_per_gpu / GIB:.1f} | {p.kv_bytes_per_token_per_gpu / 1024:.0f} | "
              f"{p.kv_budget_bytes_per_gpu / GIB:.1f} | {p.kv_tokens:,} | {p.concurrent_sequences} | {p.concurrent_at(4096)} |")
    try:
        plan(QWEN25_7B, GroupSettings(max_model_len=131072))
    except CapacityError as exc:
        print(f"\nRefused, for example: TP1 FP16 at 131072 tokens: {exc}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    text = render()
    if len(sys.argv) > 1:
        open(sys.argv[1], "w").write(text)
    else:
        sys.stdout.write(text)
