"""Fair sharing between tenants of one class: a light tenant beside a heavy one, FIFO vs VTC.

Serves the embedded default (or ``--profile``) with API keys on, two tenants in
one tier, all requests short chats (the high class), streamed:

1. ``alone``: tenant B sends at ``--rate-b`` requests/s (Poisson) for ``--phase-s``;
2. ``fifo``: tenant A sends at ``--ratio`` x B's rate beside B; the class queue is
   first-come-first-served (the tenants file's ``sharing: fifo``);
3. ``fair``: the same with ``sharing: fair`` (the Virtual Token Counter).

The tenants file is rewritten between phases; nothing restarts. Prints per phase
and tenant: sent, served, refused, TTFT p50/p99 and output tokens/s; the ratios
B's p99 (fair) / B's p99 (alone) (goal <= 1.5) and A's output tok/s fair / fifo
(A keeps what B leaves); writes fairness.json and fairness.png.

    .venv/bin/python bench/fairness.py --out docs/bench/fairness
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import random
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.priority_flood import BASE_URL, percentile, print_ratios, short_chat, write_json  # noqa: E402
from deployments.tenancy.tenants import digest  # noqa: E402

KEYS = {"A": "sk-bench-tenant-a-" + "a" * 24, "B": "sk-bench-tenant-b-" + "b" * 24}
TIER = {"max_class": "high", "requests_per_minute": 1_000_000, "tokens_per_minute": 1_000_000_000,
        "max_concurrent": 10_000}


@dataclass
class Sample:
    phase: str
    tenant: str
    sent_at: float
    status: int
    ttft_s: float | None
    output_tokens: int
    done_at: float
    queue_wait_s: float | None = None  # the router's x-queue-wait-ms: waiting for a window slot
    error: str = ""  # a refusal's or failure's OpenAI error message (why a 429 came)
    retry_after_s: float | None = None


def tenants_doc(sharing: str) -> dict:
    return {"sharing": sharing, "tiers": {"bench": TIER},
            "tenants": {name: {"tier": "bench", "key_sha256": [digest(key)]} for name, key in KEYS.items()}}


def write_tenants(path: Path, sharing: str) -> None:
    partial = path.with_suffix(".new")
    partial.write_text(yaml.safe_dump(tenants_doc(sharing)))
    partial.replace(path)


def deploy(profile: str, tenants_path: Path, tenant_reserve: float | None = None) -> str:
    from ray import serve

    from deployments.app import build_app_with_router
    from deployments.config.app_args import AppArgs, load_serve_config, router_entry

    app = copy.deepcopy(load_serve_config()["applications"][0])
    args = {**app["args"], "profile": profile}
    router = router_entry(app)["user_config"]
    router["tenancy"] = {"keys_file": str(tenants_path), "reload_s": 0.5}
    if tenant_reserve is not None:
        router["queues"]["tenant_reserve"] = tenant_reserve
    serve.run(build_app_with_router(args, router), name="bench", route_prefix="/", blocking=False)
    model = AppArgs.model_validate(args).primary.model_id
    body = {"model": model, "messages": short_chat(0), "max_tokens": 2}
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            answer = httpx.post(BASE_URL + "/v1/chat/completions", json=body, timeout=30,
                                headers={"Authorization": f"Bearer {KEYS['B']}"})
            if answer.status_code == 200:
                return model
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise TimeoutError("app not ready")


async def one(client, phase, tenant, model, i, max_tokens) -> Sample:
    body = {"model": model, "messages": short_chat(i), "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    sent = time.monotonic()
    ttft, tokens, status, wait_ms, message = None, 0, 0, None, ""
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body,
                                 headers={"Authorization": f"Bearer {KEYS[tenant]}"}) as stream:
            status = stream.status_code
            if status != 200:  # a JSON error, not a stream
                await stream.aread()
                retry = stream.headers.get("retry-after")
                return Sample(phase, tenant, sent, status, None, 0, time.monotonic(), error=error_message(stream),
                              retry_after_s=float(retry) if retry else None)
            wait_ms = stream.headers.get("x-queue-wait-ms")
            async for line in stream.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                if ttft is None and '"content"' in line:
                    ttft = time.monotonic() - sent
                if '"completion_tokens"' in line:
                    tokens = json.loads(line[len("data: "):])["usage"]["completion_tokens"]
                if '"error"' in line:
                    error = json.loads(line[len("data: "):])["error"]
                    status, message = error["code"], error.get("message", "")
    except httpx.HTTPError as exc:
        status, message = 599, repr(exc)
    return Sample(phase, tenant, sent, status, ttft, tokens, time.monotonic(),
                  None if wait_ms is None else float(wait_ms) / 1000, error=message)


def error_message(response: httpx.Response) -> str:
    """The OpenAI error body's message (or the body's start when it is not one)."""
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


async def poisson(client, phase, tenant, model, rate, seconds, max_tokens, seed) -> list[Sample]:
    rng, tasks, start, i = random.Random(seed), [], time.monotonic(), 0
    while True:
        await asyncio.sleep(rng.expovariate(rate))
        if time.monotonic() - start > seconds:
            break
        tasks.append(asyncio.create_task(one(client, phase, tenant, model, i, max_tokens)))
        i += 1
    return list(await asyncio.gather(*tasks))


async def run_phase(phase: str, model: str, args) -> list[Sample]:
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=BASE_URL, timeout=args.client_timeout, limits=limits) as client:
        senders = [poisson(client, phase, "B", model, args.rate_b, args.phase_s, args.max_tokens, 2)]
        if phase != "alone":
            senders.append(poisson(client, phase, "A", model, args.rate_b * args.ratio, args.phase_s,
                                   args.max_tokens, 1))
        return [s for group in await asyncio.gather(*senders) for s in group]


def summarise(samples: list[Sample]) -> list[dict]:
    rows = []
    for phase in ("alone", "fifo", "fair"):
        for tenant in ("A", "B"):
            mine = [s for s in samples if s.phase == phase and s.tenant == tenant]
            if not mine:
                continue
            served = [s for s in mine if s.status == 200 and s.ttft_s is not None]
            span = max(s.done_at for s in mine) - min(s.sent_at for s in mine)
            ttfts = [s.ttft_s for s in served]
            rows.append({"phase": phase, "tenant": tenant, "sent": len(mine), "served": len(served),
                         "refused_429": sum(s.status == 429 for s in mine),
                         "other": sum(s.status not in (200, 429) for s in mine),
                         "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
                         "queue_wait_p50_s": percentile([s.queue_wait_s for s in served
                                                         if s.queue_wait_s is not None], 50),
                         "output_tok_s": sum(s.output_tokens for s in served) / span if span > 0 else 0.0,
                         "refusals": refusal_reasons(mine)})
    return rows


def refusal_reasons(samples: list[Sample]) -> dict[str, int]:
    """How many non-200 answers gave each error message (digits folded, so one reason counts once)."""
    reasons: dict[str, int] = {}
    for s in samples:
        if s.status != 200:
            reason = f"{s.status} " + re.sub(r"\d+(\.\d+)?", "N", s.error)[:160]
            reasons[reason] = reasons.get(reason, 0) + 1
    return reasons


def ratios(rows: list[dict]) -> dict:
    def get(phase, tenant, key):
        row = next((r for r in rows if r["phase"] == phase and r["tenant"] == tenant), None)
        return None if row is None else row[key]

    def ratio(a, b):
        return None if a is None or not b else a / b
    return {"B p99 fair / alone (goal <= 1.5)": ratio(get("fair", "B", "ttft_p99_s"), get("alone", "B", "ttft_p99_s")),
            "B p99 fifo / alone": ratio(get("fifo", "B", "ttft_p99_s"), get("alone", "B", "ttft_p99_s")),
            "A tok/s fair / fifo": ratio(get("fair", "A", "output_tok_s"), get("fifo", "A", "output_tok_s"))}


def table(rows: list[dict]) -> str:
    head = ("| phase | tenant | sent | served | 429 | other | queue wait p50 s | TTFT p50 s | TTFT p99 s | "
            "output tok/s |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        lines.append(f"| {r['phase']} | {r['tenant']} | {r['sent']} | {r['served']} | {r['refused_429']} | "
                     f"{r['other']} | {fmt(r['queue_wait_p50_s'])} | {fmt(r['ttft_p50_s'])} | {fmt(r['ttft_p99_s'])} | {r['output_tok_s']:.1f} |")
    reasons = [f"- {r['phase']} {r['tenant']}: {n} x {reason}" for r in rows for reason, n in r["refusals"].items()]
    return "\n".join(lines + (["", "Refusals and failures, by message:"] + reasons if reasons else []))


def plot(samples: list[Sample], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    styles = {"alone": ("tab:green", "B alone"), "fifo": ("tab:red", "B beside A, FIFO"),
              "fair": ("tab:blue", "B beside A, fair (VTC)")}
    for phase, (colour, label) in styles.items():
        ttfts = sorted(s.ttft_s for s in samples if s.phase == phase and s.tenant == "B" and s.ttft_s is not None)
        if ttfts:
            ax.plot(ttfts, [(i + 1) / len(ttfts) for i in range(len(ttfts))], color=colour, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("tenant B's time to first token, s (log)")
    ax.set_ylabel("share of B's served requests")
    ax.set_title("A light tenant beside one sending 10x its rate, same class")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="embedded-cpu")
    parser.add_argument("--phase-s", type=float, default=60.0)
    parser.add_argument("--rate-b", type=float, default=0.5, help="tenant B's requests/s")
    parser.add_argument("--ratio", type=float, default=10.0, help="tenant A's rate over B's")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--client-timeout", type=float, default=180.0)
    parser.add_argument("--tenant-reserve", type=float, default=None,
                        help="the router's queues.tenant_reserve (default: serve_config.yaml's)")
    parser.add_argument("--out", type=Path, default=Path("docs/bench/fairness"))
    args = parser.parse_args()

    import ray
    from ray import serve

    ray.init(include_dashboard=False, num_cpus=max(4, os.cpu_count() or 1))
    samples: list[Sample] = []
    tenants_path = Path(tempfile.mkdtemp()) / "tenants.yaml"
    write_tenants(tenants_path, "fair")
    try:
        model = deploy(args.profile, tenants_path, args.tenant_reserve)
        for phase in ("alone", "fifo", "fair"):
            write_tenants(tenants_path, "fifo" if phase == "fifo" else "fair")
            time.sleep(2)  # re-read within reload_s
            print(f"phase {phase} ({args.phase_s:.0f}s)...", flush=True)
            samples += asyncio.run(run_phase(phase, model, args))
            time.sleep(5)  # drain between phases
    finally:
        serve.shutdown()
        ray.shutdown()
    rows = summarise(samples)
    summary = ratios(rows)
    print(table(rows))
    print_ratios(summary)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(samples, args.out / "fairness.png")
    write_json(args.out / "fairness.json", args, rows, summary, samples=samples)


if __name__ == "__main__":
    main()
