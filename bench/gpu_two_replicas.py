r"""Two TP1 FP16 replicas on two GPUs (issue 13), the project's own app, one call per mode on ``nvidia-h200-x2``.

Modes:

- ``scale``: the app starts with one LLM replica (``autoscaling_config`` min 1, max 2) and its own policy
  (``QueueGpuPolicy``, serve_config.yaml's ``policy_kwargs``) decides. A closed-loop load of ``SCALE_CONC``
  (default 512, above ``max_num_seqs`` 256, so requests wait) non-streamed chats (~1,000-token prompts,
  256 tokens out; a refused one is sent again 1 s later) runs until the second replica has served for
  ``SCALE_HOLD_S`` (40 s), then stops; the run waits for the policy to go back to one. Changed for
  the run, and only these: ``upscale_delay_s`` 10 (shipped 15), ``downscale_delay_s`` 30 (shipped 120), so a
  whole 1 -> 2 -> 1 cycle fits one 10-minute device call, and ``target_queue_per_replica`` 1e6 (shipped 4), so
  that the queue rule, which would act first, stands aside and the step up must come from the GPU rule (NVML
  utilisation > 0.9 with requests waiting) or the KV rule. ``gpu_memory_utilization`` 0.9 of the H200, and
  ``max_num_seqs`` 256, vLLM's default on a 4090D (on a card of 70 GiB or more it defaults to 1,024).
  Recorded every second: Serve's replica states, ``/health`` (``engine_load`` per pool, the GPU reading
  included), nvidia-smi per GPU; the controller's ``autoscaling ...`` log lines (the policy's reasons).
- ``prefix``: two replicas fixed (min = max = 2), each engine given a 4090D's 21.6 GiB
  (``gpu_memory_utilization`` = 21.6 GiB / the H200's CUDA total), first with Serve's default request router
  (power of two choices), then redeployed with ``request_router_config`` ``PrefixCacheAffinityRouter``
  (``ray.serve.llm.request_router``, Ray 2.58.1; default kwargs) on the LLM deployment. The same two
  workloads on each, streamed, ``PREFIX_CONC`` (32) in flight, 32 tokens out, every prompt a shared system
  prompt of ~1,800 tokens plus a distinct ~64-token user message (medium class: under 2,048 tokens):
  ``few``: 4 system prompts, 256 requests; ``many``: 96 system prompts (~173k tokens, more than one
  replica's KV cache, less than two), 768 requests; the order of prompts is seeded, the same for both routers.
  Reported per workload: vLLM's prefix-cache token hit rate (``SchedulerStats.prefix_cache_stats``, what
  ``vllm:prefix_cache_hits / queries`` count, via bench/gpu_x2_stats.py's stat logger), requests per engine,
  TTFT p50/p90/p99, output tok/s.
- On a one-GPU machine (``nvidia-h200``, when the two-GPU kind is not lent) both modes run their two
  replicas on the one GPU: each bundle asks for half a GPU, with ``VLLM_RAY_PER_WORKER_GPUS=0.5`` in the
  profile's ``runtime_env`` (Ray Serve LLM 2.58.1 did not detect the fraction itself), ``scale`` gives each engine 0.4 of the GPU instead of 0.9, ``prefix`` keeps
  21.6 GiB each. Both replicas then read the same GPU's utilisation, and their engines share its compute.
- ``report`` (no device): tables and plots from the JSON under docs/bench/gpu-x2/.

``prefix`` options (environment): ``PREFIX_ROUTERS`` names the routers and their order (default
``default,prefix_affinity``; ``prefix_affinity,default`` runs the affinity router first, on a fresh app, so a
redeploy cannot starve it). A router after the first starts on a fresh Serve (``serve.shutdown`` and a new
deploy, Ray kept: with one replica per GPU a rolling redeploy starts the engines one after the other). Each
router but the last leaves ``PREFIX_RESERVE_S`` (250) of the call to the ones after it; a router that does not
come up in its share, or whose requests hang, is recorded with its error and diagnosed (``diag_LABEL.tgz``:
the processes that warned of tasks pending submission, py-spy dumps of every Serve process when ``PYSPY``
names a py-spy binary, the tails of the Router / LLM replica / controller / proxy logs), and the next router
still runs. ``X2_NGPU=1`` (with ``CUDA_VISIBLE_DEVICES=0``) runs the one-GPU variant on a two-GPU machine.
``ROUTERS=N`` fixes the app's Router replicas at N (both modes; default: serve_config.yaml's bounds), so the
affinity router's queue-length probes come from one Router (``ROUTERS=1``) instead of several.

Commands (repository root; ``.gpu/`` prepared by ../shared/gpu/prepare.sh, see docs/gpu.md):

    python3 bench/gpu_two_replicas.py scale DEADLINE_S [MODEL_DIR]
    python3 bench/gpu_two_replicas.py prefix DEADLINE_S [MODEL_DIR]
    .venv/bin/python bench/gpu_two_replicas.py report

Results under ``$OUT`` (default /tmp/out): ``MODE.json`` (saved after every phase) and ``MODE_log.txt``.
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO)]

import gpu_overload_cfg as cfgmod  # noqa: E402
from gpu_x2_common import (  # noqa: E402
    T0, Load, chat_body, keep_lines, log, nvidia_smi, parse_vllm_memory, planner_prediction,
    run_list_sync, sh, summarise, util_for_gib, wait_http_ready, words,
)
from gpu_x2_stats import read_tallies, tally_delta  # noqa: E402

PROFILE = "qwen2.5-7b-4090d-tp1-fp16"
OUT = os.environ.get("OUT", "/tmp/out")
TALLY_DIR = "/tmp/gpu_x2_tally"
EP_DIR = "/tmp/gpu_x2_ep"
PREFIX_ROUTER = "ray.serve.llm.request_router.PrefixCacheAffinityRouter"
SCALE_CONC = int(os.environ.get("SCALE_CONC", "512"))
SCALE_HOLD_S = float(os.environ.get("SCALE_HOLD_S", "40"))
SCALE_PROMPT_CHARS = 1000
PREFIX_CONC = int(os.environ.get("PREFIX_CONC", "32"))
SYSTEM_CHARS, USER_CHARS, PREFIX_OUT = 1800, 64, 32
WORKLOADS = {"few": (4, 256), "many": (96, 768)}   # name: (system prompts, requests)
POLICY_OVERRIDES = {"upscale_delay_s": 10, "downscale_delay_s": 30, "target_queue_per_replica": 1e6}
DOC_DIR = REPO / "docs" / "bench" / "gpu-x2"
NGPU = 2


def left() -> float:
    return DEADLINE - (time.time() - T0)


def save() -> None:
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, f"{MODE}.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)


# ------------------------------------------------------------------------------------- config
def build_config(mode: str, model_dir: str, util: float, router_class: str | None = None,
                 share_gpu: bool = False) -> dict:
    """serve_config.yaml as bench/gpu_overload_cfg.py derives it for the GPU (TP1 FP16, dummy weights), with
    this run's replica bounds, memory share, policy delays and (``prefix``) request router. ``share_gpu``
    (a one-GPU machine): each replica's bundle asks for half a GPU (and half a ``gpu_4090d``), so both
    replicas' engines run on the one GPU, each in its own ``gpu_memory_utilization`` share."""
    cfg = cfgmod.derive_serve_config(REPO / "serve_config.yaml", model_dir, PROFILE)
    app = cfg["applications"][0]
    lc = app["args"]["profiles"][PROFILE]["llm_config"]
    lc["engine_kwargs"]["gpu_memory_utilization"] = util
    if share_gpu:
        lc["placement_group_config"]["bundles"] = [
            {**b, "GPU": 0.5, "gpu_4090d": 0.5} for b in lc["placement_group_config"]["bundles"]]
        # vLLM's Ray worker asks for a whole GPU unless told (Ray Serve LLM 2.58 did not detect the fraction)
        lc.setdefault("runtime_env", {}).setdefault("env_vars", {})["VLLM_RAY_PER_WORKER_GPUS"] = "0.5"
    if mode == "scale":
        lc["deployment_config"]["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 2}
        app["autoscaling_policy"]["policy_kwargs"].update(POLICY_OVERRIDES)
        # vLLM's default on a 24 GB card (1,024 on a >= 70 GiB one such as the H200: vllm/engine/arg_utils.py)
        lc["engine_kwargs"]["max_num_seqs"] = 256
    else:
        lc["deployment_config"]["autoscaling_config"] = {"min_replicas": 2, "max_replicas": 2}
    if router_class:
        lc["deployment_config"]["request_router_config"] = {"request_router_class": router_class}
    if os.environ.get("ROUTERS"):  # Router replicas, fixed (the Router entry's autoscaling bounds)
        from deployments.config.app_args import router_entry

        n = int(os.environ["ROUTERS"])
        router_entry(app)["autoscaling_config"] = {"min_replicas": n, "max_replicas": n}
    return cfg


def system_prompts(n: int) -> list[str]:
    return [f"System prompt {i}. " + words(10_000 + i, SYSTEM_CHARS) for i in range(n)]


def prefix_bodies(name: str) -> list[dict]:
    n_sys, n_req = WORKLOADS[name]
    systems = system_prompts(n_sys)
    rng = random.Random(7 if name == "few" else 8)
    bodies = []
    for k in range(n_req):
        msgs = [{"role": "system", "content": systems[rng.randrange(n_sys)]},
                {"role": "user", "content": words(50_000 + 1000 * (name == "many") + k, USER_CHARS)}]
        bodies.append(chat_body(msgs, PREFIX_OUT, True))
    return bodies


# ------------------------------------------------------------------------------------- Ray / Serve
DEPLOYED: dict = {}


def start_ray_and_deploy(cfg: dict) -> None:
    import ray

    cfgmod.register_stat_loggers(EP_DIR, {"llm_serving_engine_load": "deployments.server.engine_load:EngineLoadLogger",
                                          "gpu_x2_prefix_tally": "gpu_x2_stats:PrefixTally"})
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), str(HERE), EP_DIR, os.environ.get("PYTHONPATH", "")])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CACHE_ROOT", "/tmp/vllmcache")
    ngpu = NGPU
    ray.init(namespace="serve", num_cpus=os.cpu_count(), num_gpus=ngpu, resources={"gpu_4090d": ngpu},
             include_dashboard=False, log_to_driver=False)
    serve_deploy(cfg)


def serve_deploy(cfg: dict) -> None:
    """Start Serve (again, after ``fresh_deploy``'s shutdown) and deploy ``cfg`` without waiting."""
    from ray.serve._private import api as _private_api
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(cfg)
    client = _private_api.serve_start(http_options=config.http_options.model_dump(),
                                      proxy_location=config.proxy_location,
                                      grpc_options=gRPCOptions(**config.grpc_options.model_dump()),
                                      controller_options=config.controller_options)
    client.deploy_apps(config, _blocking=False)
    DEPLOYED.update(client=client, cfg=cfg)


def fresh_deploy(cfg: dict) -> None:
    """Serve shut down (every replica stopped, GPUs freed) and ``cfg`` deployed anew, Ray kept. With one replica
    per GPU a rolling redeploy has to stop an old replica before each new one can start, so the two engines
    start one after the other (the 2026-12-01 lease's redeploy had not finished after ~6 minutes); here both
    start at once."""
    from ray import serve
    serve.shutdown()
    for _ in range(60):  # the engines' GPU memory back before the new ones profile theirs
        if all(g["mem_mib"] < 2000 for g in nvidia_smi()):
            break
        time.sleep(1)
    serve_deploy(cfg)


def redeploy(cfg: dict) -> None:
    from ray.serve.schema import ServeDeploySchema
    DEPLOYED["client"].deploy_apps(ServeDeploySchema.model_validate(cfg), _blocking=False)
    DEPLOYED["cfg"] = cfg


def llm_states() -> dict:
    """The LLM deployment's replica states, its status, and the app's."""
    from ray import serve
    app = serve.status().applications.get("llm")
    if app is None:
        return {"app": None}
    out = {"app": app.status}
    for name, d in app.deployments.items():
        if name.startswith("ObservedLLMServer:"):
            out |= {"deployment": name, "status": d.status, "replicas": dict(d.replica_states),
                    "running": d.replica_states.get("RUNNING", 0),
                    "total": sum(d.replica_states.values())}
            if d.message:
                out["message"] = d.message[:300]
    if app.status in ("DEPLOY_FAILED", "UNHEALTHY"):
        out["app_message"] = (app.message or "")[:2000]
    return out


def wait_llm(pred, limit_s: float, what: str) -> float:
    t0 = time.time()
    while time.time() - t0 < limit_s:
        st = llm_states()
        if st.get("app") in ("DEPLOY_FAILED",):
            raise RuntimeError(f"app DEPLOY_FAILED: {json.dumps(st)[:3000]}")
        if pred(st):
            return time.time() - t0
        time.sleep(1)
    raise TimeoutError(f"{what}: not after {limit_s:.0f} s: {llm_states()}")


class Monitor(threading.Thread):
    """Every second: replica states, /health's engine_load per pool, nvidia-smi per GPU."""

    def __init__(self, base: str):
        super().__init__(daemon=True)
        self.base, self.stop_ev, self.series = base, threading.Event(), []

    def run(self):
        import httpx
        with httpx.Client(base_url=self.base, timeout=5) as c:
            while not self.stop_ev.is_set():
                row = {"t": round(time.time() - T0, 1)}
                try:
                    st = llm_states()
                    row["replicas"], row["running"] = st.get("replicas"), st.get("running")
                except Exception as e:  # noqa: BLE001
                    row["replicas"] = repr(e)[:80]
                try:
                    pools = c.get("/health").json().get("pools", {})
                    row["health"] = {n: {k: (p.get("engine_load") or {}).get(k) for k in
                                         ("gpu", "kv_cache_usage", "running", "waiting", "num_running", "num_waiting")
                                         if k in (p.get("engine_load") or {})} for n, p in pools.items()}
                except Exception as e:  # noqa: BLE001
                    row["health"] = repr(e)[:80]
                row["smi"] = [(g["util"], g["mem_mib"]) for g in nvidia_smi()]
                self.series.append(row)
                self.stop_ev.wait(1.0)


def serve_logs() -> str:
    return "/tmp/ray/session_latest/logs/serve/*.log /tmp/ray/session_latest/logs/worker-*"


def collect_logs(tag: str) -> None:
    src = serve_logs()
    res[f"autoscaling_lines_{tag}"] = sh(
        f"grep -h -E 'autoscaling ' /tmp/ray/session_latest/logs/serve/controller_*.log 2>/dev/null | "
        f"cut -c1-330 | tail -60", 30).splitlines()
    res[f"replica_lines_{tag}"] = sh(
        f"grep -h -E 'GPU group|no GPU signal|Adding [0-9]+ replica|Removing [0-9]+ replica|Stopping [0-9]+|"
        f"request router|RequestRouter|PrefixCacheAffinity' {src} 2>/dev/null | cut -c1-300 | tail -40",
        30).splitlines()
    text = sh(f"cat {src} 2>/dev/null | grep -E '{_KEEP}' | head -400", 60)
    res[f"vllm_lines_{tag}"] = keep_lines(text, 40)
    res[f"vllm_memory_{tag}"] = parse_vllm_memory(text)


_KEEP = ("Model loading took|Available KV cache|GPU KV cache size|Maximum concurrency|Actual usage|"
         "attention backend|FlashAttention version|Traceback|Error")


def cuda_total_bytes() -> int:
    out = sh("python3 -c 'import torch; print(torch.cuda.mem_get_info()[1])'", 60)
    try:
        return int(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return int(139.8 * 1024 ** 3)


# ------------------------------------------------------------------------------------- scale
def run_scale(model_dir: str) -> None:
    # one GPU: both replicas share it, 0.4 of it each
    cfg = build_config("scale", model_dir, 0.9 if NGPU > 1 else 0.4, share_gpu=NGPU == 1)
    res["share_gpu"] = NGPU == 1
    res["policy_kwargs"] = cfg["applications"][0]["autoscaling_policy"]["policy_kwargs"]
    res["engine_kwargs"] = cfg["applications"][0]["args"]["profiles"][PROFILE]["llm_config"]["engine_kwargs"]
    start_ray_and_deploy(cfg)
    base = "http://127.0.0.1:8000"
    res["ready_s"] = round(wait_llm(lambda s: s.get("app") == "RUNNING", min(420, left() - 120), "app RUNNING")
                           + 0, 1)
    res["ready_http_s"] = round(wait_http_ready(base, 120, health=True), 1)
    log("ready; LLM", llm_states())
    mon = Monitor(base)
    mon.start()
    time.sleep(3)

    def make_body(k):
        return chat_body([{"role": "user", "content": words(100_000 + k, SCALE_PROMPT_CHARS)}], 256, False)

    load = Load(base, make_body, SCALE_CONC)
    load.start()
    t_load = time.time()
    res["t_load_start"] = round(t_load - T0, 1)
    log(f"load: {SCALE_CONC} concurrent, ~{SCALE_PROMPT_CHARS}-token prompts, 256 out")
    try:
        took = wait_llm(lambda s: s.get("running", 0) >= 2, max(30, left() - 150), "2 replicas running")
        res["t_two_running"] = round(time.time() - T0, 1)
        log(f"2 LLM replicas RUNNING {took:.0f} s after the load started")
        time.sleep(max(0, min(SCALE_HOLD_S, left() - 110)))
    except TimeoutError as e:
        res["scale_up_error"] = str(e)[:500]
        log("no second replica:", e)
    load.stop()
    res["t_load_stop"] = round(load.t_stop - T0, 1)
    load.join(timeout=max(5, min(90, left() - 60)))
    log("load stopped;", len(load.done), "requests answered")
    try:
        took = wait_llm(lambda s: s.get("running") == 1 and s.get("total") == 1, max(10, left() - 25),
                        "back to 1 replica")
        res["t_back_to_one"] = round(time.time() - T0, 1)
        log(f"back to 1 LLM replica {took:.0f} s after the load stopped")
    except TimeoutError as e:
        res["scale_down_error"] = str(e)[:500]
        log("not back to one:", e)
    time.sleep(2)
    mon.stop_ev.set()
    res["monitor"] = mon.series
    done = [r for r in load.done if r["t_end"] is not None]
    res["load"] = summarise([{**r, "ttft": None} for r in done])
    buckets: dict[int, list] = {}
    for r in done:
        if r["status"] == 200:
            b = int((r["t_end"] - T0) // 5) * 5
            buckets.setdefault(b, [0, 0])
            buckets[b][0] += r["tokens"]
            buckets[b][1] += 1
    res["out_tok_s_per_5s"] = {b: round(v[0] / 5, 1) for b, v in sorted(buckets.items())}
    res["refused_per_5s"] = {}
    for r in done:
        if r["status"] != 200:
            b = int((r["t_end"] - T0) // 5) * 5
            res["refused_per_5s"][b] = res["refused_per_5s"].get(b, 0) + 1
    collect_logs("scale")
    for line in res["autoscaling_lines_scale"]:
        log("policy:", line[-260:])


# ------------------------------------------------------------------------------------- diagnosis
PYSPY = os.environ.get("PYSPY", "/tmp/pyspy/bin/py-spy")


def diagnose(tag: str) -> None:
    """What a stuck phase leaves for reading later, under ``$OUT/diag_TAG/``: which processes warned of tasks
    pending submission (Ray writes the warning in the submitting worker's own log), py-spy dumps (all threads,
    with locals' names off) of every Serve replica, the proxy and the warning processes, and the tails of the
    Router / LLM replica / controller logs. Best effort; each step bounded."""
    d = os.path.join(OUT, f"diag_{tag}")
    os.makedirs(d, exist_ok=True)
    logs = "/tmp/ray/session_latest/logs"
    warned = sh(f"grep -l 'pending submission' {logs}/*.log {logs}/*.err {logs}/*.out 2>/dev/null | head -20", 30)
    Path(d, "pending_submission_files.txt").write_text(
        warned + "\n\n" + sh(f"grep -h 'pending submission' {logs}/*.log {logs}/*.err {logs}/*.out 2>/dev/null | "
                              f"cut -c1-300 | tail -30", 30))
    ps = sh("ps -eo pid,ppid,pcpu,rss,args --sort=-pcpu | cut -c1-200 | head -80", 10)
    Path(d, "ps.txt").write_text(ps)
    pids = {}
    for line in ps.splitlines()[1:]:
        f = line.split(None, 4)
        if len(f) == 5 and ("ServeReplica:" in f[4] or "ProxyActor" in f[4] or "ServeController" in f[4]
                            or "PrefixTree" in f[4]):
            pids[f[0]] = f[4][:80]
    for path in warned.splitlines():  # python-core-worker-<id>_<pid>.log / worker-<id>-<job>-<pid>.err
        tail = path.rsplit("_", 1)[-1] if "core-worker" in path else path.rsplit("-", 1)[-1]
        pid = tail.split(".")[0]
        if pid.isdigit():
            pids.setdefault(pid, "warned: " + os.path.basename(path))
    if os.path.exists(PYSPY):
        for pid, what in list(pids.items())[:16]:
            out = sh(f"timeout 20 {PYSPY} dump --pid {pid} 2>&1 | head -400", 25)
            Path(d, f"pyspy_{pid}.txt").write_text(f"# {what}\n{out}\n")
    else:
        Path(d, "pyspy_missing.txt").write_text(PYSPY)
    sh(f"for f in {logs}/serve/replica_llm_Router_*.log {logs}/serve/replica_llm_ObservedLLMServer*.log "
       f"{logs}/serve/controller_*.log {logs}/serve/proxy_*.log; do [ -f \"$f\" ] && "
       f"tail -c 150000 \"$f\" > {d}/$(basename \"$f\"); done", 60)
    for path in warned.splitlines()[:6]:
        sh(f"tail -c 100000 {path} > {d}/warned_$(basename {path})", 20)
    # one archive: a device call brings back only a few files (the 2026-12-01 x2 lease lost the py-spy dumps)
    sh(f"tar -czf {d}.tgz -C {OUT} diag_{tag} && rm -rf {d}", 60)
    log(f"diagnosis of {tag} in {d}.tgz: {len(pids)} processes, warned: {warned.splitlines()[:4]}")


# ------------------------------------------------------------------------------------- prefix
def run_prefix(model_dir: str) -> None:
    total = cuda_total_bytes()
    util = util_for_gib(total)
    res["cuda_total_gib"], res["gpu_memory_utilization"] = round(total / 1024 ** 3, 2), util
    res["planner_tp1_fp16"] = planner_prediction(PROFILE, 8192)
    base = "http://127.0.0.1:8000"
    res["workloads"] = {k: {"system_prompts": v[0], "requests": v[1], "system_chars": SYSTEM_CHARS,
                            "user_chars": USER_CHARS, "max_tokens": PREFIX_OUT, "concurrency": PREFIX_CONC}
                        for k, v in WORKLOADS.items()}
    res["routers"] = {}
    # In the order PREFIX_ROUTERS names them (default: default first). A router after the first starts on a
    # fresh Serve (fresh_deploy); the ones before it must leave it PREFIX_RESERVE_S of the call, so that a
    # router that does not come up, or whose requests hang, costs only its own share; it is then diagnosed.
    known = {"default": None, "prefix_affinity": PREFIX_ROUTER}
    routers = [(x, known[x]) for x in os.environ.get("PREFIX_ROUTERS", "default,prefix_affinity").split(",") if x]
    reserve = float(os.environ.get("PREFIX_RESERVE_S", "250"))
    res["router_order"] = [lab for lab, _ in routers]
    for i, (label, router_class) in enumerate(routers):
        if i > 0 and left() < 150:
            log(f"{label}: skipped, {left():.0f} s left")
            res["routers"][label] = {"skipped": f"{left():.0f} s left"}
            break
        keep = reserve if i < len(routers) - 1 else 0.0
        cfg = build_config("prefix", model_dir, util, router_class, share_gpu=NGPU == 1)
        res["share_gpu"] = NGPU == 1
        engines_before = set(read_tallies(TALLY_DIR))
        t0 = time.time()
        rr = res["routers"][label] = {"request_router": router_class or "default (pow-2)"}
        try:
            if i == 0:
                start_ray_and_deploy(cfg)
            else:
                fresh_deploy(cfg)
                time.sleep(2)

            def fresh_engines(_st):
                return len(set(read_tallies(TALLY_DIR)) - engines_before) >= 2

            wait_llm(lambda s: s.get("app") == "RUNNING" and s.get("running") == 2 and s.get("total") == 2
                     and fresh_engines(s), max(60, min(420, left() - 60 - keep)), f"{label}: 2 fresh replicas")
            ready = time.time() - t0 + wait_http_ready(base, 120, health=True)
            log(f"{label}: ready in {ready:.0f} s; {llm_states()}")
            rr["ready_s"] = round(ready, 1)
            # warm both engines' compiled shapes with prompts that share nothing with the workloads
            rs, wall = run_list_sync(base, [chat_body([{"role": "user", "content": words(900 + k, 300)}], 8, True)
                                            for k in range(8)], 4, timeout=60, total_timeout=max(20, left() - keep - 20))
            rr["warm"] = summarise(rs, wall)
            log(f"{label}: warm-up {rr['warm']['status']} in {wall:.1f} s")
            for name in WORKLOADS:
                if left() - keep < 45:
                    log(f"{label}/{name}: skipped, {left():.0f} s left")
                    rr[name + "_skipped"] = f"{left():.0f} s left"
                    break
                bodies = prefix_bodies(name)
                before = read_tallies(TALLY_DIR)
                rs, wall = run_list_sync(base, bodies, PREFIX_CONC, timeout=max(30, left() - 30),
                                         total_timeout=max(30, left() - keep - 25))
                time.sleep(1.5)  # the stat loggers' last records
                tally = tally_delta(before, read_tallies(TALLY_DIR))
                s = summarise(rs, wall)
                rr[name] = {"client": s, "prefix_cache": tally}
                log(f"{label}/{name}: hit rate {tally['total']['hit_rate']}, per engine "
                    f"{[(e['finished'], e['hit_rate']) for e in tally['engines'].values()]}, TTFT p50/p99 "
                    f"{s['ttft_ms_p50']}/{s['ttft_ms_p99']} ms, {s['out_tok_s']} tok/s, {s['status']}")
                save()
        except Exception:
            rr["error"] = traceback.format_exc()[-3000:]
            log(f"{label}: ERROR\n{rr['error']}")
            save()
            diagnose(label)
        rr["pending_submission_warnings"] = sh(
            "cat /tmp/ray/session_latest/logs/*.log /tmp/ray/session_latest/logs/*.err /tmp/ray/session_latest/logs/*.out "
            "2>/dev/null | grep -c 'pending submission'", 30)
        if router_class and "error" not in rr:
            diagnose(label + "_after")  # the routers' logs and stacks of a run that worked, to compare
        collect_logs(label)
        save()


# ------------------------------------------------------------------------------------- report
def report() -> None:
    """Tables (stdout) and plots from docs/bench/gpu-x2/{scale,prefix}.json."""
    out = []
    sp = DOC_DIR / "scale.json"
    if sp.exists():
        r = json.loads(sp.read_text())
        out.append(f"scale: ready {r.get('ready_s')} s; load {r.get('t_load_start')}-{r.get('t_load_stop')} s; "
                   f"2 running at {r.get('t_two_running')} s; back to 1 at {r.get('t_back_to_one')} s")
        out.append(f"load: {json.dumps(r.get('load'))}")
        out += ["policy: " + line for line in r.get("autoscaling_lines_scale", [])]
        _plot_scale(r)
    pp = DOC_DIR / "prefix.json"
    if pp.exists():
        r = json.loads(pp.read_text())
        out.append(f"\nprefix: gpu_memory_utilization {r.get('gpu_memory_utilization')} of "
                   f"{r.get('cuda_total_gib')} GiB")
        out.append("| workload | router | token hit rate | requests per engine | TTFT p50 / p90 / p99 ms | "
                   "out tok/s | statuses |")
        out.append("|---|---|---|---|---|---|---|")
        for name in WORKLOADS:
            for label, rr in r.get("routers", {}).items():
                if name not in rr:
                    continue
                c, t = rr[name]["client"], rr[name]["prefix_cache"]
                per = " / ".join(f"{e['finished']} ({e['hit_rate']})" for e in t["engines"].values())
                out.append(f"| {name} | {label} | {t['total']['hit_rate']} | {per} | {c['ttft_ms_p50']} / "
                           f"{c['ttft_ms_p90']} / {c['ttft_ms_p99']} | {c['out_tok_s']} | {c['status']} |")
        _plot_prefix(r)
    print("\n".join(out))


def _plot_scale(r: dict) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        print("no matplotlib:", e)
        return
    mon = r.get("monitor", [])
    t = [m["t"] for m in mon]
    fig, ax = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    ax[0].step(t, [m.get("running") or 0 for m in mon], where="post", label="LLM replicas RUNNING")
    ax[0].step(t, [sum(m["replicas"].values()) if isinstance(m.get("replicas"), dict) else None for m in mon],
               where="post", ls="--", label="RUNNING + STARTING")
    for ts, text in _policy_steps(r):  # the policy's decisions that changed the target
        ax[0].axvline(ts, color="red", ls="--", lw=0.8)
        ax[0].text(ts, 0.15, text, fontsize=7, color="red", rotation=90)
    ax[0].legend(fontsize=8, loc="lower right")
    ax[0].set_ylabel("replicas")
    for key, lab in (("t_load_start", "load on"), ("t_load_stop", "load off")):
        if r.get(key):
            for a in ax:
                a.axvline(r[key], color="grey", ls=":")
            ax[0].text(r[key], 2.05, lab, fontsize=8)
    ax[0].set_ylim(0, 2.4)
    for g in range(2):
        ax[1].plot(t, [(m["smi"][g][0] if len(m.get("smi", [])) > g else None) for m in mon], label=f"GPU {g} (nvidia-smi)")
    ax[1].plot(t, [_health_gpu(m) for m in mon], "k.", ms=3, label="/health engine_load.gpu x100")
    ax[1].set_ylabel("GPU util %")
    ax[1].legend(fontsize=8)
    b = r.get("out_tok_s_per_5s", {})
    ax[2].bar([float(k) for k in b], list(b.values()), width=4.5)
    ax[2].set_ylabel("output tok/s (5 s)")
    ax[2].set_xlabel("s since the script started")
    fig.suptitle("Two TP1 FP16 replicas, one per H200, min 1 max 2, under QueueGpuPolicy")
    fig.tight_layout()
    fig.savefig(DOC_DIR / "scale.png", dpi=90)


def _policy_steps(r: dict) -> list[tuple[float, str]]:
    """(s since the script started, "1 -> 2 (gpu)") for each controller line whose target differs from the
    replica count; the script's start is ``date_utc`` (UTC, to the second)."""
    import calendar
    import re
    try:
        t0 = calendar.timegm(time.strptime(r["date_utc"], "%Y-%m-%d %H:%M:%S"))
    except (KeyError, ValueError):
        return []
    out = []
    for line in r.get("autoscaling_lines_scale", []):
        m = re.search(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d+) .*?: (\d+) -> (\d+) \((\w+)\)", line)
        if m and m.group(3) != m.group(4):
            ts = calendar.timegm(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000 - t0
            out.append((ts, f"{m.group(3)} -> {m.group(4)} ({m.group(5)})"))
    return out


def _health_gpu(m: dict):
    h = m.get("health")
    if not isinstance(h, dict):
        return None
    for p in h.values():
        g = (p or {}).get("gpu")
        if isinstance(g, dict):
            u = g.get("utilization", g.get("util"))
            return None if u is None else 100 * u
    return None


def _plot_prefix(r: dict) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        print("no matplotlib:", e)
        return
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    labels, hits, p50, p99 = [], [], [], []
    for name in WORKLOADS:
        for label, rr in r.get("routers", {}).items():
            if name in rr:
                labels.append(f"{name}\n{label}")
                hits.append(rr[name]["prefix_cache"]["total"]["hit_rate"] or 0)
                p50.append(rr[name]["client"]["ttft_ms_p50"] or 0)
                p99.append(rr[name]["client"]["ttft_ms_p99"] or 0)
    x = range(len(labels))
    ax[0].bar(x, hits)
    ax[0].set_xticks(list(x), labels, fontsize=8)
    ax[0].set_ylabel("prefix-cache token hit rate")
    ax[1].bar([i - 0.2 for i in x], p50, width=0.4, label="p50")
    ax[1].bar([i + 0.2 for i in x], p99, width=0.4, label="p99")
    ax[1].set_xticks(list(x), labels, fontsize=8)
    ax[1].set_ylabel("TTFT ms")
    ax[1].legend()
    fig.suptitle("Default router vs PrefixCacheAffinityRouter, 2 TP1 replicas (21.6 GiB each)")
    fig.tight_layout()
    fig.savefig(DOC_DIR / "prefix.png", dpi=90)


def main(model_dir: str) -> None:
    global NGPU
    res["gpus_before"] = nvidia_smi()
    # X2_NGPU=1 (with CUDA_VISIBLE_DEVICES=0) runs the one-GPU variant on a two-GPU machine
    NGPU = int(os.environ.get("X2_NGPU") or len(res["gpus_before"]) or 1)
    log("gpus:", res["gpus_before"])
    if any(g["mem_mib"] > 2000 for g in res["gpus_before"]):  # an earlier call's Ray still holds a GPU
        log("GPU memory in use before start: ray stop --force:",
            sh(f"{sys.executable} -m ray.scripts.scripts stop --force", 90)[-300:])
        time.sleep(3)
    try:
        if MODE == "scale":
            run_scale(model_dir)
        else:
            run_prefix(model_dir)
    except Exception:
        res["error"] = traceback.format_exc()
        log("ERROR\n" + res["error"])
        try:
            collect_logs("error")
            res["error_lines"] = sh(f"grep -h -E 'Error|Traceback|raise ' {serve_logs()} 2>/dev/null | "
                                    f"cut -c1-300 | tail -40", 30).splitlines()
        except Exception:  # noqa: BLE001
            pass
    res["total_s"] = round(time.time() - T0, 1)
    save()
    try:
        import ray
        from ray import serve
        serve.shutdown()
        ray.shutdown()
    except Exception:  # noqa: BLE001
        pass


if __name__ == "__main__":
    MODE = sys.argv[1] if len(sys.argv) > 1 else "report"
    assert MODE in ("scale", "prefix", "report"), "MODE: scale | prefix | report"
    if MODE == "report":
        report()
        sys.exit(0)
    DEADLINE = float(sys.argv[2]) if len(sys.argv) > 2 else 540.0
    res: dict = {"mode": MODE, "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                 "commit": os.environ.get("COMMIT") or sh(f"cd {REPO} && git rev-parse HEAD 2>/dev/null")}
    main(sys.argv[3] if len(sys.argv) > 3 else "/tmp/dq")
    sys.stdout.flush()
    os._exit(0)
