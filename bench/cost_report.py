"""docs/cost.md: what an output token costs on each RTX 4090D profile (issue 13).

    python bench/cost_report.py            # writes docs/cost.md
    python bench/cost_report.py --check    # exit 1 if docs/cost.md is stale

Nothing is measured here. It reads the H200 figures committed under docs/bench/ (bench/gpu_streaming.py
pass 2 and bench/gpu_overload.py), the 4090D profiles in serve_config.yaml, and does the arithmetic of
deployments/capacity/cost.py and planner.py. Every figure in the output says whether it was measured
(and in which file) or estimated (and how).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from deployments.capacity import cost  # noqa: E402
from deployments.capacity.planner import (  # noqa: E402
    GIB, QWEN25_7B, WEIGHT_BYTES, GroupSettings, decode_bytes_per_step, kv_bytes_per_token, plan, weight_bytes,
)
from deployments.capacity.report import gpu_profiles, group_settings  # noqa: E402

DOC = ROOT / "docs" / "cost.md"
PASS2 = "docs/bench/streaming/pass2"
OVERLOAD = "docs/bench/overload-gpu/ours-82386ed.json"
MEASURED_PROFILE = "qwen2.5-7b-4090d-tp1-fp16"
PROMPT_TOKENS, OUTPUT_TOKENS = 518, 256  # the H200 runs' workload (docs/streaming.md)

# Why each profile has no measurement (issue 13; docs/gpu.md lists the command that would run it).
NOT_MEASURED = {
    "qwen2.5-7b-4090d-tp1-awq": "not measured: AWQ/Marlin never ran on the device (its 30 min this session "
                                "went to issue 12)",
    "qwen2.5-7b-4090d-tp1-nf4": "not measured: bitsandbytes quantises real weights at load time and cannot "
                                "take dummy weights; the device has no model hub",
    "qwen2.5-7b-4090d-tp2-fp16": "not measured: needs the two-GPU kind (`nvidia-h200-x2`, lent); device time "
                                 "spent on issue 12",
    "qwen2.5-7b-4090d-tp4-fp16": "not measured: needs four GPUs; the kinds lent are `nvidia-h200` and "
                                 "`nvidia-h200-x2` (issue 18)",
}

# The seed's claims, quoted in issue 13.
SEED_BATCH = 8
SEED_CONTEXT = 4096


def _phase(path: str, phase: str) -> dict:
    return json.loads((ROOT / path).read_text())["phases"][phase]


def _tok_s(path: str, phase: str) -> float:
    return float(_phase(path, phase)["client"]["out_tok_s"])


def _n(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}"


def _usd(x: float) -> str:
    return f"${x:.3f}" if x < 1 else f"${x:.2f}"


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


class Numbers:
    """Every derived figure, computed once, so the tables and the text agree."""

    def __init__(self) -> None:
        m = QWEN25_7B
        self.bw_ratio, self.compute_ratio = cost.BANDWIDTH_RATIO, cost.COMPUTE_RATIO
        self.flops_per_token = cost.flops_per_output_token(m.linear_params, m.lm_head_params,
                                                           PROMPT_TOKENS, OUTPUT_TOKENS)
        fp16_step = decode_bytes_per_step(m, "fp16")
        self.h200_ceiling = cost.decode_ceiling_tok_s(fp16_step, cost.H200_BANDWIDTH_GBS)
        self.d_ceiling_fp16 = cost.decode_ceiling_tok_s(fp16_step, cost.RTX_4090D_BANDWIDTH_GBS)
        bare, app = f"{PASS2}/res_bare.json", f"{PASS2}/res_ours_r4.json"
        self.bare, self.app = bare, app
        # rows: (what, H200 engine file, phase, H200 app file, app phase)
        self.rows = []
        for what, phase in (("1 stream (e2e)", "s1"), ("64 streams", "c64"), ("256 streams", "c256"),
                            ("256 concurrent, not streamed", "n256")):
            engine = _tok_s(bare, phase)
            served = _tok_s(app, phase)
            if phase == "s1":
                est_engine, est_app = cost.single_stream_to_4090d(engine), cost.single_stream_to_4090d(served)
            else:
                est_engine, est_app = cost.concurrent_to_4090d(engine), cost.concurrent_to_4090d(engine, served)
            self.rows.append((what, phase, engine, served, est_engine, est_app))
        self.by_phase = {r[1]: r for r in self.rows}
        c1 = json.loads((ROOT / OVERLOAD).read_text())["phases"]
        self.overload_c1 = float(c1["C1_256_nonstream"]["out_tok_s"])
        self.overload_b = c1["B_single_stream"]["e2e_tok_s"]


def _per_profile():
    """(name, profile, group settings, tensor parallel, bytes read per decode step per GPU, 1-stream
    decode ceiling on a 4090D in tok/s) for each shipped 4090D profile."""
    for name, profile in gpu_profiles().items():
        s = group_settings(profile)
        step = decode_bytes_per_step(QWEN25_7B, s.weight_precision, s.tensor_parallel)
        yield name, profile, s, s.tensor_parallel, step, cost.decode_ceiling_tok_s(step, cost.RTX_4090D_BANDWIDTH_GBS)


def _profile_rows(n: Numbers) -> list[str]:
    out = ["| profile | GPUs | measured? | 1 stream, tok/s (4090D) | share of the decode ceiling "
           "| output tok/s per GPU, 256 concurrent (4090D) | $ per M output tokens, 256 concurrent "
           "| $ per M output tokens, 1 stream |",
           "|---|---|---|---|---|---|---|---|"]
    for name, profile, s, tp, step, ceiling in _per_profile():
        if name == MEASURED_PROFILE:
            _, _, _, s1_app, _, s1_est = n.by_phase["s1"]
            _, _, _, _, _, n256_est = n.by_phase["n256"]
            _, _, _, _, _, c256_est = n.by_phase["c256"]
            out.append(
                f"| {name} | {tp} | **M** on the H200 (`{n.app}`) | **E** {_n(s1_est, 1)} (the app's H200 "
                f"{_n(s1_app, 1)} x {n.bw_ratio:.3f}) | **M** {_pct(s1_app / n.h200_ceiling)} on the H200, "
                f"**E** the same on the 4090D | **E** {_n(n256_est)} not streamed, {_n(c256_est)} streamed "
                f"(method above) | **E** {_usd(cost.cost_per_million_tokens(n256_est))} / "
                f"{_usd(cost.cost_per_million_tokens(c256_est))} | **E** "
                f"{_usd(cost.cost_per_million_tokens(s1_est / tp))} |")
        else:
            out.append(
                f"| {name} | {tp} | {NOT_MEASURED.get(name, 'not measured')} | **E** at most {_n(ceiling)} "
                f"(the ceiling) | – | – | – | **E** at least "
                f"{_usd(cost.cost_per_million_tokens(ceiling / tp))} (at the ceiling) |")
    return out


def _measured_rows(n: Numbers) -> list[str]:
    out = ["| workload (`phase`) | bare vLLM, H200 (**M**) | this app as shipped, H200 (**M**) | H200 use "
           "| bare vLLM, 4090D (**E**) | this app, 4090D (**E**) | $ per M output tokens, this app (**E**) |",
           "|---|---|---|---|---|---|---|"]
    for what, phase, engine, served, est_engine, est_app in n.rows:
        if phase == "s1":
            use = f"{_pct(engine / n.h200_ceiling)} of the decode ceiling (bare)"
            how = f"x {n.bw_ratio:.3f}"
        else:
            use = f"{_pct(cost.compute_share(engine, n.flops_per_token, cost.H200_FP16_TFLOPS))} of peak FP16 (bare)"
            how = f"x {min(n.bw_ratio, n.compute_ratio):.3f}"
        out.append(f"| {what} (`{phase}`) | {_n(engine)} | {_n(served)} | {use} | {_n(est_engine, 1 if phase == 's1' else 0)} "
                   f"({how}) | {_n(est_app, 1 if phase == 's1' else 0)} | "
                   f"{_usd(cost.cost_per_million_tokens(est_app))} |")
    return out


def _ceiling_rows() -> list[str]:
    out = ["| profile | weights, whole checkpoint GB | read per decode step per GPU GB | 1-stream ceiling, "
           "4090D tok/s | per GPU | 8 streams at 4K context, ceiling tok/s | KV tokens per GPU (planner) "
           "| sequences at 4K (planner) |",
           "|---|---|---|---|---|---|---|---|"]
    for name, profile, s, tp, step, ceiling in _per_profile():
        kv = kv_bytes_per_token(QWEN25_7B, s)
        b8 = cost.batch_decode_ceiling_tok_s(step, kv, SEED_BATCH, SEED_CONTEXT, cost.RTX_4090D_BANDWIDTH_GBS)
        p = plan(QWEN25_7B, s)
        out.append(f"| {name} | {weight_bytes(QWEN25_7B, s.weight_precision) / 1e9:.2f} | {step / 1e9:.2f} | "
                   f"{_n(ceiling)} | {_n(ceiling / tp)} | {_n(b8)} | {p.kv_tokens:,} | {p.concurrent_at(4096)} |")
    return out


def _seed_rows(n: Numbers) -> list[str]:
    step16 = decode_bytes_per_step(QWEN25_7B, "fp16")
    step4 = decode_bytes_per_step(QWEN25_7B, "awq-int4")
    kv = kv_bytes_per_token(QWEN25_7B, GroupSettings())
    b8_16 = cost.batch_decode_ceiling_tok_s(step16, kv, SEED_BATCH, SEED_CONTEXT, cost.RTX_4090D_BANDWIDTH_GBS)
    b8_4 = cost.batch_decode_ceiling_tok_s(step4, kv, SEED_BATCH, SEED_CONTEXT, cost.RTX_4090D_BANDWIDTH_GBS)
    tp4_ceiling = cost.decode_ceiling_tok_s(decode_bytes_per_step(QWEN25_7B, "fp16", 4), cost.RTX_4090D_BANDWIDTH_GBS)
    s1_est = n.by_phase["s1"][5]
    s1_ttft = _phase(n.app, "s1")["client"]["ttft_p50"]
    bare_ttft = _phase(n.bare, "s1")["client"]["ttft_p50"]
    ttft_est = bare_ttft / n.compute_ratio + (s1_ttft - bare_ttft)
    fp16 = plan(QWEN25_7B, GroupSettings(max_model_len=8192))
    awq = plan(QWEN25_7B, GroupSettings(weight_precision="awq-int4", max_model_len=32768))
    per_day_claim = cost.requests_per_day(8, 0.4)
    return [
        "| the seed's figure | set beside it | what the arithmetic says |",
        "|---|---|---|",
        f"| Transformers FP16: 1,200 tok/s at batch {SEED_BATCH}, {SEED_CONTEXT // 1024}K context | bandwidth "
        f"ceiling, FP16, one 4090D, batch {SEED_BATCH} at {SEED_CONTEXT:,} tokens: **E** {_n(b8_16)} output tok/s "
        f"| {1200 / b8_16:.1f}x that ceiling: not output tokens/s of one 4090D (prompt tokens counted, or more GPUs) |",
        f"| vLLM: 3,800 tok/s at batch {SEED_BATCH}, {SEED_CONTEXT // 1024}K context | the same ceiling: FP16 "
        f"**E** {_n(b8_16)}, INT4 (AWQ) **E** {_n(b8_4)} | {3800 / b8_16:.1f}x the FP16 ceiling, {3800 / b8_4:.1f}x "
        f"the INT4 one: the same doubt |",
        f"| one 4090D, single stream: 23.5 tok/s | FP16 ceiling **E** {_n(n.d_ceiling_fp16, 1)}; this app carried "
        f"from the H200 **E** {_n(s1_est, 1)} | {_pct(23.5 / n.d_ceiling_fp16)} of the ceiling; the H200 run "
        f"reached {_pct(n.by_phase['s1'][3] / n.h200_ceiling)} of its own |",
        f"| one 4090D, single stream: ~680 ms TTFT (prompt length not given) | the H200, 518-token prompt: "
        f"**M** bare vLLM {1000 * bare_ttft:.0f} ms, this app {1000 * s1_ttft:.0f} ms p50 (`s1` of the files above); "
        f"**E** 4090D ~{1000 * ttft_est:.0f} ms | the estimate: bare's TTFT (prefill, compute-bound) / "
        f"{n.compute_ratio:.3f}, plus the app's {1000 * (s1_ttft - bare_ttft):.0f} ms on top of bare, which does "
        f"not depend on the GPU |",
        f"| four 4090D: 89.2 tok/s, ~410 ms | TP4 FP16 one-stream ceiling **E** {_n(tp4_ceiling)} | "
        f"{_pct(89.2 / tp4_ceiling)} of it; the seed does not say whether it is TP4 or four replicas |",
        f"| concurrent requests per card: ≤ 2 → ≥ 8 | planner, sequences at 4K per card: FP16 TP1 "
        f"{fp16.concurrent_at(4096)}, AWQ TP1 {awq.concurrent_at(4096)} (`docs/capacity.md`) | vLLM's paged KV "
        f"cache has room for well over 8 on either |",
        f"| mean latency 1.1 s → 0.4 s; requests per day ~50k → ~180k | Little's law at 8 in flight and 0.4 s: "
        f"{_n(per_day_claim)} requests per day per card | 180k per day averages {180e3 / 86400:.1f} requests/s, "
        f"{180e3 / 86400 * 0.4:.1f} in flight at 0.4 s: {_pct(180e3 / per_day_claim)} of 8; with 70–85% "
        f"utilisation it fits only if the day's load is far from flat |",
        "| GPU utilisation 35–45% → 70–85% | NVML on the H200 under load: **M** 0.91–1.0 (docs/streaming.md, "
        "the GPU signal) | NVML utilisation is the share of time a kernel runs, not of bandwidth or FLOPs |",
        f"| unit cost 1.0× → 0.38× | requests per day 50k → 180k on the same cards: {50 / 180:.2f}× | "
        f"the seed's 0.38× implies {0.38 * 180 / 50:.2f}× the spend for 3.6× the requests |",
    ]


def render() -> str:
    n = Numbers()
    mfus = [cost.compute_share(r[2], n.flops_per_token, cost.H200_FP16_TFLOPS) for r in n.rows if r[1] != "s1"]
    s1_mfu = cost.compute_share(n.by_phase["s1"][2], cost.flops_per_output_token(
        QWEN25_7B.linear_params, QWEN25_7B.lm_head_params, 0, 1), cost.H200_FP16_TFLOPS)
    fp16 = plan(QWEN25_7B, GroupSettings(max_model_len=8192))
    need = PROMPT_TOKENS + OUTPUT_TOKENS
    lines = [
        "# Cost per output token of each 4090D profile",
        "",
        "Generated by `python bench/cost_report.py` (`--check` exits 1 when this file is stale; "
        "`tests/test_cost.py` runs it) from the H200 measurements committed under `docs/bench/` and the "
        "profiles in `serve_config.yaml`. The arithmetic is `deployments/capacity/cost.py`, the weights and "
        "KV cache `deployments/capacity/planner.py`. **Nothing here ran on a 4090D.** **M** marks a figure "
        "measured on the lent H200, with its file; **E** an estimate, with its method.",
        "",
        f"**Price:** ${cost.GPU_HOUR_PRICE_USD:.2f} per RTX 4090D GPU-hour (`GPU_HOUR_PRICE_USD` in "
        "`deployments/capacity/cost.py`, the one place it is set). It is an assumption for illustration, "
        "not a quote; every cost below scales linearly with it.",
        "",
        "**What was measured:** one lent NVIDIA H200 (device kind `nvidia-h200`), vLLM 0.26.0, Ray 2.58.1, "
        f"2026-11-30: the `{MEASURED_PROFILE}` engine with Qwen2.5-7B-shaped FP16 dummy weights, TP1, "
        f"`max_model_len` 8192, chunked prefill 2,048; ~{PROMPT_TOKENS}-token prompts, {OUTPUT_TOKENS} tokens "
        "out, `ignore_eos`. Runs and commands: [streaming.md](streaming.md) (pass 2) and "
        "[overload-gpu.md](overload-gpu.md); every GPU figure so far: [gpu.md](gpu.md).",
        "",
        "**How an H200 figure becomes a 4090D estimate:**",
        "",
        f"- Bandwidth ratio: {cost.RTX_4090D_BANDWIDTH_GBS:,.0f} GB/s (4090D spec) / "
        f"{cost.H200_BANDWIDTH_GBS:,.0f} GB/s (the H200's bandwidth as measured in `../shared/gpu/README.md`, "
        f"\"the measured 4.3 TB/s\") = **{n.bw_ratio:.3f}**.",
        f"- Compute ratio: {cost.RTX_4090D_FP16_TFLOPS:.1f} / {cost.H200_FP16_TFLOPS:.0f} TFLOPS = "
        f"**{n.compute_ratio:.3f}** (dense FP16 tensor, FP32 accumulate, spec sheets, not measured: the "
        "RTX 4090's 165.2 scaled by the 4090D's 114 of 128 SMs; the H200 SXM's 989).",
        f"- **One stream** decodes bandwidth-bound (the bare run used {s1_mfu:.1%} of the H200's peak FP16), so "
        "it moves by the bandwidth ratio: the 4090D is taken to reach the share of its ceiling that the H200 "
        "reached of its own.",
        f"- **64 and 256 concurrent** ran at {_pct(min(mfus))}–{_pct(max(mfus))} of the H200's peak FP16 "
        f"(bare vLLM; {n.flops_per_token / 1e9:.1f} GFLOP per output token at this prompt/output mix), so they "
        f"move by the lower ratio, {min(n.bw_ratio, n.compute_ratio):.3f}. For this app the estimate is also "
        "capped by what the app passed on the H200, since the router path's limit is CPU, not GPU; at "
        "4090D speed the GPU binds first, so the app's estimate equals bare vLLM's.",
        "- Cost per million output tokens = price x GPUs / (output tok/s x 3,600) x 10^6.",
        "",
        "## Per profile",
        "",
        *_profile_rows(n),
        "",
        "The AWQ, NF4, TP2 and TP4 rows are ceilings only: no engine reaches its ceiling (FP16 reached "
        f"{_pct(n.by_phase['s1'][3] / n.h200_ceiling)} on the H200), and 4-bit kernels and PCIe all-reduce lose "
        "more, so their real costs per token are higher than the floors shown.",
        "",
        f"## {MEASURED_PROFILE}: the H200's figures carried to the 4090D",
        "",
        f"Measured: bare vLLM `{n.bare}`, this app with 4 routers as the profiles ship it `{n.app}` (`client.out_tok_s` "
        "of each phase: completion tokens over the phase's wall time).",
        "",
        *_measured_rows(n),
        "",
        f"Also measured, same engine, the app at `82386ed` (`{OVERLOAD}`): 256 concurrent not streamed from "
        f"idle **M** {_n(n.overload_c1)} tok/s (phase `C1_256_nonstream`), one stream **M** "
        f"{', '.join(_n(x) for x in n.overload_b)} tok/s (`B_single_stream`).",
        "",
        f"On a 4090D the 256-concurrent estimates are optimistic in one more way: the planner gives the FP16 "
        f"TP1 profile {fp16.kv_tokens:,} KV tokens, room for {fp16.kv_tokens // need} requests of "
        f"{need} tokens, so about {256 - fp16.kv_tokens // need} of the 256 wait for a slot. The H200 (2,077,680 "
        "KV tokens) held them all.",
        "",
        "## Decode ceiling per profile",
        "",
        "Weight bytes read per decode step over memory bandwidth (1,008 GB/s per 4090D). A step reads each "
        "GPU's shard of the linear layers and of the LM head; the input embedding table is gathered a row "
        "per token, so it is not read in full. Hence 14.15 GB for FP16, not the whole checkpoint's 15.24 GB "
        f"(which gives {_n(cost.decode_ceiling_tok_s(15.24e9, cost.RTX_4090D_BANDWIDTH_GBS), 1)} tok/s); the KV "
        "cache read per step comes on top (at 8 streams of 4K tokens, 1.9 GB). TP ceilings leave out the "
        "all-reduce, two per layer over PCIe without peer-to-peer (`NCCL_P2P_DISABLE=1`), which no run has "
        f"measured. On the H200 (4,300 GB/s measured) the FP16 ceiling is {_n(n.h200_ceiling)} tok/s.",
        "",
        *_ceiling_rows(),
        "",
        "## The seed's figures beside these",
        "",
        *_seed_rows(n),
        "",
        "## Not covered",
        "",
        "- A 4090D itself: every 4090D figure here is an estimate; the ratios assume the engine keeps the "
        "same share of bandwidth (one stream) or of compute (many streams) on Ada as on Hopper, where it runs "
        "FlashAttention 3 instead of 2 ([gpu.md](gpu.md)).",
        "- TTFT on the 4090D, and goodput at the SLO: the H200's streamed runs missed the 50 ms TPOT SLO at "
        "256 streams (docs/overload-gpu.md, `CS`), so cost per million tokens *within the SLO* is not given.",
        "- Power, host, network and the router's own CPU in the GPU-hour price.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if DOC.read_text() != text:
            print(f"{DOC} is stale: run python bench/cost_report.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
