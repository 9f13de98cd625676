"""Priority under a flood: this app vs ray.serve.llm's stock `build_openai_app`.

Both serve the same profile (model, engine settings, machine), one after the
other in one run. For each: a steady stream of short interactive (high)
requests alone ("unloaded"), then the same stream plus an overload flood of
long low-priority prompts ("flood"). Prints per-class TTFT p50/p99,
completed output tokens/s and rejections, the goal ratios, and writes a plot.

    .venv/bin/python bench/priority_flood.py --out docs/bench
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

BASE_URL = "http://127.0.0.1:8000"
SPLIT_LAYOUT = "embedded-cpu-split"  # target "ours-split"
TOPICS = ["rivers", "bread", "trains", "owls", "glass", "tides", "maps", "bells"]


@dataclass
class Result:
    target: str
    phase: str
    cls: str
    sent_at: float
    status: int
    ttft_s: float | None
    output_tokens: int
    done_at: float
    queue_wait_s: float | None = None  # our router's x-queue-wait-ms; None for stock


def short_chat(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Write one sentence about {TOPICS[i % len(TOPICS)]}."}]


def long_chat(i: int, words: int) -> list[dict]:
    rng = random.Random(i)
    text = " ".join(rng.choice(TOPICS) for _ in range(words))
    return [{"role": "user", "content": f"Summarise this log {i}:\n{text}"}]


async def one_request(client, target, phase, cls, body, start) -> Result:
    sent = time.monotonic()
    ttft, tokens, status, queue_wait = None, 0, 0, None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            status = r.status_code
            if "x-queue-wait-ms" in r.headers:
                queue_wait = float(r.headers["x-queue-wait-ms"]) / 1000
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    status = chunk["error"].get("code", 500)
                    continue
                if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    ttft = ttft if ttft is not None else time.monotonic() - sent
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError:
        status = 599
    return Result(target, phase, cls, sent - start, status, ttft, tokens if status == 200 else 0,
                  time.monotonic() - start, queue_wait)


async def run_phase(target, phase, model, args, flood: bool) -> list[Result]:
    stream_opts = {"stream": True, "stream_options": {"include_usage": True}, "temperature": 0}
    async with httpx.AsyncClient(base_url=BASE_URL, timeout=args.client_timeout,
                                 limits=httpx.Limits(max_connections=1000)) as client:
        start = time.monotonic()
        tasks = []

        async def steady(cls, rate, make_body):
            i = 0
            while time.monotonic() - start < args.phase_s:
                tasks.append(asyncio.create_task(one_request(client, target, phase, cls, make_body(i), start)))
                i += 1
                await asyncio.sleep(1 / rate)

        senders = [steady("high", args.high_rps, lambda i: {
            "model": model, "messages": short_chat(i), "max_tokens": args.high_tokens, **stream_opts})]
        if flood:
            senders.append(steady("low", args.low_rps, lambda i: {
                "model": model, "messages": long_chat(i, args.low_words), "max_tokens": args.low_tokens,
                "ignore_eos": True, **stream_opts}))
        await asyncio.gather(*senders)
        return list(await asyncio.gather(*tasks))


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def summarise(results: list[Result]) -> list[dict]:
    rows = []
    for (target, phase) in dict.fromkeys((r.target, r.phase) for r in results):
        batch = [r for r in results if (r.target, r.phase) == (target, phase)]
        span = max(r.done_at for r in batch) - min(r.sent_at for r in batch)
        tokens = sum(r.output_tokens for r in batch)
        for cls in ("high", "low"):
            rs = [r for r in batch if r.cls == cls]
            if not rs:
                continue
            ttfts = [r.ttft_s for r in rs if r.status == 200 and r.ttft_s is not None]
            rows.append({
                "target": target, "phase": phase, "class": cls, "sent": len(rs),
                "completed": sum(r.status == 200 for r in rs),
                "rejected_429": sum(r.status == 429 for r in rs),
                "other_errors": sum(r.status not in (200, 429) for r in rs),
                "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
                "phase_out_tok_s": tokens / span if span else 0.0,
            })
    return rows


def table(rows: list[dict]) -> str:
    head = "| target | phase | class | sent | done | 429 | other err | TTFT p50 s | TTFT p99 s | phase out tok/s |"
    lines = [head, "|" + "---|" * 10]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    for r in rows:
        lines.append(f"| {r['target']} | {r['phase']} | {r['class']} | {r['sent']} | {r['completed']} | "
                     f"{r['rejected_429']} | {r['other_errors']} | {fmt(r['ttft_p50_s'])} | {fmt(r['ttft_p99_s'])} | "
                     f"{r['phase_out_tok_s']:.1f} |")
    return "\n".join(lines)


def ratios(rows: list[dict]) -> dict:
    get = lambda t, p, c, k: next((r[k] for r in rows if (r["target"], r["phase"], r["class"]) == (t, p, c)), None)
    ratio = lambda a, b: a / b if a and b else None  # None when a target was not run
    return {
        "ours_high_p99_flood_over_unloaded (goal <= 2)": ratio(
            get("ours", "flood", "high", "ttft_p99_s"), get("ours", "unloaded", "high", "ttft_p99_s")),
        "stock_over_ours_high_p99_flood (goal >= 5)": ratio(
            get("stock", "flood", "high", "ttft_p99_s"), get("ours", "flood", "high", "ttft_p99_s")),
        "ours_over_stock_flood_out_tok_s (goal >= 0.9)": ratio(
            get("ours", "flood", "high", "phase_out_tok_s"), get("stock", "flood", "high", "phase_out_tok_s")),
    }


def plot(results: list[Result], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(dict.fromkeys(r.target for r in results))
    fig, axes = plt.subplots(1, len(targets), figsize=(6 * len(targets), 4.5), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, target in zip(axes, targets):
        for cls, colour in (("low", "tab:orange"), ("high", "tab:blue")):
            pts = [(r.sent_at, r.ttft_s) for r in results
                   if r.target == target and r.phase == "flood" and r.cls == cls and r.ttft_s is not None]
            if pts:
                ax.scatter(*zip(*pts), s=12, c=colour, label=f"{cls} (completed)")
            rejected = [r.sent_at for r in results if r.target == target and r.phase == "flood"
                        and r.cls == cls and r.status != 200]
            if rejected:  # no TTFT: drawn along the bottom edge
                ax.scatter(rejected, [0.05] * len(rejected), marker="x", c="tab:red", s=14,
                           label=f"{cls} rejected / timed out")
        ax.set_title(f"{target}: TTFT under a low-priority flood")
        ax.set_xlabel("request sent at (s into the phase)")
        ax.set_yscale("log")
        ax.set_ylim(0.04, None)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("time to first token (s, log)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def deploy(target: str, profile_name: str):
    from ray import serve
    from ray.serve.llm import build_openai_app

    from deployments.app import build_app_with_router
    from deployments.config.app_args import AppArgs, load_serve_config, router_entry

    config_app = copy.deepcopy(load_serve_config()["applications"][0])
    args = config_app["args"]
    args["profile"] = profile_name
    router = router_entry(config_app)["user_config"]  # the router's settings as serve_config.yaml sets them
    if target == "ours":
        app = build_app_with_router(args, router)
    elif target == "ours-split":
        # The same router with the low class on its own engine (and core).
        app = build_app_with_router({**{k: v for k, v in args.items() if k != "profile"}, "layout": SPLIT_LAYOUT},
                                    router)
    else:
        # The stock app: same model, engine and replica resources, first-come-first-served.
        llm_config = AppArgs.model_validate(args).primary.to_llm_config()
        llm_config.engine_kwargs.pop("scheduling_policy", None)
        # Stock as Ray ships it: vLLM's Ray stat logger on (our profiles turn it off and export their own).
        llm_config.log_engine_metrics = True
        app = build_openai_app({"llm_configs": [llm_config],
                                "ingress_deployment_config": {"ray_actor_options": {"num_cpus": 0.5}}})
    serve.run(app, name="bench", route_prefix="/", blocking=False)
    deadline = time.monotonic() + 600
    model = AppArgs.model_validate(args).primary.model_id
    body = {"model": model, "messages": short_chat(0), "max_tokens": 2}
    while time.monotonic() < deadline:
        try:
            if httpx.post(BASE_URL + "/v1/chat/completions", json=body, timeout=30).status_code == 200:
                return model
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise TimeoutError(f"{target} app not ready")


def replot(json_path: Path, out: Path) -> None:
    """Redraw the plot from a run's JSON (no serving)."""
    data = json.loads(json_path.read_text())
    plot([Result(**r) for r in data["results"]], out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="embedded-cpu")
    parser.add_argument("--phase-s", type=float, default=60.0, help="seconds each phase sends for")
    parser.add_argument("--high-rps", type=float, default=2.0)
    parser.add_argument("--high-tokens", type=int, default=16)
    parser.add_argument("--low-rps", type=float, default=2.0)
    parser.add_argument("--low-words", type=int, default=2200, help="~tokens of each low prompt")
    parser.add_argument("--low-tokens", type=int, default=32)
    parser.add_argument("--client-timeout", type=float, default=180.0)
    parser.add_argument("--targets", default="ours,stock",
                        help="of ours, stock and ours-split (the embedded-cpu-split layout)")
    parser.add_argument("--out", type=Path, default=Path("docs/bench"))
    parser.add_argument("--replot", type=Path, help="only redraw the plot from a run's priority_flood.json")
    args = parser.parse_args()
    if args.replot:
        args.out.mkdir(parents=True, exist_ok=True)
        replot(args.replot, args.out / "priority_flood.png")
        return

    import ray
    from ray import serve

    # Logical CPUs, as the test cluster: two engines + router on a 2-core box.
    ray.init(include_dashboard=False, num_cpus=max(4, os.cpu_count() or 1))
    results: list[Result] = []
    try:
        for target in args.targets.split(","):
            model = deploy(target, args.profile)
            for phase, flood in (("unloaded", False), ("flood", True)):
                print(f"{target}: {phase} phase ({args.phase_s:.0f}s)...", flush=True)
                results += asyncio.run(run_phase(target, phase, model, args, flood))
                time.sleep(5)  # let the engine drain between phases
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()

    rows = summarise(results)
    args.out.mkdir(parents=True, exist_ok=True)
    print(table(rows))
    summary = ratios(rows)
    print_ratios(summary)
    plot(results, args.out / "priority_flood.png")
    write_json(args.out / "priority_flood.json", args, rows, summary, results=results)


def print_ratios(summary: dict) -> None:
    for name, value in summary.items():
        print(f"{name}: {'-' if value is None else f'{value:.2f}'}")


def write_json(path: Path, args, rows: list[dict], summary: dict, **records) -> None:
    """A run's arguments, table rows, ratios and raw records (dataclasses), for replotting and docs."""
    path.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                "ratios": summary, **{k: [asdict(r) for r in v] for k, v in records.items()}},
                               indent=1))


if __name__ == "__main__":
    main()
