r"""Each 4090D profile loaded on the lent GPUs at a 4090D's memory, measured (issue 13). One device call.

For each profile named (in order, each skipped when it would not fit before DEADLINE_S): vLLM's OpenAI
server (``python3 -m vllm.entrypoints.openai.api_server``, port 8001) with the profile's own engine
arguments from serve_config.yaml (bench/gpu_overload_cfg.derive_serve_config with the profile, then the
profile's own ``max_model_len`` restored) plus ``load_format: dummy``, and ``gpu_memory_utilization`` set so
that vLLM gets what a 4090D gives it: 0.90 x 24 GiB = 21.6 GiB of the H200's CUDA total. The profile's
``runtime_env`` variables are set too (TP2: ``NCCL_P2P_DISABLE=1``, ``disable_custom_all_reduce``), so the
all-reduce goes through host memory as on PCIe 4090Ds rather than over the H200s' NVLink. The project's
router is not in this path (bench/gpu_two_replicas.py and gpu_streaming.py measure the app); this is the
engine as each profile configures it.

Dummy weights: ``/tmp/dq`` (FP16, ../shared/gpu/make_dummy_qwen.py); for AWQ ``/tmp/dq_awq``, the same folder
with Qwen2.5-7B-Instruct-AWQ's ``quantization_config`` (4 bits, group 128, zero point, GEMM) in config.json,
so ``load_format: dummy`` allocates the packed int4 ``qweight``/``qzeros`` and fp16 ``scales`` of a real AWQ
checkpoint and vLLM repacks them for its int4 kernel (``quantization: awq_marlin`` in the profile; vLLM 0.26
picks Marlin on Ada and Machete on Hopper: docs/gpu.md, "The AWQ kernel").

Measured per profile: vLLM's memory lines (weights, KV cache GiB and tokens, overheads; quoted) against
deployments/capacity/planner.py's prediction for a 4090D; the attention backend and quantisation kernel lines;
single-stream decode tok/s (2 x 256 tokens, streamed: (tokens - 1) / (last - first token)); TTFT at a
~512-token prompt (5 sequential, streamed, median); output tok/s at 256 concurrent (512 in / 256 out, not
streamed, tokens / wall).

    python3 bench/gpu_profiles.py PROFILE[,PROFILE...] DEADLINE_S
    .venv/bin/python bench/gpu_profiles.py report        # the table from docs/bench/gpu-x2/profiles.json

Results under ``$OUT``: ``profiles.json`` (saved after every profile), ``server_PROFILE.txt`` (log excerpt).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO)]

import gpu_overload_cfg as cfgmod  # noqa: E402
import yaml  # noqa: E402
from gpu_x2_common import (  # noqa: E402
    MODEL, T0, chat_body, keep_lines, log, nvidia_smi, parse_vllm_memory, pct, planner_prediction, run_list_sync,
    summarise, util_for_gib, wait_http_ready, words, write_dummy_model, PROFILE_PRECISION,
)

OUT = os.environ.get("OUT", "/tmp/out")
W = REPO / ".gpu" / "w"
DOC_DIR = REPO / "docs" / "bench" / "gpu-x2"
NEEDS_S = {"qwen2.5-7b-4090d-tp2-fp16": 230, "qwen2.5-7b-4090d-tp1-awq": 200, "qwen2.5-7b-4090d-tp1-fp16": 170}


def save() -> None:
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "profiles.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)


def left() -> float:
    return DEADLINE - (time.time() - T0)


def profile_engine(profile: str, model_dir: str, util: float) -> tuple[dict, dict]:
    shipped = yaml.safe_load((REPO / "serve_config.yaml").read_text())["applications"][0]["args"]["profiles"][profile]
    cfg = cfgmod.derive_serve_config(REPO / "serve_config.yaml", model_dir, profile)
    lc = cfg["applications"][0]["args"]["profiles"][profile]["llm_config"]
    ek = dict(lc["engine_kwargs"])
    ek["max_model_len"] = shipped["llm_config"]["engine_kwargs"]["max_model_len"]
    ek["gpu_memory_utilization"] = util
    env = dict((shipped["llm_config"].get("runtime_env") or {}).get("env_vars") or {})
    return ek, env


def server_cmd(model_dir: str, ek: dict) -> list[str]:
    flags = []
    for k, v in ek.items():
        opt = "--" + k.replace("_", "-")
        if v is True:
            flags.append(opt)
        elif v is False or v is None:
            continue
        elif isinstance(v, dict):
            flags += [opt, json.dumps(v)]
        else:
            flags += [opt, str(v)]
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
            "--served-model-name", MODEL, *flags, "--host", "127.0.0.1", "--port", "8001"]


def cuda_total_bytes() -> int:
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.mem_get_info()[1])"],
                         capture_output=True, text=True, timeout=120).stdout
    try:
        return int(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return int(139.8 * 1024 ** 3)


def engine_failed(logpath: str) -> bool:
    try:
        return "EngineCore failed to start" in Path(logpath).read_text(errors="replace")
    except OSError:
        return False


def measure(base: str) -> dict:
    m = {}
    rs, _ = run_list_sync(base, [chat_body([{"role": "user", "content": words(300 + k, 60)}], 256, True)
                                 for k in range(2)], 1)
    m["single_stream"] = [{"tokens": r["tokens"], "ttft_ms": round(1000 * r["ttft"], 1) if r["ttft"] else None,
                           "decode_tok_s": round((r["tokens"] - 1) / (r["t_last"] - r["ttft"]), 1)
                           if r.get("t_last") and r["ttft"] and r["tokens"] > 1 else None,
                           "e2e_tok_s": round(r["tokens"] / r["lat"], 1) if r["lat"] else None,
                           "status": r["status"]} for r in rs]
    rs, _ = run_list_sync(base, [chat_body([{"role": "user", "content": words(400 + k, 493)}], 2, True)
                                 for k in range(5)], 1)
    m["ttft_512"] = {"ttft_ms": [round(1000 * r["ttft"], 1) if r["ttft"] else None for r in rs],
                     "prompt_tokens": [r["ptok"] for r in rs],
                     "ttft_ms_p50": round(1000 * pct([r["ttft"] for r in rs], 50), 1) if rs[0]["ttft"] else None}
    bodies = [chat_body([{"role": "user", "content": words(5000 + k, 493)}], 256, False) for k in range(256)]
    rs, wall = run_list_sync(base, bodies, 256, timeout=max(30, min(240, left() - 20)))
    m["c256"] = summarise(rs, wall)
    return m


def run_profile(profile: str, util: float) -> None:
    awq = "awq" in profile
    model_dir = "/tmp/dq_awq" if awq else "/tmp/dq"
    write_dummy_model(model_dir, str(W / "qwen25_7b_config.json"), awq=awq)
    ek, env = profile_engine(profile, model_dir, util)
    ek["load_format"] = "dummy"
    cmd = server_cmd(model_dir, ek)
    r = res["profiles"][profile] = {"engine_kwargs": ek, "env": env, "cmd": " ".join(cmd),
                                    "planner_4090d": planner_prediction(profile, ek["max_model_len"])}
    log(profile, "server:", r["cmd"])
    logpath = f"/tmp/server_{profile}.log"
    t0 = time.time()
    with open(logpath, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **env})
    try:
        # vLLM's API server stays up after its engine failed to start (2026-12-01 x2 lease: 4.5 minutes of waiting
        # for nothing), so its log is watched too
        r["ready_s"] = round(wait_http_ready("http://127.0.0.1:8001", max(60, min(420, left() - 60)),
                                             lambda: proc.poll() is None and not engine_failed(logpath)), 1)
        log(profile, "ready in", r["ready_s"], "s; gpus", nvidia_smi())
        r["gpus_loaded"] = nvidia_smi()
        r |= measure("http://127.0.0.1:8001")
        log(profile, json.dumps({k: r[k] for k in ("single_stream", "ttft_512")}),
            "c256:", json.dumps({k: r["c256"].get(k) for k in ("status", "out_tok_s", "wall_s", "lat_s_p50")}))
    except Exception:
        r["error"] = traceback.format_exc()[-2000:]
        log(profile, "ERROR", r["error"])
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except Exception:  # noqa: BLE001
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except Exception:  # noqa: BLE001
                pass
    text = Path(logpath).read_text(errors="replace")
    r["vllm_memory"] = parse_vllm_memory(text)
    r["vllm_lines"] = keep_lines(text, 60)
    with open(os.path.join(OUT, f"server_{profile}.txt"), "w") as f:
        f.write("\n".join(keep_lines(text, 200)) + "\n--- tail ---\n" + "\n".join(text.splitlines()[-25:]))
    r["total_s"] = round(time.time() - t0, 1)
    save()
    time.sleep(3)


def report() -> None:
    r = json.loads((DOC_DIR / "profiles.json").read_text())
    print(f"gpu_memory_utilization {r.get('gpu_memory_utilization')} of {r.get('cuda_total_gib')} GiB "
          f"(= 21.6 GiB)")
    print("| profile | weights GiB/GPU: vLLM / planner | KV tokens: vLLM / planner | KV GiB/GPU: vLLM / planner | "
          "decode tok/s (1 stream) | TTFT 512 ms (p50) | out tok/s at 256 |")
    print("|---|---|---|---|---|---|---|")
    for name, p in r.get("profiles", {}).items():
        v, pl = p.get("vllm_memory", {}), p.get("planner_4090d", {})
        ss = [x.get("decode_tok_s") for x in p.get("single_stream", [])]
        print(f"| {name} | {v.get('actual_weight_gib', v.get('weights_gib'))} / {pl.get('weights_gib_per_gpu')} | "
              f"{v.get('kv_tokens')} / {pl.get('kv_tokens')} | {v.get('kv_available_gib')} / "
              f"{pl.get('kv_budget_gib_per_gpu')} | {ss} | {(p.get('ttft_512') or {}).get('ttft_ms_p50')} | "
              f"{(p.get('c256') or {}).get('out_tok_s')} |")


def main(profiles: list[str]) -> None:
    if any(g["mem_mib"] > 2000 for g in nvidia_smi()):  # an earlier call's Ray still holds a GPU
        log("GPU memory in use before start: ray stop --force:",
            subprocess.run(f"{sys.executable} -m ray.scripts.scripts stop --force", shell=True, capture_output=True,
                           text=True, timeout=90).stdout[-300:])
        time.sleep(3)
    total = cuda_total_bytes()
    util = util_for_gib(total)
    res["cuda_total_gib"], res["gpu_memory_utilization"] = round(total / 1024 ** 3, 3), util
    res["gpus"] = nvidia_smi()
    log("CUDA total", res["cuda_total_gib"], "GiB -> gpu_memory_utilization", util)
    for profile in profiles:
        assert profile in PROFILE_PRECISION, profile
        if left() < NEEDS_S.get(profile, 200):
            log(profile, f"skipped: {left():.0f} s left")
            res["profiles"][profile] = {"skipped": f"{left():.0f} s left of the call"}
            continue
        run_profile(profile, util)
    res["total_s"] = round(time.time() - T0, 1)
    save()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "report":
        report()
        sys.exit(0)
    PROFILES = sys.argv[1].split(",")
    DEADLINE = float(sys.argv[2]) if len(sys.argv) > 2 else 540.0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CACHE_ROOT", "/tmp/vllmcache")
    res: dict = {"date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "profiles": {},
                 "commit": os.environ.get("COMMIT", "")}
    main(PROFILES)
    sys.stdout.flush()
    os._exit(0)
