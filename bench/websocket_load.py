"""TTFT over the chat socket beside the same load over HTTP SSE, in one run, on loopback.

Does the WebSocket path (``/v1/chat/ws``, deployments/router/websocket.py) add
time to the first token over ``POST /v1/chat/completions`` with
``stream: true``? ``--clients`` closed-loop clients each keep one socket and
one keep-alive HTTP connection open and send short chats (``--max-tokens``,
a one-line prompt: class high) for ``--duration-s``, each time over both
paths one after the other, in a random order per pair, so both paths meet the
same engine state and the same concurrency. The load is one the router admits
without queueing (the router's queue wait is reported for each request and
summarised). TTFT is what the client sees: from sending the request (the
start message, or the POST) to the first content token received.

Prints a table, writes ``websocket_load.json`` (every sample) and
``websocket_load.png`` (TTFT distributions) to ``--out``. Starts the app as
``make serve`` does (scripts/serve.py) unless ``--url`` names a running one.

    flock /tmp/port8000.lock .venv/bin/python bench/websocket_load.py --out docs/bench/websocket
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from websockets.asyncio.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.processes import spawn, stop  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
WORDS = ["river", "bread", "train", "owl", "glass", "tide", "map", "bell", "stone", "lamp"]


@dataclass
class Sample:
    path: str              # "websocket" or "http"
    client: int
    sent_at: float         # seconds since the run started
    ttft_ms: float | None  # None: no token (an error)
    total_ms: float
    tokens: int
    queue_wait_ms: float | None
    cls: str | None
    error: str | None = None
    pair: int = 0          # the client's pair index: the same chat over both paths, one after the other


def chat(i: int, max_tokens: int) -> dict:
    word = random.Random(i).choice(WORDS)
    return {"messages": [{"role": "user", "content": f"Write one sentence about a {word}."}],
            "max_tokens": max_tokens, "temperature": 0}


async def over_socket(ws, client: int, body: dict, t0: float) -> Sample:
    sent = time.perf_counter()
    await ws.send(json.dumps({"type": "start", "request": body}))
    first, tokens = None, 0
    while True:
        message = json.loads(await ws.recv())
        if message["type"] == "delta":
            first = first or time.perf_counter()
            tokens += 1
        elif message["type"] == "done":
            router = message["router"]
            return Sample("websocket", client, sent - t0, ms(first, sent), ms(time.perf_counter(), sent),
                          message["tokens"], float(router.get("queue_wait_ms", "nan")), router.get("class"))
        elif message["type"] == "error":
            return Sample("websocket", client, sent - t0, None, ms(time.perf_counter(), sent), tokens, None, None,
                          f"{message['status']}: {message['message'][:120]}")


async def over_http(http: httpx.AsyncClient, client: int, body: dict, t0: float) -> Sample:
    sent = time.perf_counter()
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    first, tokens, usage = None, 0, None
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return Sample("http", client, sent - t0, None, ms(time.perf_counter(), sent), 0, None, None,
                          f"{response.status_code}: {response.text[:120]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if any((c.get("delta") or {}).get("content") for c in event.get("choices") or ()):
                first = first or time.perf_counter()
                tokens += 1
            usage = event.get("usage") or usage
        headers = response.headers
    return Sample("http", client, sent - t0, ms(first, sent), ms(time.perf_counter(), sent),
                  (usage or {}).get("completion_tokens", tokens), float(headers.get("x-queue-wait-ms", "nan")),
                  headers.get("x-priority-class"))


def ms(at: float | None, since: float) -> float | None:
    return None if at is None else (at - since) * 1000


async def client_loop(url: str, client: int, args, t0: float, samples: list[Sample]) -> None:
    rng = random.Random(client)
    ws_url = url.replace("http://", "ws://") + "/v1/chat/ws"
    async with connect(ws_url, max_size=None) as ws, httpx.AsyncClient(base_url=url, timeout=120) as http:
        i = 0
        while time.perf_counter() - t0 < args.duration_s:
            body = chat(client * 100_000 + i, args.max_tokens)
            paths = [lambda: over_socket(ws, client, body, t0), lambda: over_http(http, client, body, t0)]
            rng.shuffle(paths)
            for path in paths:
                sample = await path()
                sample.pair = i
                samples.append(sample)
            i += 1


async def run(url: str, args) -> list[Sample]:
    # One untimed pair per client first: connections open, the tokenizer and engine warm.
    warm = argparse.Namespace(**{**vars(args), "duration_s": 0.0})
    await asyncio.gather(*(client_loop(url, c, warm, time.perf_counter() - 1, []) for c in range(args.clients)))
    samples: list[Sample] = []
    t0 = time.perf_counter()
    async with asyncio.timeout(args.duration_s + 180):  # bounded: the last pairs finish, then stop
        await asyncio.gather(*(client_loop(url, c, args, t0, samples) for c in range(args.clients)))
    return samples


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def summarise(samples: list[Sample]) -> dict:
    rows = {}
    for path in ("websocket", "http"):
        mine = [s for s in samples if s.path == path]
        ttft = [s.ttft_ms for s in mine if s.ttft_ms is not None]
        waits = [s.queue_wait_ms for s in mine if s.queue_wait_ms is not None]
        rows[path] = {"requests": len(mine), "errors": sum(s.error is not None for s in mine),
                      "ttft_p50_ms": percentile(ttft, 50), "ttft_p99_ms": percentile(ttft, 99),
                      "ttft_mean_ms": statistics.fmean(ttft), "total_p50_ms": percentile([s.total_ms for s in mine], 50),
                      "queue_wait_max_ms": max(waits) if waits else None,
                      "classes": sorted({s.cls for s in mine if s.cls})}
    rows["added_ttft_p50_ms"] = rows["websocket"]["ttft_p50_ms"] - rows["http"]["ttft_p50_ms"]
    # Within each pair both paths met nearly the same engine state: the median of the differences
    # is the least noisy figure of what the socket adds.
    by_pair: dict = {}
    for s in samples:
        if s.ttft_ms is not None:
            by_pair.setdefault((s.client, s.pair), {})[s.path] = s.ttft_ms
    differences = [p["websocket"] - p["http"] for p in by_pair.values() if len(p) == 2]
    rows["paired_difference_median_ms"] = statistics.median(differences) if differences else None
    rows["pairs"] = len(differences)
    rows["added_ttft_p99_ms"] = rows["websocket"]["ttft_p99_ms"] - rows["http"]["ttft_p99_ms"]
    return rows


def table(summary: dict) -> str:
    lines = ["| path | requests | errors | TTFT p50 ms | TTFT p99 ms | TTFT mean ms | total p50 ms | max queue wait ms |",
             "|---|---|---|---|---|---|---|---|"]
    for path in ("websocket", "http"):
        r = summary[path]
        lines.append(f"| {path} | {r['requests']} | {r['errors']} | {r['ttft_p50_ms']:.1f} | {r['ttft_p99_ms']:.1f} | "
                     f"{r['ttft_mean_ms']:.1f} | {r['total_p50_ms']:.1f} | {r['queue_wait_max_ms']:.0f} |")
    lines.append(f"\nsocket minus HTTP: TTFT p50 {summary['added_ttft_p50_ms']:+.1f} ms, "
                 f"p99 {summary['added_ttft_p99_ms']:+.1f} ms; median of the {summary['pairs']} paired "
                 f"differences {summary['paired_difference_median_ms']:+.1f} ms")
    return "\n".join(lines)


def plot(samples: list[Sample], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in ("websocket", "http"):
        ttft = sorted(s.ttft_ms for s in samples if s.path == name and s.ttft_ms is not None)
        ax.plot(ttft, [(i + 1) / len(ttft) for i in range(len(ttft))], label=f"{name} (n={len(ttft)})")
    ax.set_xlabel("time to first token, ms (client side)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("TTFT: chat socket vs HTTP SSE, same load, one run")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def start_app(out: Path):
    log = open(out / "serve.log", "w")
    server = spawn([sys.executable, "scripts/serve.py"], cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 900
    while "ready: " not in (out / "serve.log").read_text():
        if server.poll() is not None or time.monotonic() > deadline:
            stop(server)
            raise RuntimeError(f"the app did not start; see {out / 'serve.log'}")
        time.sleep(2)
    return server, log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running app (default: start one as `make serve` does)")
    parser.add_argument("--clients", type=int, default=2, help="concurrent clients, each over both paths")
    parser.add_argument("--duration-s", type=float, default=120.0)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("docs/bench/websocket"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    server = log = None
    if args.url is None:
        server, log = start_app(args.out)
    try:
        samples = asyncio.run(run(args.url or "http://127.0.0.1:8000", args))
    finally:
        if server is not None:
            stop(server)
            log.close()
    summary = summarise(samples)
    print(table(summary))
    (args.out / "websocket_load.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "summary": summary,
         "samples": [asdict(s) for s in samples]}, indent=1))
    plot(samples, args.out / "websocket_load.png")
    print(f"wrote {args.out / 'websocket_load.json'} and {args.out / 'websocket_load.png'}")


if __name__ == "__main__":
    main()
