r"""Streaming at GPU scale (issue 12): bare vLLM vs the stock app vs ours on the lent H200. Measurement only.

One target per process, each started, measured and stopped within one device call:

- ``bare``:  vLLM's own OpenAI server (``python3 -m vllm.entrypoints.openai.api_server``), port 8001,
             the engine arguments of the ``qwen2.5-7b-4090d-tp1-fp16`` profile as bench/gpu_overload.py
             derives them (dummy weights, fp16, ``max_model_len`` 8192, ``gpu_memory_utilization`` 0.9,
             chunked prefill 2,048, ``long_prefill_token_threshold`` 512), ``scheduling_policy`` dropped
             as for stock (neither sends a priority);
- ``stock``: ray.serve.llm's ``build_openai_app`` on the same profile's LLMConfig (as gpu_overload.py);
- ``ours``:  the project's app, deployed from serve_config.yaml as gpu_overload.py does it.

Workload (issue 12): distinct ~518-token chat prompts (100 random 4-letter words + the chat template,
byte-level dummy tokenizer), 256 tokens out, temperature 0, ``ignore_eos``, ``"stream": true`` with
``stream_options: {include_usage: true}``. The load generator is this file's ``client`` mode: a fresh
process that forks 8 workers, each running asyncio (+ uvloop where installed) and httpx, all starting at
one wall-clock instant; each worker reports its own CPU time so the client is shown not to be the limit.

Phases per target, in this order (all but the first four are skipped when they would not fit before DEADLINE_S):

- ``warm``  3 short streamed requests, one at a time
- ``s1``    1 stream: ``S1_N`` streamed requests one at a time (TTFT, end-to-end tok/s; default 10, 3 in
            passes 1-6)
- ``c64``   64 concurrent streams;  ``c256`` 256 concurrent streams
- ``p256``  256 concurrent streams again, with py-spy (``record --nonblocking --threads``, 100 Hz) on
            the Serve proxy, the ingress/router replica, the LLM replica and vLLM's EngineCore process
            (bare: the API server and the EngineCore) for up to 15 s from 3 s after the start
- ``n256``  256 concurrent, not streamed (reference)
- ``c64b``, ``c256b`` repeats (run-to-run spread) if time is left

Reported per phase: output tok/s (completion tokens from ``usage`` / wall from the common start to the
last answer), TTFT p50/p99 (first chunk with content), content chunks per request, inter-chunk gap
p50/p90/p99/p99.9/max pooled over every gap of every request, TPOT per request, client CPU; for the
server side, every process's CPU seconds over the phase (psutil, user + system, all threads; top
processes named, key roles labelled), the key roles' CPU% every 0.5 s and their busiest threads, and
CPU microseconds per delivered chunk and per output token for each hop; event-loop lag probes every
0.25 s: ``GET /-/healthz`` (answered by Serve's proxy alone) and ``GET /v1/models`` (proxy + ingress;
bare: the API server). The profiled phase adds, per process, the top functions by own time and by
inclusive time, own time by package and samples per thread (raw collapsed stacks in
``stacks_TARGET.tgz``; speedscope and flamegraph tools read that format).

Exact commands (docs/streaming.md), from the repository root here:

    bash ../shared/gpu/prepare.sh --with-ray       # if .gpu/p0..p3 are missing (~3 min)
    mkdir -p .gpu/w && cp ../shared/gpu/make_dummy_qwen.py ../shared/gpu/qwen25_7b_config.json .gpu/w/
    rm -rf .gpu/head && mkdir -p .gpu/head && git archive HEAD deployments | tar -x -C .gpu/head && \
      git rev-parse HEAD > .gpu/head/COMMIT
    mkdir -p .gpu/whl && python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux1_x86_64 -d .gpu/whl py-spy==0.4.3

    # device calls, kind nvidia-h200, back to back on one machine (docs/streaming.md lists the carries):
    python3 bench/gpu_streaming.py stock|ours|bare DEADLINE_S [MODEL_DIR]

MODEL_DIR defaults to /tmp/dq (``make_dummy_qwen.py``). ``PYSPY`` names the py-spy binary
(default /tmp/pyspy/bin/py-spy); without it the profiled phase is skipped. Results under ``$OUT``
(default /tmp/out): ``res_RUN.json`` (saved after every phase), ``profile_RUN.txt`` (the tables),
``stacks_RUN.tgz``, ``server_RUN.txt`` (log excerpts). RUN is the target's name, except as below.

Pass 3 (ours only): ``STREAM_BATCHING_MS=50`` adds ``experimental_configs: {stream_batching_interval_ms:
50}`` to the served profile's llm_config, which gives the LLM replica Ray Serve LLM's fixed-window
batcher back instead of the project's ready-batching (deployments/server/stream_batching.py). The run
is then named ``ours_window`` (``res_ours_window.json`` ...) and the setting is recorded in the result
(``stream_batching_interval_ms``). ``res_*.json`` also records the sha256 of the stream-batching code
that was measured (``code``).

Pass 8 (ours only): ``SPANS=1`` turns OpenTelemetry on in every process (an OTLP sink in this script) and
runs only ``warm`` and ``s1``; ``res_ours_spans.json`` gets ``spans``: one stream's TTFT split into the
router's spans, the handle hop to the LLM replica, the replica's own span (chat template to the engine's
first output) and the hop back (bench/tracing_overhead.Sink.breakdown).

Issue 13 (ours only): ``TOOLS=1`` adds ``enable_auto_tool_choice: true`` and ``tool_call_parser: hermes`` (vLLM's
settings for Qwen2.5's tool calls) to the profile's engine_kwargs and runs ``warm`` and three non-streamed tool
calls (``tool_choice`` auto, required, a named function) into ``res_ours_tools.json``'s ``tools``.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path

T0 = time.time()
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MODEL = "Qwen/Qwen2.5-7B-Instruct"
OUT = os.environ.get("OUT", "/tmp/out")
PYSPY = os.environ.get("PYSPY", "/tmp/pyspy/bin/py-spy")
WORDS = 100          # 100 words -> 499 prompt tokens + 19 of the chat template = 518
MAX_TOKENS = 256
CLIENT_PROCS = 8
# Pass 2 (ours only): after the base phases, redeploy with this many router replicas each (only the Router
# deployment's autoscaling bounds change, a lightweight update: the LLM replica and its engine stay up)
# and repeat c64 / c256. "" runs pass 1's phases.
# Requests of the 1-stream phase, one at a time (passes 1-6: 3; TTFT p50 of 3 moved by tens of ms).
S1_N = int(os.environ.get("S1_N", "10"))
ROUTER_STEPS = [int(x) for x in os.environ.get("ROUTER_STEPS", "").split(",") if x.strip()]
# Pass 3 (ours only): Ray Serve LLM's fixed stream-batching window back, in ms ("" = the project's default,
# ready-batching without a window). Set, the run is named "ours_window".
STREAM_BATCHING_MS = os.environ.get("STREAM_BATCHING_MS", "").strip()
# Pass 8 (ours only): SPANS=1 runs the app with OpenTelemetry on in every process (an OTLP sink in this
# script, bench/tracing_overhead.Sink) and only the warm and 1-stream phases, to split one stream's TTFT by
# span: the router's, the handle hop in, the LLM replica's (chat template .. first output), the hop back.
# The run is named "ours_spans"; tracing's own cost is in the client's TTFT, so compare with an "ours" run.
SPANS = os.environ.get("SPANS", "").strip() == "1"
# Issue 13 (ours only): TOOLS=1 adds vLLM's tool-call settings for Qwen2.5 (enable_auto_tool_choice, the hermes
# parser) to the profile's engine_kwargs and runs only the warm phase and three tool calls (tool_choice auto,
# required, a named function): whether Ray Serve LLM of this stack hands them to vLLM's frontend and the app
# serves them. The run is named "ours_tools".
TOOLS = os.environ.get("TOOLS", "").strip() == "1"
TOOL_SETTINGS = {"enable_auto_tool_choice": True, "tool_call_parser": "hermes"}
SINK: list = []
DEPLOYED: dict = {}


def words(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(4)) for _ in range(n))


def pct(xs, q):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    return round(xs[min(len(xs) - 1, max(0, int(-(-q / 100 * len(xs) // 1)) - 1))], 5)  # nearest rank


# =============================================================================================== client
async def _one(c, prompt: str, spec: dict) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": spec["max_tokens"],
            "temperature": 0, "top_p": 1.0, "repetition_penalty": 1.0, "ignore_eos": True}
    stream = spec["stream"]
    r = {"status": 0, "ttft": None, "t_last": None, "tokens": 0, "ptok": None, "chunks": 0, "events": 0,
         "lat": None, "qwait": None, "gaps": [], "t_start": time.time()}
    t0 = time.perf_counter()
    try:
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
            async with c.stream("POST", "/v1/chat/completions", json=body) as resp:
                r["status"], r["qwait"] = resp.status_code, resp.headers.get("x-queue-wait-ms")
                if resp.status_code != 200:
                    r["err"] = (await resp.aread()).decode(errors="replace")[:300]
                else:
                    last = None
                    async for line in resp.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        now = time.perf_counter()
                        ch = json.loads(line[6:])
                        r["events"] += 1
                        if "error" in ch:
                            r["status"], r["err"] = ch["error"].get("code", 500), str(ch["error"])[:300]
                            continue
                        chs = ch.get("choices")
                        if chs and (chs[0].get("delta") or {}).get("content"):
                            r["chunks"] += 1
                            if last is None:
                                r["ttft"] = now - t0
                            else:
                                r["gaps"].append(now - last)
                            last = now
                            r["t_last"] = now - t0
                        u = ch.get("usage")
                        if u:
                            r["tokens"], r["ptok"] = u["completion_tokens"], u.get("prompt_tokens")
        else:
            resp = await c.post("/v1/chat/completions", json=body)
            r["status"], r["qwait"] = resp.status_code, resp.headers.get("x-queue-wait-ms")
            if resp.status_code == 200:
                u = resp.json()["usage"]
                r["tokens"], r["ptok"] = u["completion_tokens"], u.get("prompt_tokens")
            else:
                r["err"] = resp.text[:300]
    except Exception as e:  # noqa: BLE001
        r["status"], r["err"] = 599, repr(e)[:300]
    r["lat"] = time.perf_counter() - t0
    r["t_end"] = time.time()
    return r


async def _wrun(spec: dict, seeds: list[int]) -> tuple[list[dict], float, float]:
    import httpx
    prompts = [words(s, spec.get("words", WORDS)) for s in seeds]
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=2000)
    async with httpx.AsyncClient(base_url=spec["base"], timeout=httpx.Timeout(spec.get("timeout", 300.0)),
                                 limits=limits) as c:
        await asyncio.sleep(max(0.0, spec["start_at"] - time.time()))
        c0, w0 = time.process_time(), time.time()
        if spec.get("sequential"):
            outs = [await _one(c, p, spec) for p in prompts]
        else:
            outs = list(await asyncio.gather(*[_one(c, p, spec) for p in prompts]))
        return outs, time.process_time() - c0, time.time() - w0


def _warm(_):
    import httpx  # noqa: F401
    try:
        import uvloop  # noqa: F401
    except Exception:  # noqa: BLE001
        pass
    time.sleep(0.2)
    return os.getpid()


def _worker(args):
    spec, seeds = args
    try:
        import uvloop
        uvloop.install()
    except Exception:  # noqa: BLE001
        pass
    return asyncio.run(_wrun(spec, seeds))


def client_summary(rs: list[dict], spec: dict, cpus: list[float], walls: list[float]) -> dict:
    ok = [r for r in rs if r["status"] == 200]
    st = Counter(str(r["status"]) for r in rs)
    gaps = [g for r in ok for g in r["gaps"]]
    tpots = [(r["t_last"] - r["ttft"]) / (r["tokens"] - 1) for r in ok
             if r["ttft"] is not None and r["t_last"] and r["tokens"] > 1]
    chunks = sum(r["chunks"] for r in ok)
    out_tokens = sum(r["tokens"] for r in ok)
    s = {"n": len(rs), "status": dict(st), "stream": spec["stream"], "out_tokens": out_tokens,
         "prompt_tokens_p50": pct([r["ptok"] for r in ok], 50),
         "completion_tokens_min": min((r["tokens"] for r in ok), default=None)}
    if rs:
        t_first = min(r["t_start"] for r in rs)
        wall = max(r["t_end"] for r in rs) - t_first
        s["wall_s"] = round(wall, 3)
        s["start_late_s"] = round(t_first - spec["start_at"], 3)
        s["out_tok_s"] = round(out_tokens / wall, 1)
    s |= {"ttft_p50": pct([r["ttft"] for r in ok], 50), "ttft_p99": pct([r["ttft"] for r in ok], 99),
          "ttft_min": pct([r["ttft"] for r in ok], 0), "ttft_max": pct([r["ttft"] for r in ok], 100),
          "lat_p50": pct([r["lat"] for r in ok], 50), "lat_max": pct([r["lat"] for r in ok], 100)}
    if spec["stream"]:
        s |= {"chunks_total": chunks, "chunks_per_req_p50": pct([r["chunks"] for r in ok], 50),
              "chunks_per_req_min": pct([r["chunks"] for r in ok], 0),
              "chunks_per_req_max": pct([r["chunks"] for r in ok], 100),
              "events_per_req_p50": pct([r["events"] for r in ok], 50),
              "tokens_per_chunk": round(out_tokens / chunks, 3) if chunks else None,
              "gap_ms_p50": _ms(pct(gaps, 50)), "gap_ms_p90": _ms(pct(gaps, 90)), "gap_ms_p99": _ms(pct(gaps, 99)),
              "gap_ms_p999": _ms(pct(gaps, 99.9)), "gap_ms_max": _ms(pct(gaps, 100)), "gaps_n": len(gaps),
              "gaps_over_50ms": sum(1 for g in gaps if g > 0.05),
              "tpot_ms_p50": _ms(pct(tpots, 50)), "tpot_ms_p99": _ms(pct(tpots, 99))}
    if spec.get("sequential"):
        s["e2e_tok_s"] = [round(r["tokens"] / r["lat"], 1) for r in ok]
        s["ttfts_ms"] = [_ms(r["ttft"]) for r in ok]
    qw = [float(r["qwait"]) for r in ok if r.get("qwait") not in (None, "")]
    if qw:
        s["queue_wait_ms_p50"], s["queue_wait_ms_max"] = pct(qw, 50), pct(qw, 100)
    s["client_cpu_s"] = [round(c, 2) for c in cpus]
    s["client_cpu_util_max"] = round(max((c / w for c, w in zip(cpus, walls) if w > 0), default=0.0), 3)
    errs = [r.get("err") for r in rs if r["status"] != 200]
    if errs:
        s["first_err"] = errs[0]
    return s


def _ms(x):
    return None if x is None else round(x * 1000, 2)


def client_main(spec_json: str, out_path: str) -> None:
    import multiprocessing as mp

    import httpx  # noqa: F401  (imported before the fork, so the workers start warm)
    spec = json.loads(spec_json)
    seeds = list(range(spec["seed"], spec["seed"] + spec["n"]))
    nproc = 1 if spec.get("sequential") else min(spec.get("procs", CLIENT_PROCS), len(seeds))
    with mp.get_context("fork").Pool(nproc) as pool:
        pool.map(_warm, range(nproc), chunksize=1)  # every worker up (uvloop, httpx) before the clock starts
        spec["start_at"] = time.time() + 0.5        # one instant for all workers
        with open(out_path + ".started", "w") as f:  # the driver times its profiler and CPU window from this
            f.write(str(spec["start_at"]))
        got = pool.map(_worker, [(spec, seeds[i::nproc]) for i in range(nproc)])
    rs = [r for outs, _, _ in got for r in outs]
    s = client_summary(rs, spec, [c for _, c, _ in got], [w for _, _, w in got])
    req = [{"ttft": _ms(r["ttft"]), "lat": round(r["lat"], 3), "tokens": r["tokens"], "chunks": r["chunks"],
            "status": r["status"], "start": round(r["t_start"] - spec["start_at"], 3)} for r in rs]
    with open(out_path, "w") as f:
        json.dump({"spec": spec, "summary": s, "requests": req}, f)


# =============================================================================================== driver
def log(*a):
    print(f"[{time.time() - T0:6.1f}s] [{RUN}]", *a, flush=True)


def left() -> float:
    return DEADLINE - (time.time() - T0)


def save():
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, f"res_{RUN}.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)


def sh(cmd: str, timeout: float = 30) -> str:
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=timeout).stdout.strip()
    except Exception as e:  # noqa: BLE001
        return repr(e)


def gpu() -> str:
    return sh("nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv,noheader")


# ------------------------------------------------------------------------------ processes and CPU
def proc_rows() -> list[tuple[int, int, str]]:
    import psutil
    rows = []
    for p in psutil.process_iter(["pid", "ppid", "cmdline", "name"]):
        try:
            cl = " ".join(p.info["cmdline"] or []) or (p.info["name"] or "")
        except Exception:  # noqa: BLE001
            continue
        rows.append((p.info["pid"], p.info["ppid"], cl[:200]))
    return rows


def find_roles(server_pid: int | None = None) -> dict[str, int]:
    """One process of each hop, by process title (bench/hop_cpu.py; bare: its API server and EngineCore)."""
    import hop_cpu
    roles = hop_cpu.find_roles(server_pid if TARGET == "bare" else None)
    if TARGET == "bare":
        roles = {role: pids for role, pids in roles.items() if role in ("api_server", "engine_core")}
    return {role: pids[-1] for role, pids in roles.items()}


def cpu_snapshot() -> dict[int, tuple[float, str]]:
    import psutil
    snap = {}
    for p in psutil.process_iter(["pid", "cmdline", "name", "cpu_times"]):
        try:
            ct = p.info["cpu_times"]
            cl = " ".join(p.info["cmdline"] or []) or (p.info["name"] or "")
            snap[p.info["pid"]] = (ct.user + ct.system, cl[:120])
        except Exception:  # noqa: BLE001
            continue
    return snap


def thread_snapshot(pids: dict[str, int]) -> dict[str, dict[int, tuple[float, str]]]:
    import psutil
    out = {}
    for role, pid in pids.items():
        try:
            th = {}
            for t in psutil.Process(pid).threads():
                try:
                    name = Path(f"/proc/{pid}/task/{t.id}/comm").read_text().strip()
                except OSError:
                    name = "?"
                th[t.id] = (t.user_time + t.system_time, name)
            out[role] = th
        except Exception:  # noqa: BLE001
            out[role] = {}
    return out


class CpuWatch(threading.Thread):
    """CPU% of each key process every ``interval`` s."""

    def __init__(self, pids: dict[str, int], interval: float = 0.5):
        super().__init__(daemon=True)
        import psutil
        self.procs = {}
        for role, pid in pids.items():
            try:
                self.procs[role] = psutil.Process(pid)
            except Exception:  # noqa: BLE001
                pass
        self.interval, self.stop_ev, self.series = interval, threading.Event(), defaultdict(list)

    def run(self):
        last = {}
        while not self.stop_ev.is_set():
            now = time.time()
            for role, p in self.procs.items():
                try:
                    ct = p.cpu_times()
                    c = ct.user + ct.system
                except Exception:  # noqa: BLE001
                    continue
                if role in last:
                    t0, c0 = last[role]
                    self.series[role].append((round(now, 2), round(100 * (c - c0) / max(1e-6, now - t0), 1)))
                last[role] = (now, c)
            self.stop_ev.wait(self.interval)


class LagProbe(threading.Thread):
    """Latency of cheap GETs every 0.25 s: how long the proxy's (and the ingress') event loop takes to answer."""

    def __init__(self, base: str, paths: list[str]):
        super().__init__(daemon=True)
        self.base, self.paths, self.stop_ev, self.lat = base, paths, threading.Event(), defaultdict(list)

    def run(self):
        import httpx
        with httpx.Client(base_url=self.base, timeout=30) as c:
            while not self.stop_ev.is_set():
                for path in self.paths:
                    t = time.perf_counter()
                    try:
                        c.get(path)
                        self.lat[path].append(time.perf_counter() - t)
                    except Exception:  # noqa: BLE001
                        self.lat[path].append(None)
                self.stop_ev.wait(0.25)


# ------------------------------------------------------------------------------ py-spy
def pyspy_ok() -> str:
    if not os.path.exists(PYSPY):
        return f"no py-spy at {PYSPY}"
    return ""


def pkg_of(path: str) -> str:
    """A short bucket for a frame's file: the top package (site-packages relative) or stdlib module."""
    p = path.replace("\\", "/")
    for marker in ("site-packages/", "dist-packages/", "/tmp/site/"):
        if marker in p:
            p = p.split(marker, 1)[1]
            break
    else:
        m = re.search(r"python3\.\d+/(.*)", p)
        if m:
            p = m.group(1)
    parts = [x for x in p.split("/") if x]
    if not parts:
        return "?"
    if parts[0] in ("ray", "vllm") and len(parts) > 2:
        return "/".join(parts[:3]) if parts[1] in ("serve", "_private", "llm", "v1", "entrypoints") else \
            "/".join(parts[:2])
    if parts[0] == "deployments" and len(parts) > 1:
        return "/".join(parts[:2])
    return parts[0] if len(parts) > 1 else parts[0].removesuffix(".py")


# frames every sample of an event-loop or worker thread passes through: left out of the inclusive table
SCAFFOLD = {"<module>", "run", "Runner.run", "BaseEventLoop.run_until_complete", "BaseEventLoop.run_forever",
            "BaseEventLoop._run_once", "Handle._run", "_bootstrap", "_bootstrap_inner", "Thread.run",
            "Thread._bootstrap", "Thread._bootstrap_inner", "main", "_run_module_as_main", "_run_code"}
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def analyse_raw(path: str, rate: int, dur: float, top: int = 25) -> dict:
    """py-spy ``--format raw`` (collapsed stacks, root first, thread frame first with ``--threads``)."""
    self_fn, incl_fn, self_pkg, per_thread = Counter(), Counter(), Counter(), Counter()
    total = 0
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line or " " not in line:
                continue
            stack, n = line.rsplit(" ", 1)
            try:
                n = int(n)
            except ValueError:
                continue
            frames = stack.split(";")
            thread = "?"
            if frames and (frames[0].startswith("thread") or frames[0].startswith("process")
                           or not FRAME.match(frames[0])):
                thread, frames = frames[0], frames[1:]
            total += n
            per_thread[thread] += n
            if not frames:
                continue
            keys = []
            for fr in frames:
                m = FRAME.match(fr)
                keys.append(f"{m.group('func')} ({m.group('file')})" if m else fr)
            self_fn[keys[-1]] += n
            m = FRAME.match(frames[-1])
            self_pkg[pkg_of(m.group("file")) if m else "?"] += n
            for k in set(keys):
                incl_fn[k] += n

    def table(c: Counter, skip=()):
        rows = [(k, v, round(100 * v / total, 1)) for k, v in c.most_common(top + 40)
                if k.split(" (", 1)[0] not in skip] if total else []
        return rows[:top]

    expected = rate * dur
    return {"samples": total, "expected_per_thread": int(expected),
            "threads": [(k, v, round(v / expected, 3)) for k, v in per_thread.most_common(8)],
            "self": table(self_fn), "inclusive": table(incl_fn, SCAFFOLD), "self_by_package": table(self_pkg)}


def profile_text(prof: dict) -> str:
    out = []
    for role, p in prof.items():
        if "error" in p:
            out.append(f"== {role}: py-spy failed: {p['error']}\n")
            continue
        out.append(f"== {role} (pid {p['pid']}): {p['samples']} active samples in {p['dur_s']} s at {p['rate']} Hz "
                   f"({p['expected_per_thread']} per fully busy thread)")
        out.append("threads (samples, busy fraction): " + "; ".join(f"{t} {n} {b}" for t, n, b in p["threads"]))
        for key, title in (("self_by_package", "own time by package"), ("self", "top functions, own time"),
                           ("inclusive", "top functions, inclusive")):
            out.append(f"-- {title}")
            out += [f"{pc:6.1f}%  {n:6d}  {k}" for k, n, pc in p[key]]
        out.append("")
    return "\n".join(out)


# ------------------------------------------------------------------------------ targets
def engine_kwargs() -> dict:
    import gpu_overload_cfg as cfgmod
    cfg = cfgmod.derive_serve_config(REPO / "serve_config.yaml", MODEL_DIR)
    return cfgmod.stock_llm_config(cfg)["engine_kwargs"]


def bare_cmd() -> list[str]:
    flags = []
    for k, v in engine_kwargs().items():
        opt = "--" + k.replace("_", "-")
        if v is True:
            flags.append(opt)
        elif v is False or v is None:
            continue
        else:
            flags += [opt, str(v)]
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", MODEL_DIR,
            "--served-model-name", MODEL, *flags, "--host", "127.0.0.1", "--port", "8001"]


def wait_ready(base: str, t_start: float, limit_s: float, alive=lambda: True, health: bool = False) -> float:
    import httpx
    while True:
        if not alive():
            raise RuntimeError("server process exited")
        try:
            r = httpx.post(base + "/v1/chat/completions", timeout=60, json={
                "model": MODEL, "messages": [{"role": "user", "content": "abcd efgh"}], "max_tokens": 2})
            if r.status_code == 200 and (not health or httpx.get(base + "/health", timeout=30).status_code == 200):
                return time.time() - t_start
        except Exception:  # noqa: BLE001
            pass
        if time.time() - t_start > limit_s:
            raise TimeoutError(f"not ready after {limit_s} s")
        time.sleep(1)


def start_target() -> tuple[str, object]:
    """Start the target; return its base URL and a handle for ``stop_target``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CACHE_ROOT", "/tmp/vllmcache")
    t0 = time.time()
    if TARGET == "bare":
        cmd = bare_cmd()
        res["server_cmd"] = " ".join(cmd)
        log("server:", res["server_cmd"])
        logf = open("/tmp/bare_server.log", "w")
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        res["server_pid"] = proc.pid
        res["ready_s"] = round(wait_ready("http://127.0.0.1:8001", t0, 420, lambda: proc.poll() is None), 1)
        return "http://127.0.0.1:8001", proc

    import ray
    import yaml
    from ray import serve

    sys.path.insert(0, str(HERE))
    import gpu_overload_cfg as cfgmod
    cfg = cfgmod.derive_serve_config(REPO / "serve_config.yaml", MODEL_DIR)
    os.makedirs(OUT, exist_ok=True)
    ep_dir = f"/tmp/gpu_streaming_ep_{TARGET}"
    if TARGET == "ours" and os.environ.get("ROUTERS"):  # router replicas from the start (the Router's entry)
        from deployments.config.app_args import router_entry
        router_entry(cfg["applications"][0])["autoscaling_config"] = {
            "min_replicas": int(os.environ["ROUTERS"]), "max_replicas": int(os.environ["ROUTERS"])}
    if TARGET == "ours" and STREAM_BATCHING_MS:  # pass 3: Ray Serve LLM's fixed window back (ours_window)
        lc = cfg["applications"][0]["args"]["profiles"][cfgmod.PROFILE]["llm_config"]
        lc.setdefault("experimental_configs", {})["stream_batching_interval_ms"] = int(STREAM_BATCHING_MS)
        res["stream_batching_interval_ms"] = int(STREAM_BATCHING_MS)
    if TARGET == "ours" and TOOLS:
        cfg["applications"][0]["args"]["profiles"][cfgmod.PROFILE]["llm_config"]["engine_kwargs"].update(TOOL_SETTINGS)
    if TARGET == "ours":  # the project's own stat-logger plugin, as `pip install -e .` registers it
        cfgmod.register_stat_loggers(ep_dir, {"llm_serving_engine_load":
                                              "deployments.server.engine_load:EngineLoadLogger"})
        with open(os.path.join("/tmp", "serve_gpu_streaming.yaml"), "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), str(HERE), ep_dir, os.environ.get("PYTHONPATH", "")])
    sys.path[:0] = [str(REPO), ep_dir]
    if SPANS:  # before Ray starts: the router and the LLM replica inherit the exporter's endpoint
        from tracing_overhead import Sink

        SINK.append(Sink())
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = SINK[0].url
    ray.init(namespace="serve", num_cpus=16, num_gpus=1, resources={"gpu_4090d": 1}, include_dashboard=False,
             log_to_driver=False)
    if TARGET == "ours":  # as `serve run CONFIG` does: ServeDeploySchema -> deploy_apps
        from ray.serve._private import api as _private_api
        from ray.serve.config import gRPCOptions
        from ray.serve.schema import ServeDeploySchema

        res["engine_kwargs"] = cfg["applications"][0]["args"]["profiles"][cfgmod.PROFILE]["llm_config"][
            "engine_kwargs"]
        config = ServeDeploySchema.model_validate(cfg)
        client = _private_api.serve_start(http_options=config.http_options.model_dump(),
                                          proxy_location=config.proxy_location,
                                          grpc_options=gRPCOptions(**config.grpc_options.model_dump()),
                                          controller_options=config.controller_options)
        client.deploy_apps(config, _blocking=False)
        DEPLOYED.update(client=client, cfg=cfg)
        while True:
            st = serve.status().applications.get("llm")
            if st is not None and st.status == "RUNNING":
                break
            if st is not None and st.status in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise RuntimeError(f"app {st.status}: {(st.message or '')[:3000]} " + "; ".join(
                    f"{n}: {d.status} {(d.message or '')[:1500]}" for n, d in st.deployments.items()))
            if time.time() - t0 > 420:
                raise TimeoutError("not RUNNING after 420 s")
            time.sleep(2)
    else:
        from ray.serve.llm import LLMConfig, build_openai_app

        lc = cfgmod.stock_llm_config(cfg)
        res["engine_kwargs"] = lc["engine_kwargs"]
        serve.start(http_options={"host": "127.0.0.1", "port": 8000})
        serve.run(build_openai_app({"llm_configs": [LLMConfig.model_validate(lc)],
                                    "ingress_deployment_config": {"ray_actor_options": {"num_cpus": 0.5}}}),
                  name="stock", route_prefix="/", blocking=False)
    res["ready_s"] = round(wait_ready("http://127.0.0.1:8000", t0, 480, health=TARGET == "ours"), 1)
    return "http://127.0.0.1:8000", None


def stop_target(handle) -> None:
    if TARGET == "bare":
        import signal
        try:
            os.killpg(handle.pid, signal.SIGTERM)
            handle.wait(timeout=40)
        except Exception as e:  # noqa: BLE001
            log("SIGTERM did not end the server:", repr(e), "-> SIGKILL")
            try:
                os.killpg(handle.pid, signal.SIGKILL)
            except Exception:  # noqa: BLE001
                pass
        return
    from ray import serve
    import ray
    try:
        serve.shutdown()
    except Exception as e:  # noqa: BLE001
        log("serve.shutdown:", repr(e)[:200])
    ray.shutdown()


def code_hashes() -> dict:
    """sha256 (first 16 hex digits) of the stream-batching code measured; the tree may be ahead of any commit."""
    import hashlib
    out = {"stream_batching_interval_ms": int(STREAM_BATCHING_MS) if STREAM_BATCHING_MS else None}
    for rel in ("deployments/server/stream_batching.py", "deployments/server/llm_server.py",
                "deployments/router/dispatch.py", "serve_config.yaml"):
        try:
            out[rel] = hashlib.sha256((REPO / rel).read_bytes()).hexdigest()[:16]
        except OSError:
            out[rel] = None
    return out


def versions_and_settings() -> dict:
    out = {"python": sys.version.split()[0]}
    for mod in ("vllm", "ray", "httpx", "uvloop", "uvicorn", "starlette", "fastapi", "orjson", "torch"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            out[mod] = f"absent ({type(e).__name__})"
    consts = {}
    pat = re.compile(r"STREAM|BATCH|UVLOOP|ASYNC|THREAD|PROXY_REQUEST|HTTP_PROXY|RAY_SERVE_.*TIMEOUT|QUEUE_LEN")
    for modname in ("ray.serve._private.constants", "ray.llm._internal.serve.constants",
                    "ray.llm._internal.serve.configs.constants", "ray.llm._internal.common.constants"):
        try:
            m = __import__(modname, fromlist=["x"])
        except Exception:  # noqa: BLE001
            continue
        for k in dir(m):
            if k.isupper() and pat.search(k):
                consts[f"{modname.rsplit('.', 1)[-1]}.{k}"] = repr(getattr(m, k))[:80]
    out["constants"] = dict(list(consts.items())[:80])
    out["env"] = {k: v for k, v in os.environ.items() if k.startswith(("RAY_SERVE", "RAYLLM", "VLLM_"))}
    return out


# ------------------------------------------------------------------------------ one phase
def run_phase(name: str, base: str, roles: dict[str, int], *, n: int, stream: bool = True, seed: int,
              max_tokens: int = MAX_TOKENS, sequential: bool = False, profile: bool = False,
              timeout: float = 200.0) -> dict | None:
    spec = {"base": base, "n": n, "stream": stream, "seed": seed, "max_tokens": max_tokens,
            "sequential": sequential, "procs": CLIENT_PROCS, "start_at": 0.0, "timeout": 300.0}
    out_path = f"/tmp/gpu_streaming_{RUN}_{name}.json"
    for stale in (out_path, out_path + ".started"):
        if os.path.exists(stale):
            os.remove(stale)
    key = {r: p for r, p in roles.items() if r not in ("raylet", "gcs", "controller")}
    snap0, thr0 = cpu_snapshot(), thread_snapshot(key)
    watch = CpuWatch(key)
    watch.start()
    paths = ["/v1/models"] if TARGET == "bare" else ["/-/healthz", "/v1/models"]
    probe = LagProbe(base, paths)
    probe.start()
    spies: dict[str, tuple] = {}
    if profile:
        lead = 3.0
        dur = int(max(3, min(15, res.get("phases", {}).get("c256", {}).get("client", {}).get("wall_s", 20) - 4)))
        spy_roles = ["api_server", "engine_core"] if TARGET == "bare" else \
            ["proxy", "ingress", "llm_replica", "engine_core"]

        def launch():
            for role in spy_roles:
                if role not in roles:
                    continue
                raw = f"/tmp/pyspy_{RUN}_{role}.txt"
                cmd = [PYSPY, "record", "--nonblocking", "--threads", "-r", "100", "-d", str(dur), "-p",
                       str(roles[role]), "-f", "raw", "-o", raw]
                errf = open(f"/tmp/pyspy_{RUN}_{role}.err", "w")
                spies[role] = (subprocess.Popen(cmd, stdout=errf, stderr=subprocess.STDOUT), raw, dur, errf)

        def when_started():
            t_wait = time.time()
            while not os.path.exists(out_path + ".started") and time.time() - t_wait < 60:
                time.sleep(0.05)
            try:
                t_start = float(Path(out_path + ".started").read_text())
            except (OSError, ValueError):
                t_start = time.time()
            time.sleep(max(0.0, t_start + lead - time.time()))
            launch()

        timer = threading.Thread(target=when_started, daemon=True)
        timer.start()
    t_call = time.time()
    try:
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "client", json.dumps(spec), out_path],
                       timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        log(name, "client timed out after", timeout, "s")
    t_done = time.time()
    snap1, thr1 = cpu_snapshot(), thread_snapshot(key)
    watch.stop_ev.set()
    probe.stop_ev.set()
    try:
        c = json.load(open(out_path))
    except Exception as e:  # noqa: BLE001
        log(name, "no client result:", repr(e))
        return None
    cs = c["summary"]
    spec["start_at"] = c["spec"]["start_at"]  # the client's own start instant
    chunks = cs.get("chunks_total") or 0
    tokens = cs.get("out_tokens") or 0
    t_a = spec["start_at"] + (cs.get("start_late_s") or 0.0)
    t_b = t_a + (cs.get("wall_s") or (t_done - t_a))
    # CPU seconds per process over the phase (the window also holds the client's ~2.5 s start, idle)
    deltas = []
    for pid, (c1, cl) in snap1.items():
        if pid in snap0:
            d = c1 - snap0[pid][0]
            if d > 0.05:
                deltas.append((pid, d, cl))
    deltas.sort(key=lambda x: -x[1])
    pid_role = {p: r for r, p in roles.items()}
    cpu = {"window_s": round(t_done - t_call, 2), "active_s": round(t_b - t_a, 2),
           "top_processes": [{"pid": p, "role": pid_role.get(p, ""), "cpu_s": round(d, 2), "cmd": cl[:90]}
                             for p, d, cl in deltas[:14]],
           "roles": {}}
    dmap = {p: d for p, d, _ in deltas}
    for role, pid in roles.items():
        d = dmap.get(pid, 0.0)
        row = {"pid": pid, "cpu_s": round(d, 3), "cpu_pct_mean_active": round(100 * d / max(0.1, t_b - t_a), 1)}
        ser = [v for t, v in watch.series.get(role, []) if t_a <= t <= t_b + 0.5]
        if ser:
            row["cpu_pct_p50"], row["cpu_pct_max"] = pct(ser, 50), max(ser)
        if chunks:
            row["us_per_chunk"] = round(1e6 * d / chunks, 1)
        if tokens:
            row["us_per_token"] = round(1e6 * d / tokens, 1)
        if role in thr0 and role in thr1:
            td = sorted(((v[0] - thr0[role].get(tid, (0.0,))[0], v[1]) for tid, v in thr1[role].items()),
                        reverse=True)[:4]
            row["top_threads"] = [(name_, round(dd, 2)) for dd, name_ in td if dd > 0.01]
        cpu["roles"][role] = row
    if profile:
        cpu["series"] = {r: [(round(t - t_a, 1), v) for t, v in s if t_a - 1 <= t <= t_b + 1]
                         for r, s in watch.series.items()}
    lag = {}
    for path, xs in probe.lat.items():
        ok = [x for x in xs if x is not None]
        lag[path] = {"n": len(xs), "failed": len(xs) - len(ok), "ms_p50": _ms(pct(ok, 50)),
                     "ms_p99": _ms(pct(ok, 99)), "ms_max": _ms(pct(ok, 100))}
    ph = {"client": cs, "cpu": cpu, "lag_probe": lag, "requests": c["requests"] if n <= 64 else None}
    if profile:
        prof = {}
        for role, (proc, raw, dur, errf) in spies.items():
            try:
                proc.wait(timeout=dur + 30)
            except subprocess.TimeoutExpired:
                proc.kill()
            errf.close()
            err = Path(errf.name).read_text()[-600:]
            try:
                prof[role] = {"pid": roles[role], "dur_s": dur, "rate": 100} | analyse_raw(raw, 100, dur)
            except Exception as e:  # noqa: BLE001
                prof[role] = {"error": f"{e!r}; py-spy said: {err}"}
        if not spies:
            prof["_"] = {"error": "py-spy did not start (timer)"}
        ph["profile"] = prof
        text = profile_text(prof)
        with open(os.path.join(OUT, f"profile_{RUN}.txt"), "w") as f:
            f.write(f"# {RUN}, phase {name}: 256 concurrent streams; client: {json.dumps(cs)[:600]}\n"
                    f"# CPU per role: {json.dumps(cpu['roles'])}\n\n" + text)
        sh(f"cd /tmp && tar -czf {OUT}/stacks_{RUN}.tgz pyspy_{RUN}_*.txt pyspy_{RUN}_*.err; "
           f"[ $(stat -c %s {OUT}/stacks_{RUN}.tgz) -lt 12000000 ] || rm -f {OUT}/stacks_{RUN}.tgz", 60)
    res["phases"][name] = ph
    brief = {k: cs.get(k) for k in ("status", "out_tok_s", "wall_s", "ttft_p50", "ttft_p99", "chunks_per_req_p50",
                                    "gap_ms_p50", "gap_ms_p99", "tpot_ms_p50", "e2e_tok_s", "client_cpu_util_max",
                                    "queue_wait_ms_p50")}
    log(name, json.dumps(brief), "| cpu", json.dumps({r: (v["cpu_s"], v.get("cpu_pct_max"), v.get("us_per_chunk"))
                                                      for r, v in cpu["roles"].items()}), "| lag", json.dumps(lag))
    save()
    return ph


def server_excerpt() -> None:
    if TARGET == "bare":
        src = "/tmp/bare_server.log"
    else:
        src = "/tmp/ray/session_latest/logs/serve/*.log /tmp/ray/session_latest/logs/worker-*"
    sh(f"grep -h -E -i 'non-default args|Asynchronous scheduling|async_scheduling|max_num_seqs|chunked|"
       f"Traceback|Error|uvloop|attention backend|KV cache|could not' {src} 2>/dev/null "
       f"| grep -v -E 'HTTP/1.1\" 200|metrics' | cut -c1-400 | head -120 > {OUT}/server_{RUN}.txt", 60)
    if TARGET == "ours":  # the GPU signal as the replica learnt it and as the policy used it
        sh(f"grep -h -E 'autoscaling |GPU group|GPU reading|no GPU signal|EngineCore.*pid|Started engine|"
           f"Replica.*(started|stopped)' {src} 2>/dev/null | cut -c1-400 | tail -150 > {OUT}/autoscaling_{RUN}.txt", 60)


def redeploy_routers(n: int, limit_s: float = 120) -> float:
    """Set the Router deployment to exactly ``n`` replicas through the config's ``deployments`` override and
    wait until ``n`` run; returns the seconds it took. Meant to leave the LLM deployment alone; the first
    such change in the lease of 2026-11-30 replaced the LLM replica all the same (docs/streaming.md)."""
    import copy

    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    t0 = time.time()
    cfg = copy.deepcopy(DEPLOYED["cfg"])
    cfg["applications"][0]["deployments"] = [{"name": "Router", "autoscaling_config": {
        "min_replicas": n, "max_replicas": n, "initial_replicas": n, "upscale_delay_s": 0, "downscale_delay_s": 0}}]
    DEPLOYED["client"].deploy_apps(ServeDeploySchema.model_validate(cfg), _blocking=False)
    while time.time() - t0 < limit_s:
        app = serve.status().applications.get("llm")
        router = app.deployments.get("Router") if app else None
        if router is not None and router.replica_states.get("RUNNING", 0) == n and app.status == "RUNNING" \
                and sum(router.replica_states.values()) == n:
            return time.time() - t0
        time.sleep(1)
    raise TimeoutError(f"Router not at {n} replicas after {limit_s} s")


class GpuHealthWatch(threading.Thread):
    """ours: the GPU group reading the LLM replica reports in /health (issue 13's GPU signal), every 1 s."""

    def __init__(self, base: str):
        super().__init__(daemon=True)
        self.base, self.stop_ev, self.series = base, threading.Event(), []

    def run(self):
        import httpx
        with httpx.Client(base_url=self.base, timeout=10) as c:
            while not self.stop_ev.is_set():
                try:
                    pools = c.get("/health").json().get("pools", {})
                    gpu_now = {name: (p.get("engine_load") or {}).get("gpu") for name, p in pools.items()}
                    self.series.append([round(time.time() - T0, 1), gpu_now])
                except Exception as e:  # noqa: BLE001
                    self.series.append([round(time.time() - T0, 1), repr(e)[:100]])
                self.stop_ev.wait(1.0)


def main() -> None:
    g0 = gpu()
    log("gpu before:", g0)
    used = re.search(r",\s*(\d+)\s*MiB", g0)
    if used and int(used.group(1)) > 2000:  # an earlier call's Ray still holds the GPU
        log("GPU memory in use before start: ray stop --force:",
            sh(f"{sys.executable} -m ray.scripts.scripts stop --force", 90)[-300:])
        time.sleep(3)
    res["versions"] = versions_and_settings()
    res["code"] = code_hashes()
    res["pyspy"] = pyspy_ok() or sh(f"{PYSPY} --version")
    try:
        base, handle = start_target()
    except Exception:
        res["deploy_error"] = traceback.format_exc()
        log("DEPLOY FAILED\n" + res["deploy_error"])
        server_excerpt()
        save()
        os._exit(3)
    roles = find_roles(res.get("server_pid"))
    res["roles"] = roles
    res["ray_titles"] = [cl[:120] for _, _, cl in proc_rows() if cl.startswith(("ray::", "VLLM"))][:40]
    log("READY in", res["ready_s"], "s; roles", roles, "; gpu:", gpu())
    save()
    watch = GpuHealthWatch(base) if TARGET == "ours" else None
    if watch is not None:
        watch.start()
    try:
        if TOOLS:
            pass_tools(base, roles)
        elif SPANS:
            pass_spans(base, roles)
        elif ROUTER_STEPS:
            pass_two(base, roles)
        else:
            pass_one(base, roles)
    except Exception:
        res["bench_error"] = traceback.format_exc()
        log("BENCH ERROR\n" + res["bench_error"])
    if watch is not None:
        watch.stop_ev.set()
        res["gpu_health"] = watch.series
    server_excerpt()
    save()
    stop_target(handle)
    time.sleep(2)
    res["gpu_end"] = gpu()
    res["total_s"] = round(time.time() - T0, 1)
    save()
    log("done; gpu:", res["gpu_end"])


def pass_two(base: str, roles: dict[str, int]) -> None:
    """Each step of the fix on the same workload in one lease: base phases, then each router count."""
    run_phase("warm", base, roles, n=3, seed=-10, max_tokens=16, sequential=True, timeout=60)
    run_phase("s1", base, roles, n=S1_N, seed=200, sequential=True, timeout=60)
    run_phase("c64", base, roles, n=64, seed=2000, timeout=min(120, max(30, left() - 60)))
    run_phase("c256", base, roles, n=256, seed=1000, timeout=min(200, max(30, left() - 45)))
    if left() > 45:
        run_phase("n256", base, roles, n=256, seed=6000, stream=False, timeout=min(120, max(30, left() - 35)))
    for n in ROUTER_STEPS if TARGET == "ours" else []:
        est = (res["phases"].get("c256", {}).get("client", {}).get("wall_s") or 30) + 60
        if left() < est + 30:
            log(f"routers={n} skipped: {left():.0f} s left")
            break
        took = redeploy_routers(n)
        roles = find_roles(res.get("server_pid"))
        res.setdefault("router_steps", {})[n] = {"redeploy_s": round(took, 1), "roles": roles}
        log(f"routers={n} running after {took:.0f} s")
        run_phase(f"c64_r{n}", base, roles, n=64, seed=2000 + n, timeout=min(120, max(30, left() - 40)))
        run_phase(f"c256_r{n}", base, roles, n=256, seed=1000 + n, timeout=min(200, max(30, left() - 30)))


def pass_spans(base: str, roles: dict[str, int]) -> None:
    """Pass 8: one stream's TTFT split by span (SPANS=1): the base's short phases, then the sink's breakdown."""
    run_phase("warm", base, roles, n=3, seed=-10, max_tokens=16, sequential=True, timeout=60)
    run_phase("s1", base, roles, n=S1_N, seed=200, sequential=True, timeout=60)
    time.sleep(6)  # the batch span processors export every 5 s
    res["spans"] = {"breakdown": SINK[0].breakdown(), "sink": SINK[0].counts()}
    log("spans:", json.dumps(res["spans"]["breakdown"]))


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Berlin"]}},
                   "required": ["city"]}}}


def pass_tools(base: str, roles: dict[str, int]) -> None:
    """TOOLS=1: the three ways a client asks for a tool call, each once, not streamed; what came back."""
    import httpx

    run_phase("warm", base, roles, n=3, seed=-10, max_tokens=16, sequential=True, timeout=60)
    choices = {"auto": "auto", "required": "required",
               "named": {"type": "function", "function": {"name": "get_weather"}}}
    out = {}
    for label, choice in choices.items():
        body = {"model": MODEL, "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
                "tools": [WEATHER_TOOL], "tool_choice": choice, "max_tokens": 256, "temperature": 0}
        try:
            r = httpx.post(base + "/v1/chat/completions", json=body, timeout=120)
            data = r.json()
            message = (data.get("choices") or [{}])[0].get("message") or {}
            out[label] = {"status": r.status_code, "finish_reason": (data.get("choices") or [{}])[0].get("finish_reason"),
                          "tool_calls": message.get("tool_calls"), "content": (message.get("content") or "")[:200],
                          "error": data.get("error")}
        except Exception as exc:  # noqa: BLE001
            out[label] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        log(f"tools {label}:", json.dumps(out[label])[:600])
    res["tools"] = {"settings": TOOL_SETTINGS, "calls": out}


def pass_one(base: str, roles: dict[str, int]) -> None:
    """Pass 1: the baseline phases and the profiled one."""
    run_phase("warm", base, roles, n=3, seed=-10, max_tokens=16, sequential=True, timeout=60)
    run_phase("s1", base, roles, n=S1_N, seed=200, sequential=True, timeout=60)
    run_phase("c64", base, roles, n=64, seed=2000, timeout=min(120, max(30, left() - 60)))
    run_phase("c256", base, roles, n=256, seed=1000, timeout=min(200, max(30, left() - 45)))
    est = (res["phases"].get("c256", {}).get("client", {}).get("wall_s") or 30) + 25
    if left() > est + 30 and not pyspy_ok():
        run_phase("p256", base, roles, n=256, seed=5000, profile=True, timeout=min(200, max(30, left() - 40)))
    else:
        log("p256 skipped:", pyspy_ok() or f"{left():.0f} s left")
    if left() > 45:
        run_phase("n256", base, roles, n=256, seed=6000, stream=False, timeout=min(120, max(30, left() - 35)))
    if left() > 40:
        run_phase("c64b", base, roles, n=64, seed=3000, timeout=min(120, max(30, left() - 30)))
    if left() > est + 20:
        run_phase("c256b", base, roles, n=256, seed=4000, timeout=min(200, max(30, left() - 25)))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        client_main(sys.argv[2], sys.argv[3])
        sys.exit(0)
    TARGET = sys.argv[1] if len(sys.argv) > 1 else "stock"
    assert TARGET in ("bare", "stock", "ours"), "TARGET: bare | stock | ours"
    assert not STREAM_BATCHING_MS or TARGET == "ours", "STREAM_BATCHING_MS applies to ours only"
    assert not SPANS or TARGET == "ours", "SPANS applies to ours only"
    assert not TOOLS or TARGET == "ours", "TOOLS applies to ours only"
    RUN = "ours_window" if STREAM_BATCHING_MS else "ours_spans" if SPANS else "ours_tools" if TOOLS else TARGET
    DEADLINE = float(sys.argv[2]) if len(sys.argv) > 2 else 540.0
    MODEL_DIR = sys.argv[3] if len(sys.argv) > 3 else "/tmp/dq"
    sys.path.insert(0, str(HERE))
    res: dict = {"target": TARGET, "run": RUN, "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "phases": {}}
    main()
    sys.stdout.flush()
    os._exit(0)
