r"""Overload on one GPU: this app ("ours") vs ray.serve.llm's stock ``build_openai_app`` ("stock").

Issue 10, "Overload without waste". Both targets serve the same
Qwen2.5-7B-shaped dummy model (``load_format: dummy``, random weights of the
real shapes, so memory and speed are the real model's) with the same engine
settings: the ``qwen2.5-7b-4090d-tp1-fp16`` profile of serve_config.yaml, one
replica, ``max_model_len`` 8192, ``gpu_memory_utilization`` 0.9. Ours is
deployed from a config derived from serve_config.yaml with no router setting
changed (bench/gpu_overload_cfg.py); stock is ``build_openai_app`` on the same
profile's LLMConfig (``scheduling_policy`` dropped: stock sends no priority).
One target per process; run each in its own device call on one warm machine.

Phases (all prompts distinct: no prefix-cache hits; temperature 0, ``ignore_eos``,
fixed ``max_tokens``; a prompt of N characters is about N tokens with the dummy
byte-level tokenizer):

- A  10 streamed ~518-token prompts, 8 out, one at a time (TTFT at low load)
- B  3 streamed ~518-token prompts, 256 out, one at a time (single stream)
- C1 256 concurrent ~518-token prompts, 256 out, not streamed (medium class)
- D  20 short chats (~69 tokens, high class), 16 out, one at a time: TTFT idle
- EF 128 concurrent ~6,018-token prompts (low class), 256 out, not streamed, and,
     3 s later, 20 streamed short chats 0.5 s apart (high)
- CS the C1 workload streamed (if time is left)
- CR the C1 workload again, not streamed: a second burst (if time is left)

Per phase: status counts (200 / 429 / 503 / 504 / ...), output tok/s over the
phase, TTFT or latency p50 / p99, goodput (output tokens of the requests that
met their class's SLO: streamed, TTFT <= 1 s high / 3 s medium / 60 s low and
mean TPOT <= 50 ms; not streamed, latency <= TTFT SLO + max_tokens x 50 ms,
the proxy), and wasted engine tokens: the engine's generated-token count over
the phase (read once the engine is idle again) less the completion tokens of
the 200 answers. That count is read three ways where available: the project's
own ``GET /health`` -> ``pools.main.engine_load.generated_tokens`` (ours only),
``GeneratedTokenTally`` (bench/gpu_overload_cfg.py, both targets; the sum of
vLLM's ``IterationStats.num_generation_tokens``) and vLLM's Prometheus counter
``vllm:generation_tokens_total`` scraped from Ray's metrics agent (both
targets; Ray exports it every few seconds). For ours, ``/health`` is also
sampled every second during the loaded phases: the router's adaptive window
(``window_per_replica``, ``window_reason``), in-flight and queued requests and
the engine's TPOT.

Exact commands (issue 10, docs/overload-gpu.md), from the repository root:

    bash ../shared/gpu/prepare.sh --with-ray                    # here, ~3 min: .gpu/p0..p3 + .gpu/device_install.sh
    mkdir -p .gpu/w && cp ../shared/gpu/make_dummy_qwen.py ../shared/gpu/qwen25_7b_config.json .gpu/w/
    # the router code to measure, pinned to a commit (the working tree may hold uncommitted router edits):
    rm -rf .gpu/head && mkdir -p .gpu/head && git archive HEAD deployments | tar -x -C .gpu/head && \
      git rev-parse HEAD > .gpu/head/COMMIT
    # device calls, kind nvidia-h200, back to back on one machine; calls 1-3 carry .gpu/pK (K = 0, 1, 2)
    # and .gpu/device_install.sh and run:
    bash .gpu/device_install.sh 4
    # call 4 carries .gpu/p3, .gpu/device_install.sh, .gpu/w, .gpu/head: installs, makes the model, runs ours
    # (timeout_s 600; the deadline is what is left of 590 s after the install):
    S=$(date +%s); cp -r .gpu/head/deployments/. deployments/; bash .gpu/device_install.sh 4 || exit 9
    export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 VLLM_CACHE_ROOT=/tmp/vllmcache PYTHONUNBUFFERED=1
    python3 .gpu/w/make_dummy_qwen.py /tmp/dq .gpu/w/qwen25_7b_config.json > $OUT/dummy.txt 2>&1
    set -o pipefail; python3 bench/gpu_overload.py ours $((590 - $(date +%s) + S)) 2>&1 \
      | grep -v -E "^\(.*\) (INFO|DEBUG)" | tee $OUT/log_ours.txt
    # call 5 carries .gpu/w and runs stock on the same warm machine (deadline: what the budget allows):
    export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 VLLM_CACHE_ROOT=/tmp/vllmcache PYTHONUNBUFFERED=1
    set -o pipefail; python3 bench/gpu_overload.py stock 300 2>&1 | grep -v -E "^\(.*\) (INFO|DEBUG)" \
      | tee $OUT/log_stock.txt

    python3 bench/gpu_overload.py TARGET DEADLINE_S [MODEL_DIR]

TARGET is ``ours`` or ``stock``; phases that would not fit are skipped once
DEADLINE_S seconds have passed since start; MODEL_DIR defaults to /tmp/dq.
Results: ``$OUT/res_TARGET.json`` (OUT defaults to /tmp/out), saved after
every phase.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

T0 = time.time()
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import gpu_overload_cfg as cfgmod  # noqa: E402

TARGET = sys.argv[1] if len(sys.argv) > 1 else "ours"
DEADLINE = float(sys.argv[2]) if len(sys.argv) > 2 else 545.0
MODEL_DIR = sys.argv[3] if len(sys.argv) > 3 else "/tmp/dq"
OUT = os.environ.get("OUT", "/tmp/out")
BASE = "http://127.0.0.1:8000"
MODEL = "Qwen/Qwen2.5-7B-Instruct"
METRICS_PORT = 8091
METRICS_REPORT_MS = 1000
TALLY_DIR = f"/tmp/gpu_overload_tally_{TARGET}"
EP_DIR = f"/tmp/gpu_overload_ep_{TARGET}"
POOL = "main"
# The router's classes (serve_config.yaml, the Router's user_config): thresholds and SLOs, used to score both targets alike.
HIGH_BELOW, MEDIUM_BELOW = 128, 2048
SLO = {"high": (1.0, 0.05), "medium": (3.0, 0.05), "low": (60.0, 0.05)}  # (TTFT s, TPOT s)
HDRS = ("x-priority-class", "x-queue-wait-ms", "x-llm-pool", "x-prompt-tokens", "x-max-tokens-applied", "retry-after")
res: dict = {"target": TARGET, "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "phases": {},
             "trace": {}, "counters": {}}
assert TARGET in ("ours", "stock"), "TARGET: ours | stock"


def log(*a):
    print(f"[{time.time() - T0:6.1f}s] [{TARGET}]", *a, flush=True)


def left() -> float:
    return DEADLINE - (time.time() - T0)


def save():
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, f"res_{TARGET}.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)


def sh(cmd: str, timeout: float = 20) -> str:
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=timeout).stdout.strip()
    except Exception as e:  # noqa: BLE001
        return repr(e)


def gpu() -> str:
    return sh("nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv,noheader")


def log_excerpts(tag: str) -> None:
    """Serve log lines worth reading (tracebacks, errors, the router's window moves), into the result."""
    d = "/tmp/ray/session_latest/logs"
    pat = r"Traceback|Error|error:|Exception|could not learn|watch round failed|WARNING.*deployments"
    res.setdefault("log_excerpts", {})[tag] = sh(
        f"grep -E -h -A4 '{pat}' {d}/serve/*.log {d}/worker-*.err 2>/dev/null | grep -v -E 'HTTP/1|metrics' "
        f"| head -c 20000", 30)
    if TARGET == "ours":
        res.setdefault("window_log", {})[tag] = sh(
            f"grep -h -E 'window (grow|shrink|hold)|warm|ready' {d}/serve/*.log 2>/dev/null | head -c 20000", 30)
    tgz = f"{OUT}/serve_logs_{TARGET}.tgz"
    sh(f"cd {d} && tar -czf {tgz} serve 2>/dev/null; [ $(stat -c %s {tgz}) -lt 15000000 ] || rm -f {tgz}", 60)


def words(seed: int, n: int) -> str:
    """n random 4-letter words: about 5 tokens a word with the byte-level dummy tokenizer, less one
    (100 words -> 499 tokens, +19 for the chat template: 518)."""
    rng = random.Random(seed)
    return " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(4)) for _ in range(n))


def klass(prompt_tokens) -> str | None:
    if prompt_tokens is None:
        return None
    return "high" if prompt_tokens < HIGH_BELOW else "medium" if prompt_tokens < MEDIUM_BELOW else "low"


# ---------------------------------------------------------------------------------------------- client
async def chat(c, content: str, max_tokens: int, stream: bool, t_phase: float) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "top_p": 1.0, "repetition_penalty": 1.0, "ignore_eos": True}
    r = {"status": 0, "stream": stream, "max_tokens": max_tokens, "ttft": None, "t_last": None, "tokens": 0,
         "ptok": None, "lat": None, "h": {}}
    t0 = time.perf_counter()
    r["sent"] = round(t0 - t_phase, 3)
    try:
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
            async with c.stream("POST", "/v1/chat/completions", json=body) as resp:
                r["status"], r["h"] = resp.status_code, {k: resp.headers.get(k) for k in HDRS if k in resp.headers}
                if resp.status_code != 200:
                    r["err"] = (await resp.aread()).decode(errors="replace")[:300]
                else:
                    async for line in resp.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        ch = json.loads(line[6:])
                        if "error" in ch:  # an error event mid-stream (ours: 504 budget/stall, 503)
                            r["status"], r["err"] = ch["error"].get("code", 500), str(ch["error"])[:300]
                            continue
                        now = time.perf_counter() - t0
                        if ch.get("choices"):
                            if r["ttft"] is None:
                                r["ttft"] = now
                            r["t_last"] = now
                        if ch.get("usage"):
                            r["tokens"] = ch["usage"]["completion_tokens"]
                            r["ptok"] = ch["usage"].get("prompt_tokens")
        else:
            resp = await c.post("/v1/chat/completions", json=body)
            r["status"], r["h"] = resp.status_code, {k: resp.headers.get(k) for k in HDRS if k in resp.headers}
            if resp.status_code == 200:
                u = resp.json()["usage"]
                r["tokens"], r["ptok"] = u["completion_tokens"], u.get("prompt_tokens")
            else:
                r["err"] = resp.text[:300]
    except Exception as e:  # noqa: BLE001
        r["status"], r["err"] = 599, repr(e)[:300]
    r["lat"] = time.perf_counter() - t0
    r["done"] = round(time.perf_counter() - t_phase, 3)
    return r


def pct(xs, q):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    return round(xs[min(len(xs) - 1, max(0, int(-(-q / 100 * len(xs) // 1)) - 1))], 4)  # nearest rank


def cls_of(r) -> str | None:
    return r["h"].get("x-priority-class") or klass(r["ptok"])


def met_slo(r) -> bool:
    if r["status"] != 200 or not r["tokens"]:
        return False
    cls = cls_of(r)
    if cls is None:
        return False
    ttft_slo, tpot_slo = SLO[cls]
    if r["stream"]:
        if r["ttft"] is None or r["ttft"] > ttft_slo:
            return False
        if r["tokens"] <= 1:
            return True
        return (r["t_last"] - r["ttft"]) / (r["tokens"] - 1) <= tpot_slo
    return r["lat"] <= ttft_slo + r["max_tokens"] * tpot_slo  # not streamed: the latency proxy


def summary(rs: list[dict], wall: float | None = None) -> dict:
    ok = [r for r in rs if r["status"] == 200]
    st: dict = {}
    for r in rs:
        st[str(r["status"])] = st.get(str(r["status"]), 0) + 1
    cl: dict = {}
    for r in rs:
        k = cls_of(r) or "-"
        cl[k] = cl.get(k, 0) + 1
    tpots = [(r["t_last"] - r["ttft"]) / (r["tokens"] - 1) for r in ok
             if r["stream"] and r["ttft"] is not None and r["t_last"] and r["tokens"] > 1]
    good = [r for r in ok if met_slo(r)]
    s = {"n": len(rs), "status": st, "class": cl,
         "ttft_p50": pct([r["ttft"] for r in ok], 50), "ttft_p99": pct([r["ttft"] for r in ok], 99),
         "ttft_max": pct([r["ttft"] for r in ok], 100),
         "tpot_p50": pct(tpots, 50), "tpot_p99": pct(tpots, 99),
         "lat_p50": pct([r["lat"] for r in ok], 50), "lat_p99": pct([r["lat"] for r in ok], 99),
         "lat_max": pct([r["lat"] for r in ok], 100),
         "qwait_ms_p50": pct([float(r["h"]["x-queue-wait-ms"]) for r in ok if "x-queue-wait-ms" in r["h"]], 50),
         "qwait_ms_max": pct([float(r["h"]["x-queue-wait-ms"]) for r in ok if "x-queue-wait-ms" in r["h"]], 100),
         "out_tokens": sum(r["tokens"] for r in ok),
         "good_requests": len(good), "good_tokens": sum(r["tokens"] for r in good),
         "prompt_tokens_p50": pct([r["ptok"] for r in ok], 50),
         "retry_after_429": sorted({r["h"].get("retry-after") for r in rs if r["status"] == 429} - {None},
                                   key=lambda x: float(x))}
    if wall:
        s["wall_s"] = round(wall, 2)
        s["out_tok_s"] = round(s["out_tokens"] / wall, 1)
        s["goodput_tok_s"] = round(s["good_tokens"] / wall, 1)
    errs = {}
    for r in rs:
        if r["status"] != 200 and str(r["status"]) not in errs:
            errs[str(r["status"])] = r.get("err")
    if errs:
        s["first_error_by_status"] = errs
    return s


def compact(rs: list[dict]) -> list[dict]:
    keys = ("status", "stream", "sent", "done", "lat", "ttft", "t_last", "tokens", "ptok")
    return [{k: (round(r[k], 4) if isinstance(r.get(k), float) else r.get(k)) for k in keys}
            | {"cls": cls_of(r), "qwait_ms": r["h"].get("x-queue-wait-ms"), "retry_after": r["h"].get("retry-after")}
            for r in rs]


# ---------------------------------------------------------------------------------------------- counters
async def health(c) -> dict:
    try:
        h = await c.get("/health", timeout=20)
        return {"status": h.status_code, "body": h.json()}
    except Exception as e:  # noqa: BLE001
        return {"status": 0, "err": repr(e)[:300]}


def health_pool(h: dict) -> dict:
    return ((h.get("body") or {}).get("pools") or {}).get(POOL) or {}


async def prom_generated(c) -> dict:
    """vLLM's generation-token counter as Ray's metrics agent exports it (summed over its label sets)."""
    try:
        text = (await c.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10)).text
    except Exception as e:  # noqa: BLE001
        return {"err": repr(e)[:200]}
    lines = [ln for ln in text.splitlines()
             if re.match(r"^(ray_)?(vllm[_:]|llm_engine_)generation_tokens(_total)?[{ ]", ln)]
    total = 0.0
    for ln in lines:
        try:
            total += float(ln.rsplit(" ", 1)[1])
        except ValueError:
            pass
    return {"generated": total if lines else None, "lines": lines[:4]}


async def settle(c, tag: str, max_s: float = 30.0, prom_wait_s: float = 8.0) -> dict:
    """Wait until the engine is idle (the token tally still for 1.5 s; ours: no running or waiting
    requests), then read every counter; Prometheus is re-read until it has caught up with the tally."""
    t = time.time()
    last, still_since, h = None, None, {}
    while time.time() - t < max_s and left() > 15:
        tally = cfgmod.read_tally(TALLY_DIR)["generated"]
        busy = False
        if TARGET == "ours":
            h = await health(c)
            el = health_pool(h).get("engine_load") or {}
            busy = bool(el.get("running") or el.get("waiting"))
        now = time.time()
        if tally != last or busy:
            last, still_since = tally, now
        elif now - still_since >= 1.5:
            break
        await asyncio.sleep(0.5)
    snap = {"tag": tag, "t": round(time.time() - T0, 1), "settle_s": round(time.time() - t, 1),
            "tally": cfgmod.read_tally(TALLY_DIR)}
    if TARGET == "ours":
        h = await health(c)
        el = health_pool(h).get("engine_load") or {}
        snap["health_status"] = h.get("status")
        snap["health_generated"] = el.get("generated_tokens")
        snap["engine_load"] = el
        snap["window_per_replica"] = health_pool(h).get("window_per_replica")
    t = time.time()
    while True:  # Ray exports every METRICS_REPORT_MS: wait (a little) for it to catch up with the tally
        snap["prom"] = await prom_generated(c)
        g = snap["prom"].get("generated")
        if (g is not None and g >= snap["tally"]["generated"]) or time.time() - t > prom_wait_s or left() < 40:
            break
        await asyncio.sleep(1)
    snap["prom_wait_s"] = round(time.time() - t, 1)
    res["counters"][tag] = snap
    log("counters", tag, json.dumps({k: v for k, v in snap.items() if k != "engine_load"}, default=str)[:600])
    return snap


def waste(before: dict, after: dict, served_tokens: int) -> dict:
    out = {"served_completion_tokens": served_tokens}
    for key, get in (("health", lambda s: s.get("health_generated")),
                     ("tally", lambda s: s["tally"]["generated"]),
                     ("prometheus", lambda s: s.get("prom", {}).get("generated"))):
        a, b = get(before), get(after)
        if a is not None and b is not None:
            out[f"{key}_generated"] = b - a
            out[f"{key}_wasted"] = b - a - served_tokens
    return out


async def sampler(c, phase: str, stop: asyncio.Event, t_phase: float) -> None:
    """Every second: ours -> the router's /health (window, reason, in flight, queued, engine TPOT);
    both -> the engine's token tally (throughput over time)."""
    rows = res["trace"].setdefault(phase, [])
    while not stop.is_set():
        row = {"t": round(time.perf_counter() - t_phase, 2), "gen": cfgmod.read_tally(TALLY_DIR)["generated"]}
        if TARGET == "ours":
            h = await health(c)
            p = health_pool(h)
            el = p.get("engine_load") or {}
            row |= {"status": h.get("status"), "window": p.get("window_per_replica"),
                    "reason": p.get("window_reason"), "in_flight": p.get("in_flight"), "queued": p.get("queued"),
                    "tpot_ms": round(el["tpot_s"] * 1000, 1) if el.get("tpot_s") else None,
                    "running": el.get("running"), "waiting": el.get("waiting"),
                    "kv": round(el.get("kv_cache_usage", 0), 3) if el else None,
                    "service_s": p.get("service_s")}
            if h.get("status") != 200:
                row["err"] = str(h.get("body") or h.get("err"))[:200]
        rows.append(row)
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except asyncio.TimeoutError:
            pass


# ---------------------------------------------------------------------------------------------- deploy
import httpx  # noqa: E402
import ray  # noqa: E402
import yaml  # noqa: E402
from ray import serve  # noqa: E402

from deployments.config.app_args import router_entry  # noqa: E402

log("gpu before:", gpu())
cfg = cfgmod.derive_serve_config(REPO / "serve_config.yaml", MODEL_DIR)
res["serve_config_router_user_config"] = router_entry(cfg["applications"][0])["user_config"]
res["engine_kwargs"] = cfg["applications"][0]["args"]["profiles"][cfgmod.PROFILE]["llm_config"]["engine_kwargs"]
os.makedirs(OUT, exist_ok=True)
with open(os.path.join(OUT, "serve_gpu.yaml"), "w") as f:
    yaml.safe_dump(cfg, f, sort_keys=False)
plugins = {"gpu_overload_tally": "gpu_overload_cfg:GeneratedTokenTally"}
if TARGET == "ours":  # the project's own plugin, as `pip install -e .` registers it (pyproject.toml)
    plugins["llm_serving_engine_load"] = "deployments.server.engine_load:EngineLoadLogger"
cfgmod.register_stat_loggers(EP_DIR, plugins)
sh(f"rm -rf {TALLY_DIR}")
# Ray's workers (and the vLLM engines they start) inherit this environment.
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), str(HERE), EP_DIR, os.environ.get("PYTHONPATH", "")])
os.environ[cfgmod.TALLY_ENV] = TALLY_DIR
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CACHE_ROOT", "/tmp/vllmcache")
sys.path[:0] = [str(REPO), EP_DIR]

ray_kwargs = dict(namespace="serve", num_cpus=16, num_gpus=1, resources={"gpu_4090d": 1}, include_dashboard=False,
                  log_to_driver=False, _metrics_export_port=METRICS_PORT)
try:  # Ray exports metrics every 10 s by default; every second here, so a phase's count is read promptly
    ray.init(**ray_kwargs, _system_config={"metrics_report_interval_ms": METRICS_REPORT_MS})
    res["metrics_report_interval_ms"] = METRICS_REPORT_MS
except Exception as e:  # noqa: BLE001
    log("ray.init with _system_config failed, default export interval:", repr(e)[:300])
    ray.shutdown()
    ray.init(**ray_kwargs)
t_dep = time.time()
app_name = "llm" if TARGET == "ours" else "stock"
try:
    if TARGET == "ours":  # as `serve run CONFIG` does: ServeDeploySchema -> deploy_apps
        from ray.serve._private import api as _private_api
        from ray.serve.config import gRPCOptions
        from ray.serve.schema import ServeDeploySchema

        config = ServeDeploySchema.model_validate(cfg)
        client = _private_api.serve_start(http_options=config.http_options.model_dump(),
                                          proxy_location=config.proxy_location,
                                          grpc_options=gRPCOptions(**config.grpc_options.model_dump()),
                                          controller_options=config.controller_options)
        client.deploy_apps(config, _blocking=False)
        last = None
        while True:
            st = serve.status().applications.get(app_name)
            if st is not None:
                now = (st.status, tuple(sorted((n, d.status) for n, d in st.deployments.items())))
                if now != last:
                    log("status:", now, (st.message or "")[:3000])
                    last = now
                if st.status == "RUNNING":
                    break
                if st.status in ("DEPLOY_FAILED", "UNHEALTHY"):
                    for n, d in st.deployments.items():
                        log("deployment", n, d.status, (d.message or "")[:4000])
                    raise RuntimeError(f"app {st.status}: {(st.message or '')[:4000]}")
            if time.time() - t_dep > 420:
                raise TimeoutError("not RUNNING after 420 s")
            time.sleep(2)
    else:
        from ray.serve.llm import LLMConfig, build_openai_app

        serve.start(http_options={"host": "127.0.0.1", "port": 8000})
        serve.run(build_openai_app({"llm_configs": [LLMConfig.model_validate(cfgmod.stock_llm_config(cfg))],
                                    "ingress_deployment_config": {"ray_actor_options": {"num_cpus": 0.5}}}),
                  name=app_name, route_prefix="/", blocking=False)
    res["running_s"] = round(time.time() - t_dep, 1)
    # ready: the first answered chat request (ours: also /health 200 = the router saw the engine's warm-up)
    health_503 = 0
    while True:
        try:
            r = httpx.post(BASE + "/v1/chat/completions", timeout=60,
                           json={"model": MODEL, "messages": [{"role": "user", "content": "abcd efgh"}],
                                 "max_tokens": 2})
            if r.status_code == 200:
                if TARGET == "stock":
                    break
                h = httpx.get(BASE + "/health", timeout=30)
                if h.status_code == 200:
                    break
                health_503 += 1
            elif r.status_code not in (404, 503):
                log("probe", r.status_code, r.text[:300])
        except httpx.HTTPError as e:
            if time.time() - t_dep > 400:
                log("probe", repr(e))
        if time.time() - t_dep > 480:
            raise TimeoutError("no 200 answer after 480 s")
        time.sleep(1)
    res["ready_s"] = round(time.time() - t_dep, 1)
    log("READY in", res["ready_s"], "s; gpu:", gpu())
except Exception:
    res["deploy_error"] = traceback.format_exc()
    log("DEPLOY FAILED\n" + res["deploy_error"])
    log_excerpts("deployfail")
    save()
    sys.stdout.flush()
    os._exit(3)
save()


# ---------------------------------------------------------------------------------------------- phases
async def loaded_phase(c, name: str, make_tasks, t_wait_s: float | None = None, extra=None):
    """Run one loaded phase with the 1 s sampler; counters read before (idle) and after (idle again)."""
    before = await settle(c, f"before_{name}")
    stop = asyncio.Event()
    t = time.perf_counter()
    samp = asyncio.create_task(sampler(c, name, stop, t))
    tasks = make_tasks(t)
    out = {}
    if extra is not None:
        out = await extra(t)
    timeout = t_wait_s if t_wait_s is not None else max(20.0, left() - 40)
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    wall = time.perf_counter() - t
    for p in pending:
        p.cancel()
    rs = [d.result() for d in done]
    stop.set()
    await samp
    s = summary(rs, wall)
    if pending:
        s["unfinished_at_deadline"] = len(pending)
    after = await settle(c, f"after_{name}")
    served = sum(r["tokens"] for r in rs if r["status"] == 200) + sum(
        r["tokens"] for r in out.get("side", []) if r["status"] == 200)
    s["wasted_engine_tokens"] = waste(before, after, served)
    res["phases"][name] = s
    res.setdefault("raw", {})[name] = compact(rs)
    if out.get("side"):
        res["raw"][name + "_short"] = compact(out["side"])
    log(name, json.dumps(s, default=str)[:1500])
    save()
    return s, out


async def phases():
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=2000)
    async with httpx.AsyncClient(base_url=BASE, timeout=httpx.Timeout(300.0), limits=limits) as c:
        P = res["phases"]
        t = time.perf_counter()
        for i in range(3):
            await chat(c, words(-1 - i, 100), 16, True, t)
        # A: TTFT at low load; B: single stream
        A = [await chat(c, words(100 + i, 100), 8, True, t) for i in range(10)]
        P["A_ttft_idle_518tok"] = summary(A)
        B = [await chat(c, words(200 + i, 100), 256, True, t) for i in range(3)]
        P["B_single_stream"] = summary(B) | {
            "e2e_tok_s": [round(r["tokens"] / r["lat"], 1) for r in B if r["status"] == 200]}
        log("A", P["A_ttft_idle_518tok"]["ttft_p50"], "B", P["B_single_stream"]["e2e_tok_s"])
        save()

        def burst(stream: bool, seed: int):
            return lambda t0: [asyncio.create_task(chat(c, words(seed + i, 100), 256, stream, t0)) for i in range(256)]

        # C1: 256 concurrent, not streamed
        await loaded_phase(c, "C1_256_nonstream", burst(False, 1000), t_wait_s=min(240.0, max(20.0, left() - 150)))

        # D: short chats idle
        if left() > 120:
            D = [await chat(c, words(5000 + i, 10), 16, True, time.perf_counter()) for i in range(20)]
            P["D_short_idle"] = summary(D)
            P["D_short_idle"]["ttfts"] = [round(r["ttft"], 3) if r["ttft"] else None for r in D]
            log("D", P["D_short_idle"]["ttft_p50"], P["D_short_idle"]["ttft_p99"])

        # EF: flood of 128 x ~6,018-token prompts + 20 short chats 0.5 s apart
        if left() > 110:
            async def shorts(t0):
                await asyncio.sleep(3)
                ts = []
                for i in range(20):
                    ts.append(asyncio.create_task(chat(c, words(6000 + i, 10), 16, True, t0)))
                    await asyncio.sleep(0.5)
                E = list(await asyncio.gather(*ts))
                P["E_short_during_flood"] = summary(E)
                P["E_short_during_flood"]["ttfts"] = [round(r["ttft"], 3) if r["ttft"] else None for r in E]
                log("E", json.dumps(P["E_short_during_flood"], default=str)[:800])
                return {"side": E}

            await loaded_phase(c, "F_flood_128x6k", lambda t0: [
                asyncio.create_task(chat(c, words(10000 + i, 1200), 256, False, t0)) for i in range(128)],
                t_wait_s=max(20.0, min(200.0, left() - 60)), extra=shorts)

        # CS: the C1 workload streamed; CR: C1 again (a second burst)
        if left() > 95:
            await loaded_phase(c, "CS_256_stream", burst(True, 20000), t_wait_s=max(20.0, min(120.0, left() - 50)))
        if left() > 80:
            await loaded_phase(c, "CR_256_nonstream_again", burst(False, 30000),
                               t_wait_s=max(20.0, min(120.0, left() - 45)))


async def final_prom():
    """Once more at the end, given time for Ray's export: vLLM's Prometheus counter against the tally."""
    async with httpx.AsyncClient(base_url=BASE, timeout=20) as c:
        await settle(c, "end", max_s=10, prom_wait_s=min(20.0, max(0.0, left() - 20)))


try:
    asyncio.run(phases())
    asyncio.run(final_prom())
except Exception:
    res["bench_error"] = traceback.format_exc()
    log("BENCH ERROR\n" + res["bench_error"])
res["gpu_end"] = gpu()
log_excerpts("end")
save()
log("RESULT " + json.dumps(res["phases"], default=str)[:6000])
log("excerpts:\n" + str(res.get("log_excerpts", {}).get("end", ""))[:6000])
if left() > 25:
    try:
        serve.shutdown()
        ray.shutdown()
    except Exception:  # noqa: BLE001
        pass
log("done")
sys.stdout.flush()
os._exit(0)
