"""Overload, side by side in one run: this app, the stock `build_openai_app`, and bare vLLM.

Every target serves the same model with the same engine settings on the same
machine, one after the other. Workloads (streamed, `include_usage`):

- **ramp**: closed-loop short chats ("Write a short story about a lighthouse
  keeper ...", 128 tokens, `ignore_eos`) from 1, 2, 4, 8, 16 and 32 clients;
  a client told 429 waits its `Retry-After` before its next request, as
  OpenAI's client does;
- **poisson**: open-loop arrivals of the same chat at 0.5x, 1x, 2x and 4x the
  engine's measured capacity (completions per second of the first target at its
  busiest ramp level, so every target sees the same offered load);
- **flood**: the priority flood of bench/priority_flood.py: one-sentence chats
  (16 tokens, 2/s) alone ("idle"), then the same plus long (~2.2k-token)
  low-priority prompts (1 every 2 s, "flood"), Poisson arrivals; the goal is
  the chats' TTFT p99 under the flood against idle.

Bare vLLM (`python -m vllm.entrypoints.openai.api_server`) runs the ramp's 1-
and 32-client levels only: at low load and at saturation, so the router's own
overhead is a ratio.

Per target, workload, level and class it reports completed, 429 (and how fast
they came back), 503, 504, other failures, TTFT and TPOT p50/p99, goodput
(output tokens of requests that met their class's SLO, the SLO of the profile's
router settings) and **wasted engine tokens**: what the engine generated
(the engine's own count of generated tokens: our LLM replica's
`llm_engine_generation_tokens`, or vLLM's `generation_tokens` counter for the stock app and the
bare server, read from Ray's metrics export or the bare server's /metrics) less the completion tokens of the requests that were
served. Writes a table (markdown), a JSON of every request and plots.

The client is our own (httpx, asyncio): neither guidellm nor vLLM's benchmark
module tells 429 from 503 from 504 or reads the router's headers, which is what
this benchmark is about.

    .venv/bin/python bench/overload.py --out docs/bench/overload
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.hop_cpu import HopCpu, per_token_us  # noqa: E402
from bench.priority_flood import deploy, percentile, short_chat  # noqa: E402
from scripts.processes import spawn, stop  # noqa: E402

BASE_URL = "http://127.0.0.1:8000"
BARE_PORT = 8001
METRICS_PORT = 8089
STORY = "Write a short story about a lighthouse keeper who finds a message in a bottle."
SAMPLING = {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1}
TOPICS = ["rivers", "bread", "trains", "owls", "glass", "tides", "maps", "bells"]


@dataclass
class Sample:
    target: str
    workload: str
    level: str
    cls: str
    sent_at: float
    status: int
    latency_s: float
    ttft_s: float | None = None
    tpot_s: float | None = None
    output_tokens: int = 0
    queue_wait_s: float | None = None
    retry_after_s: float | None = None
    message: str = ""


# --- the client ---------------------------------------------------------------------


def chat_body(model: str, cls: str, i: int, args, workload: str = "ramp") -> dict:
    if workload == "flood" and cls == "high":
        messages, max_tokens = short_chat(i), args.flood_high_tokens
    elif cls == "low":
        rng = random.Random(i)
        text = " ".join(rng.choice(TOPICS) for _ in range(args.low_words))
        messages, max_tokens = [{"role": "user", "content": f"Summarise this log {i}:\n{text}"}], args.low_tokens
    else:
        messages, max_tokens = [{"role": "user", "content": STORY}], args.max_tokens
    return {"model": model, "messages": messages, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, **SAMPLING}


async def one(client: httpx.AsyncClient, url: str, body: dict, target, workload, level, cls, start) -> Sample:
    sent = time.monotonic()
    s = Sample(target, workload, level, cls, sent - start, 0, 0.0)
    first = last = None
    try:
        async with client.stream("POST", url, json=body) as r:
            s.status = r.status_code
            if "x-queue-wait-ms" in r.headers:
                s.queue_wait_s = float(r.headers["x-queue-wait-ms"]) / 1000
            if r.status_code != 200:
                s.message = (await r.aread()).decode(errors="replace")[:200]
                if "retry-after" in r.headers:
                    s.retry_after_s = float(r.headers["retry-after"])
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        s.status, s.message = chunk["error"].get("code", 500), chunk["error"]["message"][:200]
                        continue
                    if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                        last = time.monotonic()
                        first = first or last
                    if chunk.get("usage"):
                        s.output_tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as exc:
        s.status, s.message = 599, type(exc).__name__
    s.latency_s = time.monotonic() - sent
    if first is not None:
        s.ttft_s = first - sent
        if s.output_tokens > 1:
            s.tpot_s = (last - first) / (s.output_tokens - 1)
    if s.status != 200:
        s.output_tokens = 0
    return s


def client(args) -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=args.client_timeout, limits=httpx.Limits(max_connections=1000))


async def closed_loop(url, model, target, level_clients: int, args) -> list[Sample]:
    """``level_clients`` clients, each sending its next request when the last one ends."""
    out, start = [], time.monotonic()
    async with client(args) as c:
        async def worker(w):
            i = 0
            while time.monotonic() - start < args.level_s:
                got = await one(c, url, chat_body(model, "high", i, args), target, "ramp",
                                f"{level_clients} clients", "high", start)
                out.append(got)
                i += 1
                if got.retry_after_s:  # a well-behaved client waits as told before its next request
                    await asyncio.sleep(min(got.retry_after_s, max(0.0, args.level_s - (time.monotonic() - start))))
        await asyncio.gather(*[worker(w) for w in range(level_clients)])
    return out


async def open_loop(url, model, target, workload, level, rates: dict[str, float], args, seed=0) -> list[Sample]:
    """Poisson arrivals per class at ``rates`` (requests/s) for ``level_s``; waits for every answer."""
    start, tasks = time.monotonic(), []
    async with client(args) as c:
        async def arrivals(cls, rate):
            rng, i = random.Random(seed + hash(cls) % 1000), 0
            while time.monotonic() - start < args.level_s:
                tasks.append(asyncio.create_task(one(c, url, chat_body(model, cls, i, args, workload), target, workload,
                                                     level, cls, start)))
                i += 1
                await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*[arrivals(cls, rate) for cls, rate in rates.items() if rate > 0])
        return list(await asyncio.gather(*tasks))


# --- the engine's own count of generated tokens -------------------------------------------
# vLLM's counter (bare server; stock app through Ray) or our replica's export of the same count
# (deployments/observability/metrics.py ENGINE_GENERATION_TOKENS; our profiles turn vLLM's off).

_GENERATED = re.compile(
    r"^(?:ray_)?(?:vllm[:_]|llm_engine_)generation_tokens(?:_total)?(?:\{[^}]*\})?\s+([0-9.e+]+)$", re.M)


def generated_tokens(metrics_url: str) -> float | None:
    try:
        text = httpx.get(metrics_url, timeout=10).text
    except httpx.HTTPError:
        return None
    values = [float(v) for v in _GENERATED.findall(text)]
    return sum(values) if values else None


def settled_generated_tokens(metrics_url: str, interval_s: float) -> float | None:
    """The counter once it has stopped moving for two export intervals (the engine is idle by then)."""
    last, same = None, 0
    deadline = time.monotonic() + 30 * interval_s
    while time.monotonic() < deadline:
        value = generated_tokens(metrics_url)
        same = same + 1 if value is not None and value == last else 0
        if same >= 2:
            return value
        last = value
        time.sleep(interval_s)
    return last


# --- targets ------------------------------------------------------------------------------


class Bare:
    """Bare vLLM's OpenAI server with the profile's engine arguments."""

    def __init__(self, args):
        from deployments.config.app_args import app_args_from_serve_config

        profile = app_args_from_serve_config().profiles[args.profile]
        config = profile.to_llm_config()
        self.model = config.model_id
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
               config.model_loading_config.model_source, "--served-model-name", self.model,
               "--port", str(BARE_PORT), "--host", "127.0.0.1"]
        for key, value in config.engine_kwargs.items():
            if key == "scheduling_policy":
                continue  # first-come-first-served, as stock
            flag = "--" + key.replace("_", "-")
            cmd += [flag] if value is True else ([] if value is False else [flag, str(value)])
        env = dict(os.environ, **(profile.llm_config.get("runtime_env", {}).get("env_vars", {})))
        self.log = open(Path(args.out) / "bare_vllm.log", "w")
        self.proc = spawn(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{BARE_PORT}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"bare vLLM exited {self.proc.returncode}; see {self.log.name}")
            time.sleep(2)
        raise TimeoutError("bare vLLM not ready")

    def stop(self):
        stop(self.proc)
        self.log.close()


# --- the run ------------------------------------------------------------------------------


def level_record(samples, generated_delta, cpu_s: dict[str, float]):
    served = sum(s.output_tokens for s in samples)
    return {"generated": generated_delta, "served_tokens": served,
            "wasted": None if generated_delta is None else max(0.0, generated_delta - served),
            "cpu_s": cpu_s, "cpu_us_per_token": per_token_us(cpu_s, served)}


def run_target(target: str, args, capacity: dict) -> tuple[list[Sample], dict]:
    samples, engine, server_pid = [], {}, None
    if target == "bare":
        server = Bare(args)
        server_pid = server.proc.pid
        url, model = f"http://127.0.0.1:{BARE_PORT}/v1/chat/completions", server.model
        metrics_url, interval = f"http://127.0.0.1:{BARE_PORT}/metrics", 1.0
    else:
        model = deploy(target, args.profile)
        url, metrics_url, interval = BASE_URL + "/v1/chat/completions", f"http://127.0.0.1:{METRICS_PORT}/metrics", 2.5
        if target == "ours":  # the SLO every target is scored on is the one ours runs with, measured here
            capacity["unloaded_tpot_s"] = unloaded_tpot_s()
    try:
        def measure(workload, level, coroutine):
            before = settled_generated_tokens(metrics_url, interval)
            print(f"{target}: {workload} {level} ...", flush=True)
            with HopCpu(server_pid) as hop:
                got = asyncio.run(coroutine)
            after = settled_generated_tokens(metrics_url, interval)
            delta = None if before is None or after is None else after - before
            engine[f"{workload}|{level}"] = level_record(got, delta, hop.used)
            samples.extend(got)
            return got

        levels = [1, 32] if target == "bare" else args.clients
        for n in levels:
            got = measure("ramp", f"{n} clients", closed_loop(url, model, target, n, args))
            span = max((s.sent_at + s.latency_s for s in got), default=1.0)
            capacity.setdefault("per_target", {}).setdefault(target, []).append(
                sum(s.status == 200 for s in got) / span)
        if target == "bare":
            return samples, engine
        cap = capacity.setdefault("req_s", max(capacity["per_target"][target]))
        for factor in args.poisson:
            measure("poisson", f"{factor}x", open_loop(url, model, target, "poisson", f"{factor}x",
                                                       {"high": factor * cap}, args, seed=int(factor * 10)))
        if args.skip_flood:
            return samples, engine
        if "idle" in args.flood_phases:
            measure("flood", "idle", open_loop(url, model, target, "flood", "idle", {"high": args.flood_high_rps},
                                               args))
        if "flood" in args.flood_phases:
            measure("flood", "flood", open_loop(url, model, target, "flood", "flood",
                                                {"high": args.flood_high_rps, "low": args.flood_low_rps}, args))
    finally:
        if target == "bare":
            server.stop()
        else:
            from ray import serve
            serve.delete("bench")
    return samples, engine


def unloaded_tpot_s() -> float | None:
    """The engine's TPOT with one stream alone, as the LLM replica measured it at warm-up (``/health``)."""
    pools = httpx.get(BASE_URL + "/health", timeout=30).json()["pools"]
    return next(iter(pools.values())).get("unloaded_tpot_s")


def slo_of(profile: str, unloaded_tpot_s: float | None) -> dict:
    """Per class {ttft_s, tpot_s}: the profile's SLO as the router applies it on this machine (a profile with
    ``tpot_slo_from_engine`` scales its TPOT SLO from the measured unloaded TPOT)."""
    from deployments.config.app_args import served_app_from_serve_config

    app = served_app_from_serve_config()  # the router's queue settings are its user_config now
    queues = app.queue_settings(app.args.profiles[profile]).scaled_to_engine(unloaded_tpot_s)
    return {cls: {"ttft_s": t.ttft_s, "tpot_s": t.tpot_s} for cls, t in queues.classes.items()}


def meets(s: Sample, slo: dict) -> bool:
    target = slo[s.cls]
    return (s.status == 200 and s.ttft_s is not None and s.ttft_s <= target["ttft_s"]
            and (s.tpot_s is None or s.tpot_s <= target["tpot_s"]))


def summarise(samples: list[Sample], engine: dict, slo: dict) -> list[dict]:
    rows = []
    keys = dict.fromkeys((s.target, s.workload, s.level) for s in samples)
    for target, workload, level in keys:
        batch = [s for s in samples if (s.target, s.workload, s.level) == (target, workload, level)]
        span = max(s.sent_at + s.latency_s for s in batch) or 1.0
        waste = engine.get(target, {}).get(f"{workload}|{level}", {})
        for cls in ("high", "low"):
            rs = [s for s in batch if s.cls == cls]
            if not rs:
                continue
            ok = [s for s in rs if s.status == 200]
            rows.append({
                "target": target, "workload": workload, "level": level, "class": cls, "sent": len(rs),
                "completed": len(ok), "429": sum(s.status == 429 for s in rs),
                "429_latency_p50_s": percentile([s.latency_s for s in rs if s.status == 429], 50),
                "503": sum(s.status == 503 for s in rs), "504": sum(s.status == 504 for s in rs),
                "other": sum(s.status not in (200, 429, 503, 504) for s in rs),
                "ttft_p50_s": percentile([s.ttft_s for s in ok if s.ttft_s is not None], 50),
                "ttft_p99_s": percentile([s.ttft_s for s in ok if s.ttft_s is not None], 99),
                "tpot_p50_s": percentile([s.tpot_s for s in ok if s.tpot_s is not None], 50),
                "tpot_p99_s": percentile([s.tpot_s for s in ok if s.tpot_s is not None], 99),
                "out_tok_s": sum(s.output_tokens for s in rs) / span,
                "goodput_tok_s": sum(s.output_tokens for s in rs if meets(s, slo)) / span,
                "generated": waste.get("generated"), "wasted": waste.get("wasted"),
                "cpu_us_per_token": waste.get("cpu_us_per_token", {}),
            })
    return rows


def table(rows: list[dict]) -> str:
    cols = ["target", "workload", "level", "class", "sent", "completed", "429", "429_latency_p50_s", "503", "504",
            "other", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "out_tok_s", "goodput_tok_s",
            "generated", "wasted"]
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) and abs(v) < 10 else
                                           f"{v:.0f}" if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(cols) + " | CPU µs per output token |", "|" + "---|" * (len(cols) + 1)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + f" | {hop_cpu_cell(r['cpu_us_per_token'])} |"
              for r in rows]
    return "\n".join(lines)


def hop_cpu_cell(us: dict[str, float]) -> str:
    """'proxy 120 · ingress 300 · llm_replica 200 · engine_core 900' (the serving path's hops only)."""
    from bench.hop_cpu import HOPS
    return " · ".join(f"{hop} {us[hop]:.0f}" for hop in HOPS if hop in us) or "-"


def ratios(rows: list[dict]) -> list[dict]:
    """Ours over stock (and over bare) per level: goodput, output tok/s, waste share."""
    get = lambda t, w, l, c="high": next((r for r in rows if (r["target"], r["workload"], r["level"], r["class"])
                                          == (t, w, l, c)), None)
    out = []
    for r in rows:
        if r["target"] != "ours" or r["class"] != "high":
            continue
        stock, bare = get("stock", r["workload"], r["level"]), get("bare", r["workload"], r["level"])

        def div(a, b):
            if a is None or b is None:
                return None
            return a / b if b else ("inf (stock 0)" if a else None)
        level_rows = [x for x in rows if (x["target"], x["workload"], x["level"]) == ("ours", r["workload"], r["level"])]
        generated = r["generated"]
        out.append({
            "workload": r["workload"], "level": r["level"],
            "goodput_ours_over_stock": div(r["goodput_tok_s"], stock and stock["goodput_tok_s"]),
            "out_tok_s_ours_over_stock": div(r["out_tok_s"], stock and stock["out_tok_s"]),
            "out_tok_s_ours_over_bare": div(r["out_tok_s"], bare and bare["out_tok_s"]),
            "ttft_p50_ours_minus_bare_ms": (None if not bare or r["ttft_p50_s"] is None or bare["ttft_p50_s"] is None
                                            else (r["ttft_p50_s"] - bare["ttft_p50_s"]) * 1000),
            "wasted_share_ours": div(r["wasted"], generated),
            "503_ours": sum(x["503"] for x in level_rows),
        })
    idle = {t: get(t, "flood", "idle") for t in ("ours", "stock")}
    flood = {t: get(t, "flood", "flood") for t in ("ours", "stock")}
    if all(idle.values()) and all(flood.values()):
        out.append({
            "workload": "flood", "level": "high TTFT p99: flood over idle",
            "ours": flood["ours"]["ttft_p99_s"] / idle["ours"]["ttft_p99_s"],
            "stock": flood["stock"]["ttft_p99_s"] / idle["stock"]["ttft_p99_s"],
            "stock_p99_over_ours_p99": flood["stock"]["ttft_p99_s"] / flood["ours"]["ttft_p99_s"],
        })
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, workload in zip(axes[:2], ("ramp", "poisson")):
        for target, colour in (("ours", "tab:blue"), ("stock", "tab:orange"), ("bare", "tab:green")):
            rs = [r for r in rows if r["target"] == target and r["workload"] == workload and r["class"] == "high"]
            if not rs:
                continue
            xs = [r["level"] for r in rs]
            ax.plot(xs, [r["goodput_tok_s"] for r in rs], "o-", c=colour, label=f"{target} goodput")
            ax.plot(xs, [r["out_tok_s"] for r in rs], "x--", c=colour, alpha=0.5, label=f"{target} output")
        ax.set_title(f"{workload}: output and goodput tok/s")
        ax.set_xlabel("offered load")
        ax.tick_params(axis="x", rotation=30)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[2]
    for target, colour in (("ours", "tab:blue"), ("stock", "tab:orange")):
        rs = [r for r in rows if r["target"] == target and r["workload"] in ("ramp", "poisson") and r["class"] == "high"]
        ax.bar([f"{r['workload'][0]}:{r['level']}" for r in rs],
               [(r["wasted"] or 0) / r["generated"] if r["generated"] else 0 for r in rs],
               color=colour, alpha=0.6, label=target)
    ax.set_title("wasted engine tokens / generated")
    ax.tick_params(axis="x", rotation=60, labelsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="embedded-cpu")
    parser.add_argument("--targets", default="bare,stock,ours", help="of bare, stock, ours (run in this order)")
    parser.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--poisson", type=lambda s: [float(x) for x in s.split(",")], default=[0.5, 1.0, 2.0, 4.0])
    parser.add_argument("--level-s", type=float, default=30.0, help="seconds each level sends for")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--flood-high-rps", type=float, default=2.0, help="one-sentence chats, idle and flood")
    parser.add_argument("--flood-high-tokens", type=int, default=16)
    parser.add_argument("--flood-low-rps", type=float, default=0.5, help="long low-class prompts")
    parser.add_argument("--low-words", type=int, default=2200)
    parser.add_argument("--low-tokens", type=int, default=32)
    parser.add_argument("--skip-flood", action="store_true", help="ramp and poisson only (a quicker check)")
    parser.add_argument("--flood-phases", type=lambda s: s.split(","), default=["idle", "flood"],
                        help="of idle, flood: the flood workload's phases to run (idle alone: no long prompts)")
    parser.add_argument("--client-timeout", type=float, default=300.0)
    parser.add_argument("--out", type=Path, default=Path("docs/bench/overload"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import ray
    from ray import serve

    samples, engine, capacity = [], {}, {}
    targets = args.targets.split(",")
    if "bare" in targets:  # first, alone: it needs the cores Ray would take
        got, engine["bare"] = run_target("bare", args, capacity)
        samples += got
        capacity["req_s"] = capacity["per_target"]["bare"][-1]  # bare at saturation: the engine's capacity
    ray.init(include_dashboard=False, num_cpus=max(4, os.cpu_count() or 1), _metrics_export_port=METRICS_PORT,
             _system_config={"metrics_report_interval_ms": 1000})
    try:
        for target in [t for t in targets if t != "bare"]:
            got, engine[target] = run_target(target, args, capacity)
            samples += got
    finally:
        serve.shutdown()
        ray.shutdown()

    slo = slo_of(args.profile, capacity.get("unloaded_tpot_s"))
    rows = summarise(samples, engine, slo)
    summary = ratios(rows)
    print(table(rows))
    print(json.dumps(summary, indent=1))
    (args.out / "overload.md").write_text(table(rows) + "\n")
    (args.out / "overload.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "slo": slo, "capacity": capacity, "rows": rows,
         "ratios": summary, "samples": [asdict(s) for s in samples]}, indent=1))
    plot(rows, args.out / "overload.png")


if __name__ == "__main__":
    main()
