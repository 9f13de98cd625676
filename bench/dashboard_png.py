"""The Grafana dashboard's panels as PNGs, from real Prometheus data of a benchmark run.

Runs the app the cluster way (``ray start --head`` + ``serve deploy serve_config.yaml``, as
tests/cluster.py does: the app-level autoscaling policy included), starts Debian's ``prometheus``
with the repository's config (deployments/observability/prometheus.yml: Ray's service-discovery
file, every Ray metrics port) on a free port and a temporary storage directory, as
tests/test_metrics_live.py does, then drives a few minutes of mixed real load:

- short one-sentence chats (the high class), streamed, all along;
- medium-length prompts (the medium class) now and then;
- a flood of long (~2.2k-token) low-class prompts in the middle of the run;
- a burst of concurrent long-answer high chats, and chats whose ``X-Request-Timeout`` no generation
  could meet: 429s (predicted wait, client timeout forecast);
- a few invalid requests: 400s.

Then, for every panel of deployments/observability/dashboards/llm-serving.json, it runs the panel's
own PromQL expressions (``$pool`` and ``$class`` as all, ``$__rate_interval`` as ``--rate-interval``)
through Prometheus's ``query_range`` API over the run and draws the series with matplotlib: one PNG
per dashboard row and one overview of the main panels, under ``--out``. Prints which panels had data;
a panel without data is drawn with a "no data" note and listed, never left out.

    flock /tmp/port8000.lock .venv/bin/python bench/dashboard_png.py --out docs/bench/dashboards
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from bench.priority_flood import BASE_URL, long_chat, one_request, short_chat  # noqa: E402
from scripts.processes import spawn, stop  # noqa: E402
from tests.cluster import DeployedCluster, wait_healthy  # noqa: E402

CONFIG = REPO_ROOT / "deployments" / "observability" / "prometheus.yml"
DASHBOARD = REPO_ROOT / "deployments" / "observability" / "dashboards" / "llm-serving.json"

# The overview: the main panels of each row (titles as in the dashboard).
OVERVIEW = ["Requests by outcome", "Rejections by reason", "Time to first token (streams)",
            "Goodput and output tokens", "Queue depth", "In flight and window",
            "Running and waiting requests", "KV-cache usage", "Engine TTFT", "Target vs running replicas"]


# --- Prometheus --------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Prometheus:
    """Debian's prometheus with the repository's config, on a free port; ``storage`` is kept after the run
    (``--replot`` starts Prometheus on it again, without Ray, and queries the run's range)."""

    def __init__(self, storage: Path, config: Path = CONFIG):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(storage / "prometheus.log", "w")
        self.log_path = storage / "prometheus.log"
        self.proc = spawn(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={storage / 'data'}",
                           f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                          stdout=self.log, stderr=subprocess.STDOUT)

    def get(self, path: str, **params) -> dict:
        answer = httpx.get(self.url + path, params=params, timeout=30).json()
        if answer.get("status") != "success":
            raise RuntimeError(f"{path} {params}: {answer}")
        return answer["data"]

    def wait_scraping(self, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited {self.proc.returncode}: {self.log_path.read_text()}")
            try:
                ups = [float(r["value"][1]) for r in self.get("/api/v1/query", query='up{job="ray"}')["result"]]
                if ups and all(v == 1 for v in ups):
                    print(f"prometheus {self.url}: scraping {len(ups)} Ray targets", flush=True)
                    return
                last = ups
            except (httpx.TransportError, ValueError, RuntimeError) as e:
                last = e
            time.sleep(1)
        raise TimeoutError(f"Prometheus not scraping every Ray target: {last}")

    def wait_ready(self, timeout_s: float = 60) -> None:
        """Up and answering queries (its TSDB loaded)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited {self.proc.returncode}: {self.log_path.read_text()}")
            try:
                if httpx.get(self.url + "/-/ready", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise TimeoutError("Prometheus not ready")

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        return self.get("/api/v1/query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}",
                        step=f"{step:g}s")["result"]

    def close(self) -> None:
        try:
            stop(self.proc, escalation=((15, 10.0), (9, 5.0)))  # SIGTERM, then SIGKILL
        finally:
            self.log.close()


# --- load --------------------------------------------------------------------------------------------

def stream_body(model: str, messages: list[dict], max_tokens: int, **extra) -> dict:
    return {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0, **extra}


async def post(client: httpx.AsyncClient, body: dict, headers: dict | None = None) -> int:
    try:
        r = await client.post("/v1/chat/completions", json=body, headers=headers or {})
        return r.status_code
    except httpx.HTTPError:
        return 599


async def drive(model: str, args, timeline: dict) -> dict[str, dict[str, int]]:
    """The mixed load; returns what the client saw: kind -> status -> count."""
    seen: dict[str, dict[str, int]] = {}
    tasks: list[asyncio.Task] = []

    def note(kind: str, status: int) -> None:
        seen.setdefault(kind, {}).setdefault(str(status), 0)
        seen[kind][str(status)] += 1

    async with httpx.AsyncClient(base_url=BASE_URL, timeout=args.client_timeout,
                                 limits=httpx.Limits(max_connections=1000)) as client:
        start = time.monotonic()
        timeline["start"] = time.time()
        L = args.load_s
        flood = (0.25 * L, 0.70 * L)
        burst_at, bad_at = 0.45 * L, (0.15 * L, 0.85 * L)
        timeline["flood"] = flood
        timeline["burst"] = burst_at  # then the time it really started
        timeline["invalid"] = bad_at
        timeline["end_s"] = L

        async def tracked(kind: str, coro):
            result = await coro
            note(kind, result.status if hasattr(result, "status") else result)

        def spawn_task(kind: str, coro) -> None:
            tasks.append(asyncio.create_task(tracked(kind, coro)))

        async def steady(kind: str, rate: float, window: tuple[float, float], make):
            i = 0
            while time.monotonic() - start < window[0]:
                await asyncio.sleep(0.2)
            while time.monotonic() - start < window[1]:
                spawn_task(kind, make(i))
                i += 1
                await asyncio.sleep(1 / rate)

        async def at(t: float) -> None:
            await asyncio.sleep(max(0.0, t - (time.monotonic() - start)))

        def invalid() -> None:
            # 400s: no messages, temperature out of range, an unknown X-Priority class.
            for body, headers in (({"model": model, "messages": [], "max_tokens": 2}, None),
                                  ({"model": model, "messages": short_chat(1), "max_tokens": 2,
                                    "temperature": 9.0}, None),
                                  ({"model": model, "messages": short_chat(2), "max_tokens": 2},
                                   {"X-Priority": "urgent"})):
                spawn_task("invalid", post(client, body, headers))

        async def events():
            await at(bad_at[0])
            invalid()
            await at(burst_at)
            timeline["burst"] = time.monotonic() - start
            # Overload: a burst of concurrent long-answer high chats, and answers no deadline allows.
            for i in range(args.burst):
                spawn_task("burst", one_request(client, "ours", "burst", "high",
                                                stream_body(model, short_chat(i), 256, ignore_eos=True), start))
            for i in range(6):
                spawn_task("client_timeout", post(client, stream_body(model, short_chat(i), 1000),
                                                  {"X-Request-Timeout": "2"}))
                await asyncio.sleep(2)
            await at(bad_at[1])
            invalid()

        senders = [
            steady("high", args.high_rps, (0, L), lambda i: one_request(
                client, "ours", "mixed", "high", stream_body(model, short_chat(i), 16), start)),
            steady("medium", args.medium_rps, (0, L), lambda i: one_request(
                client, "ours", "mixed", "medium", stream_body(model, long_chat(i, 300), 24), start)),
            steady("low", args.low_rps, flood, lambda i: one_request(
                client, "ours", "mixed", "low", stream_body(model, long_chat(i, args.low_words), 32,
                                                            ignore_eos=True), start)),
            events(),
        ]
        await asyncio.gather(*senders)
        # Let what was admitted finish for a while; then leave the rest (the client goes: 499s).
        pending = [t for t in tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=args.drain_s)
        left = [t for t in tasks if not t.done()]
        for t in left:
            t.cancel()
        await asyncio.gather(*left, return_exceptions=True)
        seen["left_by_client"] = {"n": len(left)}
        timeline["load_end"] = time.time()
    return seen


# --- the dashboard's panels ----------------------------------------------------------------------------

def dashboard_rows() -> list[tuple[str, list[dict]]]:
    """(row title, its panels) in the dashboard's order."""
    rows: list[tuple[str, list[dict]]] = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        if panel.get("type") == "row":
            rows.append((panel["title"], []))
        elif panel.get("targets"):
            if not rows:
                rows.append(("", []))
            rows[-1][1].append(panel)
    return rows


def concrete(expr: str, rate_interval: str) -> str:
    return (expr.replace('=~"$pool"', '=~".*"').replace('=~"$class"', '=~".*"')
            .replace("$__rate_interval", rate_interval))


def legend(fmt: str, labels: dict) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt or "") or str(labels)


def query_panels(prom: Prometheus, start: float, end: float, step: float, rate_interval: str) -> dict:
    """panel title -> {"exprs": [...], "series": [(legend, [t...], [v...])], "error": str|None}."""
    found = {}
    for row, panels in dashboard_rows():
        for panel in panels:
            entry = {"row": row, "exprs": [], "series": [], "error": None, "unit": panel.get("fieldConfig", {})
                     .get("defaults", {}).get("unit")}
            for target in panel["targets"]:
                expr = concrete(target["expr"], rate_interval)
                entry["exprs"].append(expr)
                try:
                    result = prom.query_range(expr, start, end, step)
                except Exception as e:  # reported, not hidden
                    entry["error"] = str(e)[:300]
                    continue
                for s in result:
                    points = [(float(t), float(v)) for t, v in s["values"]]
                    points = [(t, v) for t, v in points if v == v and abs(v) != float("inf")]
                    if points:
                        entry["series"].append((legend(target.get("legendFormat", ""), s["metric"]),
                                                [t for t, _ in points], [v for _, v in points]))
            found[panel["title"]] = entry
    return found


def draw_panel(ax, title: str, entry: dict, t0: float, timeline: dict) -> None:
    ax.set_title(title, fontsize=9)
    lo, hi = timeline["flood"]
    ax.axvspan(lo, hi, color="tab:orange", alpha=0.08, lw=0)
    ax.set_xlim(-30, timeline["total_s"])
    ax.axvline(timeline["burst"], color="tab:red", lw=0.8, ls=":")
    if not entry["series"]:
        why = entry["error"] or ("no series: no GPUs on this machine (absent, not zero)" if "GPU" in entry["row"]
                                 else "no data in this run")
        ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, fontsize=8, color="grey",
                wrap=True)
    for name, ts, vs in sorted(entry["series"], key=lambda s: s[0])[:12]:
        ax.plot([t - t0 for t in ts], vs, lw=1.1, label=name[:40])
    if entry["series"]:
        ax.legend(fontsize=6, loc="upper left", ncol=1 if len(entry["series"]) < 6 else 2)
    unit = entry.get("unit")
    if unit:
        ax.set_ylabel(unit, fontsize=7)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.set_xlabel("s since the load started (shaded: low flood; dotted: burst)", fontsize=7)


def render(found: dict, t0: float, timeline: dict, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def figure(title: str, titles: list[str], path: Path) -> None:
        cols = 3 if len(titles) > 2 else len(titles)
        rows = (len(titles) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.4 * rows), squeeze=False)
        for ax, name in zip(axes.flat, titles):
            draw_panel(ax, name, found[name], t0, timeline)
        for ax in list(axes.flat)[len(titles):]:
            ax.axis("off")
        fig.suptitle(title, fontsize=11)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    for i, (row, panels) in enumerate(dashboard_rows(), 1):
        slug = re.sub(r"[^a-z0-9]+", "-", row.lower().split("(")[0]).strip("-") or "panels"
        figure(f"llm-serving / {row}", [p["title"] for p in panels], out / f"row{i}-{slug}.png")
    figure("llm-serving: main panels", [t for t in OVERVIEW if t in found], out / "overview.png")
    return written


# --- main ----------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load-s", type=float, default=180.0, help="seconds of mixed load")
    parser.add_argument("--drain-s", type=float, default=20.0, help="then wait this long for admitted answers")
    parser.add_argument("--high-rps", type=float, default=1.5)
    parser.add_argument("--medium-rps", type=float, default=0.2)
    parser.add_argument("--low-rps", type=float, default=0.25)
    parser.add_argument("--low-words", type=int, default=2200)
    parser.add_argument("--burst", type=int, default=48, help="concurrent long-answer high chats at once")
    parser.add_argument("--client-timeout", type=float, default=300.0)
    parser.add_argument("--step-s", type=float, default=5.0, help="query_range step")
    parser.add_argument("--rate-interval", default="30s", help="$__rate_interval")
    parser.add_argument("--out", type=Path, default=Path("docs/bench/dashboards"))
    parser.add_argument("--replot", type=Path, help="no serving: a run's dashboard_png.json; Prometheus on its "
                                                    "kept TSDB, the same queries over the run's range, the PNGs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`, kill: still stop Ray below
    if args.replot:
        data = json.loads(args.replot.read_text())
        storage = Path(data["storage"])
        quiet = storage / "replot.yml"  # no scrape jobs: the kept TSDB stays the run's, whatever runs now
        quiet.write_text("global:\n  scrape_interval: 5s\n")
        prom = Prometheus(storage, quiet)
        try:
            prom.wait_ready()
            timeline, seen = data["timeline"], data["client_saw"]
            end = timeline["start"] + timeline["total_s"]
            found = query_panels(prom, timeline["start"] - 30, end, args.step_s, args.rate_interval)
        finally:
            prom.close()
        finish(found, timeline, seen, Path(data["storage"]), args)
        return

    from deployments.config.app_args import served_app_from_serve_config

    model = served_app_from_serve_config().args.primary.model_id
    cluster, prom = DeployedCluster(), None
    storage = Path(tempfile.mkdtemp(prefix="prometheus-bench-"))
    timeline: dict = {}
    t_run = time.monotonic()
    try:
        print(f"deployed in {cluster.start():.0f}s (ray start + serve deploy serve_config.yaml)", flush=True)
        prom = Prometheus(storage)
        prom.wait_scraping()
        wait_healthy()
        seen = asyncio.run(drive(model, args, timeline))
        print(f"load done ({time.monotonic() - t_run:.0f}s into the run); the client saw: {json.dumps(seen)}",
              flush=True)
        # Ray's report interval (10 s by default) then one scrape: the last values reach Prometheus.
        time.sleep(25)
        start, end = timeline["start"] - 30, time.time()
        timeline["total_s"] = end - timeline["start"]
        found = query_panels(prom, start, end, args.step_s, args.rate_interval)
    finally:
        try:
            if prom is not None:
                prom.close()
        finally:
            cluster.stop()
    finish(found, timeline, seen, storage, args)


def finish(found: dict, timeline: dict, seen: dict, storage: Path, args) -> None:
    written = render(found, timeline["start"], timeline, args.out)
    with_data = [t for t, e in found.items() if e["series"]]
    without = [t for t, e in found.items() if not e["series"]]
    print("\n| row | panel | series | data |\n|---|---|---|---|")
    for title, e in found.items():
        print(f"| {e['row']} | {title} | {len(e['series'])} | "
              f"{'yes' if e['series'] else 'NO' + (': ' + e['error'] if e['error'] else '')} |")
    print(f"\npanels with data: {len(with_data)} of {len(found)}; without: {without}")
    print("wrote " + ", ".join(str(p) for p in written))
    print(f"Prometheus's TSDB of this run is kept in {storage} (--replot {args.out / 'dashboard_png.json'})")
    (args.out / "dashboard_png.json").write_text(json.dumps({
        "args": {k: str(v) for k, v in vars(args).items()}, "client_saw": seen, "timeline": timeline,
        "storage": str(storage),
        "panels": {t: {"row": e["row"], "exprs": e["exprs"], "series": [s[0] for s in e["series"]],
                       "error": e["error"]} for t, e in found.items()},
        "with_data": with_data, "without_data": without}, indent=1))

if __name__ == "__main__":
    main()
