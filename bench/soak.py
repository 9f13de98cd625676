"""Overload soak (`make soak`): ten times what the app completes, for two minutes, on loopback.

Starts the app as a user does (`make serve`, i.e. scripts/serve.py), measures
what it completes per second (closed loop, short chats), then sends Poisson
arrivals at ``--factor`` (10) times that for ``--duration-s`` (120 s): a mix of
classes (short chats = high, ~600-token prompts = medium, ~2.2k-token prompts
= low with a client `X-Request-Timeout`), half of them streamed. It checks
what a client and an SRE would:

- every request ends with 200, 429, 503 or 504, and every refusal is in
  OpenAI's error format (a stream that fails carries an error event, then
  `[DONE]`);
- none hangs: each answer comes within its class's start deadline plus its
  generation budget (``hang_bound_s``);
- the router replica's resident memory stays flat (sampled every 5 s from
  /proc; the last third against the first third);
- the high class keeps being served in every 10 s window.

Prints a table, writes `soak.json` (every request, the memory series) and
`soak.png` to ``--out``. Not part of `make test`: it takes about 6 minutes.

    .venv/bin/python bench/soak.py --out docs/bench/soak
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.processes import spawn, stop  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
BASE_URL = "http://127.0.0.1:8000"
WORDS = ["river", "bread", "train", "owl", "glass", "tide", "map", "bell", "stone", "lamp"]
LOW_TIMEOUT_S = 90  # the client's X-Request-Timeout on low requests: a batch job that gives up


@dataclass
class Outcome:
    cls: str
    stream: bool
    sent_at: float
    latency_s: float
    status: int            # HTTP status; 0: no answer (transport error or client timeout)
    openai_format: bool    # a refusal carried {"error": {message, type, code}}; True for a clean 200
    stream_error: int | None = None  # the code of an error event inside a 200 stream
    hung: bool = False


def body_for(cls: str, i: int, stream: bool, model: str) -> tuple[dict, dict]:
    rng = random.Random(i)
    if cls == "high":
        content, max_tokens = f"Write one sentence about a {rng.choice(WORDS)}.", 32
    elif cls == "medium":
        content, max_tokens = "Summarise: " + " ".join(rng.choice(WORDS) for _ in range(600)), 32
    else:
        content, max_tokens = "Summarise: " + " ".join(rng.choice(WORDS) for _ in range(2200)), 16
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "stream": stream}
    headers = {"X-Request-Timeout": str(LOW_TIMEOUT_S)} if cls == "low" else {}
    return body, headers


def is_openai_error(payload) -> bool:
    error = payload.get("error") if isinstance(payload, dict) else None
    return isinstance(error, dict) and {"message", "type", "code"} <= set(error)


async def one(client, cls, i, stream, model, start, hang_bound_s) -> Outcome:
    body, headers = body_for(cls, i, stream, model)
    sent = time.monotonic()
    out = Outcome(cls, stream, sent - start, 0.0, 0, False)
    try:
        async with asyncio.timeout(hang_bound_s[cls]):
            async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
                out.status = r.status_code
                if r.status_code != 200:
                    out.openai_format = is_openai_error(json.loads(await r.aread()))
                elif not stream:
                    out.openai_format = "choices" in json.loads(await r.aread())
                else:
                    out.openai_format = await read_stream(r, out)
    except TimeoutError:
        out.hung = True
    except (httpx.HTTPError, ValueError):
        pass
    out.latency_s = time.monotonic() - sent
    return out


async def read_stream(r, out: Outcome) -> bool:
    """True when the stream ends with [DONE] (after an error event, if any)."""
    last = None
    async for line in r.aiter_lines():
        if not line.startswith("data: "):
            continue
        last = line[len("data: "):]
        if last.startswith('{"error"'):
            out.stream_error = json.loads(last)["error"].get("code")
    return last == "[DONE]"


async def closed_loop(model: str, clients: int, seconds: float) -> float:
    """Completions per second of short chats from ``clients`` closed-loop clients."""
    done, start = 0, time.monotonic()
    async with httpx.AsyncClient(base_url=BASE_URL, timeout=120) as client:
        async def worker(w):
            nonlocal done
            i = 0
            while time.monotonic() - start < seconds:
                body, _ = body_for("high", w * 1000 + i, False, model)
                if (await client.post("/v1/chat/completions", json=body)).status_code == 200:
                    done += 1
                i += 1
        await asyncio.gather(*(worker(w) for w in range(clients)))
    return done / (time.monotonic() - start)


async def soak(model: str, rate: float, seconds: float, mix: dict, hang_bound_s: dict) -> list[Outcome]:
    rng, tasks, start, i = random.Random(7), [], time.monotonic(), 0
    limits = httpx.Limits(max_connections=4000, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=BASE_URL, timeout=None, limits=limits) as client:
        while time.monotonic() - start < seconds:
            cls = rng.choices(list(mix), weights=list(mix.values()))[0]
            tasks.append(asyncio.create_task(one(client, cls, i, rng.random() < 0.5, model, start, hang_bound_s)))
            i += 1
            await asyncio.sleep(rng.expovariate(rate))
        return list(await asyncio.gather(*tasks))


def router_pid() -> int | None:
    found = subprocess.run(["pgrep", "-f", "ServeReplica:llm:Router"], capture_output=True, text=True).stdout.split()
    return int(found[0]) if found else None


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        return None
    return None


async def sample_rss(pid: int, every_s: float, series: list, stop_event: asyncio.Event) -> None:
    start = time.monotonic()
    while not stop_event.is_set():
        series.append((round(time.monotonic() - start, 1), rss_mib(pid)))
        print(f"  router RSS at {series[-1][0]:5.0f}s: {series[-1][1]:.0f} MiB", flush=True)
        try:
            await asyncio.wait_for(stop_event.wait(), every_s)
        except TimeoutError:
            pass


def hang_bounds(model_settings) -> dict:
    """Seconds within which each class must be answered: start deadline + generation budget + margin."""
    bounds = {}
    for cls, targets in model_settings.classes.items():
        start_s = LOW_TIMEOUT_S if cls == "low" else targets.start_deadline_s
        generation_s = model_settings.generation_slack * 32 * targets.tpot_s + model_settings.stall_s
        bounds[cls] = start_s + generation_s + 30
    return bounds


def summarise(outcomes: list[Outcome], rss: list, seconds: float) -> dict:
    by_class = {}
    for cls in ("high", "medium", "low"):
        got = [o for o in outcomes if o.cls == cls]
        statuses = {}
        for o in got:
            statuses[str(o.status)] = statuses.get(str(o.status), 0) + 1
        by_class[cls] = {"sent": len(got), "statuses": statuses,
                         "stream_errors": sum(o.stream_error is not None for o in got),
                         "not_openai_format": sum(not o.openai_format for o in got if o.status),
                         "hung": sum(o.hung for o in got),
                         "refusal_p50_ms": _p50([o.latency_s * 1000 for o in got if o.status == 429])}
    windows = [sum(o.cls == "high" and o.status == 200 and w <= o.sent_at < w + 10 for o in outcomes)
               for w in range(0, int(seconds), 10)]
    values = [m for _, m in rss if m is not None]
    third = max(1, len(values) // 3)
    return {"classes": by_class, "high_served_per_10s": windows,
            "rss_first_third_mib": sum(values[:third]) / third, "rss_last_third_mib": sum(values[-third:]) / third,
            "unexpected_status": sum(o.status not in (200, 429, 503, 504) for o in outcomes)}


def _p50(values):
    return sorted(values)[len(values) // 2] if values else None


def plot(outcomes: list[Outcome], rss: list, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    left.plot([t for t, _ in rss], [m for _, m in rss], "o-")
    left.set(title="router replica resident memory", xlabel="s", ylabel="MiB")
    left.set_ylim(bottom=0)
    for status, colour in (("200", "tab:green"), ("429", "tab:orange"), ("503", "tab:red"), ("504", "tab:purple")):
        xs = [o.sent_at for o in outcomes if str(o.status) == status]
        right.hist(xs, bins=24, histtype="step", color=colour, label=status)
    right.set(title="answers by status, by send time", xlabel="s sent after start", ylabel="requests")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--factor", type=float, default=10.0, help="offered load over what the app completes")
    parser.add_argument("--duration-s", type=float, default=120.0)
    parser.add_argument("--out", type=Path, default=Path("docs/bench/soak"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from deployments.config.app_args import served_app_from_serve_config

    app = served_app_from_serve_config()
    model = app.args.primary.model_id
    bounds = hang_bounds(app.queue_settings(app.args.profiles[app.args.profile]))
    log = open(args.out / "serve.log", "w")
    server = spawn([sys.executable, "scripts/serve.py"], cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 900
        while not (args.out / "serve.log").read_text().count("ready: "):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the app did not start; see {args.out / 'serve.log'}")
            time.sleep(2)
        capacity = asyncio.run(closed_loop(model, clients=8, seconds=30))
        rate = args.factor * capacity
        print(f"the app completes {capacity:.2f} short chats/s; soaking at {rate:.1f}/s for {args.duration_s:.0f}s")
        pid = router_pid()
        rss: list = []

        async def run() -> list[Outcome]:
            stop_event = asyncio.Event()
            sampler = asyncio.create_task(sample_rss(pid, 5.0, rss, stop_event))
            try:
                return await soak(model, rate, args.duration_s, {"high": 0.6, "medium": 0.3, "low": 0.1}, bounds)
            finally:
                stop_event.set()
                await sampler

        outcomes = asyncio.run(run())
        after_s = httpx.get(BASE_URL + "/health", timeout=60).status_code
    finally:
        stop(server)
        log.close()
    summary = summarise(outcomes, rss, args.duration_s)
    summary.update(capacity_req_s=capacity, rate_req_s=rate, duration_s=args.duration_s, hang_bounds_s=bounds,
                   health_after=after_s)
    print(json.dumps(summary, indent=1))
    (args.out / "soak.json").write_text(json.dumps({"summary": summary, "rss_mib": rss,
                                                    "outcomes": [asdict(o) for o in outcomes]}))
    plot(outcomes, rss, args.out / "soak.png")


if __name__ == "__main__":
    main()
