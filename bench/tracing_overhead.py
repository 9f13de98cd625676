"""TTFT with the router's OpenTelemetry exporter off and on, side by side on the live app.

Deploys this app (bench/priority_flood.deploy's way: ``build_app_with_router`` with the profile's
engine and serve_config.yaml's router settings, ``serve.run``), then alternates two modes of the
Router deployment in short phases (off, on, off, on, ...) within one run, so that the machine's noise
falls on both:

- **off**: the router's environment has no ``OTEL_*`` variable (the default): the OpenTelemetry
  API's no-op tracer answers (deployments/observability/tracing.py);
- **on**: ``OTEL_EXPORTER_OTLP_ENDPOINT`` (the Router's ``ray_actor_options.runtime_env.env_vars``)
  points at an OTLP/HTTP sink this script runs (a thread answering 200 to ``POST /v1/traces``, which
  decodes every request and counts the spans and bytes it got): the SDK records every span of every
  request and its batch processor really exports them.

A mode switch redeploys the app with only the Router's actor options changed. Every deployment gets
one fixed code version for the run, so Serve restarts only the router replica (its actor options
changed) and the vLLM engine keeps running: the phases measure the same engine.

In every phase a fixed number of closed-loop clients send streamed one-sentence chats (the high
class); after a switch a few warm-up requests are sent and dropped. Reports per mode (all its phases
together) and per phase: TTFT p50/p99 measured by the client (first content chunk), output tok/s,
the ratio on/off of TTFT p50 and p99, and the spans the sink received in each phase (proof the
exporter was on, and only then). Writes ``tracing_overhead.json`` and ``tracing_overhead.png``.

    flock /tmp/port8000.lock .venv/bin/python bench/tracing_overhead.py --out docs/bench/tracing
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import signal
import sys
import threading
import time
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.priority_flood import BASE_URL, Result, one_request, percentile, short_chat  # noqa: E402
from deployments.observability.tracing import REPLICA_FIRST_OUTPUT as REPLICA_SPAN  # noqa: E402
from deployments.observability.tracing import SERVE_REQUEST_ID  # noqa: E402


# --- an OTLP/HTTP sink ------------------------------------------------------------------------------

class Sink:
    """Answers 200 to ``POST /v1/traces`` (OTLP/HTTP, protobuf or JSON) and counts what it received."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = self.spans = self.bytes = 0
        self.span_names: dict[str, int] = {}
        self.durations_ms: dict[str, list[float]] = {}
        self.traces: dict[str, dict[str, int]] = {}  # trace id -> span name -> start ns; "first_token" -> ns
        self.request_traces: dict[str, str] = {}  # Serve request id -> the router's trace id
        self.replica_spans: dict[str, tuple[int, int]] = {}  # Serve request id -> LLM replica span (start, end)
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path.rstrip("/") != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                sink.record(body, self.headers.get("Content-Type", ""), self.headers.get("Content-Encoding", ""))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def record(self, body: bytes, content_type: str, encoding: str) -> None:
        raw_len = len(body)
        if encoding == "gzip":
            body = gzip.decompress(body)
        spans: list[tuple] = []  # (name, trace id, start ns, end ns, {event name: ns}, Serve request id)
        try:
            if "json" in content_type:
                data = json.loads(body)
                for rs in data.get("resourceSpans", []):
                    for ss in rs.get("scopeSpans", []):
                        spans += [(s.get("name", ""), s.get("traceId", ""), int(s.get("startTimeUnixNano", 0)),
                                   int(s.get("endTimeUnixNano", 0)),
                                   {e.get("name", ""): int(e.get("timeUnixNano", 0)) for e in s.get("events", [])},
                                   next((a.get("value", {}).get("stringValue", "") for a in s.get("attributes", [])
                                         if a.get("key") == SERVE_REQUEST_ID), ""))
                                  for s in ss.get("spans", [])]
            else:
                from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                for rs in request.resource_spans:
                    for ss in rs.scope_spans:
                        spans += [(s.name, s.trace_id.hex(), s.start_time_unix_nano, s.end_time_unix_nano,
                                   {e.name: e.time_unix_nano for e in s.events},
                                   next((a.value.string_value for a in s.attributes if a.key == SERVE_REQUEST_ID), ""))
                                  for s in ss.spans]
        except Exception:  # counted as a request and bytes; spans unknown
            pass
        with self.lock:
            self.requests += 1
            self.bytes += raw_len
            self.spans += len(spans)
            for name, trace_id, start, end, events, request_id in spans:
                self.span_names[name] = self.span_names.get(name, 0) + 1
                self.durations_ms.setdefault(name, []).append((end - start) / 1e6)
                if name == REPLICA_SPAN:  # a root of its own trace in the LLM replica: joined by request id
                    if request_id:
                        self.replica_spans[request_id] = (start, end)
                    continue
                if name == "llm.request" and request_id:
                    self.request_traces[request_id] = trace_id
                timeline = self.traces.setdefault(trace_id, {})
                timeline[name] = start
                if "first_token" in events:
                    timeline["first_token"] = events["first_token"]

    def counts(self) -> dict:
        with self.lock:
            return {"requests": self.requests, "spans": self.spans, "bytes": self.bytes,
                    "span_names": dict(self.span_names)}

    def breakdown(self) -> dict:
        """Where a request's time went in the app, from the spans received: per span name its duration
        p50 / p90 (ms), and over traces with a first token, the time from the request span's start to it
        (``request_to_first_token``) and from the replica call's start to it (``replica_call_to_first_token``:
        the Serve handle call, the LLM replica's own work and the engine's prefill). Where the LLM replica
        exported its span too (joined by Serve's request id), that last one in three: ``hop_in`` (the
        router's handle call until the stream reaches the LLM replica), ``replica_to_first_output`` (chat
        template, tokenisation, the engine's queue and prefill) and ``hop_back`` (the first output until the
        router holds it). All on one host's clock."""
        with self.lock:
            durations = {name: list(values) for name, values in self.durations_ms.items()}
            for request_id, trace_id in self.request_traces.items():  # the LLM replica's span, joined
                if request_id in self.replica_spans and trace_id in self.traces:
                    start, end = self.replica_spans[request_id]
                    self.traces[trace_id].update({"replica_start": start, "replica_first_output": end})
            traces = [dict(t) for t in self.traces.values()]
        pct = lambda values, q: sorted(values)[min(len(values) - 1, int(q / 100 * len(values)))]  # noqa: E731
        out = {name: {"n": len(v), "p50_ms": pct(v, 50), "p90_ms": pct(v, 90)} for name, v in durations.items() if v}
        # A stream's TTFT inside the app, in the order it happens; the last three need the LLM replica's span.
        for label, since, until in (("request_to_first_token", "llm.request", "first_token"),
                                    ("replica_call_to_first_token", "router.replica_call", "first_token"),
                                    ("hop_in", "router.replica_call", "replica_start"),
                                    ("replica_to_first_output", "replica_start", "replica_first_output"),
                                    ("hop_back", "replica_first_output", "first_token")):
            values = [(t[until] - t[since]) / 1e6 for t in traces if until in t and since in t]
            if values:
                out[label] = {"n": len(values), "p50_ms": pct(values, 50), "p90_ms": pct(values, 90)}
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- deploying the app with the router's exporter off or on -----------------------------------------

APP = "bench"


def fixed_code_version() -> None:
    """One code version for every deployment of this run (Serve gives a random one per ``serve.run``
    otherwise, and restarts every replica, the engines included). A redeploy then restarts only the
    replicas whose actor options changed: the router's, when its environment changes."""
    import ray.serve._private.client as client

    client.get_random_string = lambda *a, **k: "tracing-overhead-bench"


def build(args, env_vars: dict[str, str]):
    import copy

    from deployments.app import build_app_with_router
    from deployments.config.app_args import AppArgs, load_serve_config, router_entry

    config_app = copy.deepcopy(load_serve_config()["applications"][0])
    app_args = config_app["args"]
    app_args["profile"] = args.profile
    app = build_app_with_router(app_args, router_entry(config_app)["user_config"])
    router = app._bound_deployment
    options = dict(router.ray_actor_options or {})
    if env_vars:
        options["runtime_env"] = {"env_vars": env_vars}
    app._bound_deployment = router.options(ray_actor_options=options)
    return app, AppArgs.model_validate(app_args).primary.model_id


def deploy(args, mode: str, sink: Sink) -> str:
    from ray import serve

    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": sink.url, "OTEL_SERVICE_NAME": "llm-router-bench"} if mode == "on" else {}
    app, model = build(args, env)
    serve.run(app, name=APP, route_prefix="/", blocking=False)
    body = {"model": model, "messages": short_chat(0), "max_tokens": 2}
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = serve.status().applications.get(APP)
        router = status.deployments.get("Router") if status else None
        # The new router replica only: no other replica starting or stopping.
        if status and status.status == "RUNNING" and router and set(router.replica_states) == {"RUNNING"} \
                and router.replica_states["RUNNING"] == 1:
            try:
                if httpx.post(BASE_URL + "/v1/chat/completions", json=body, timeout=30).status_code == 200:
                    return model
            except httpx.HTTPError:
                pass
        time.sleep(1)
    raise TimeoutError(f"app not ready in mode {mode}")


def replica_actors() -> dict[str, str]:
    """Serve replica actors alive now: name -> actor id (the engine's must not change between phases)."""
    import ray

    found = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["name"].startswith("SERVE_REPLICA"):
            try:
                found[entry["name"]] = ray.get_actor(entry["name"], namespace=entry["namespace"])._actor_id.hex()
            except ValueError:  # gone meanwhile
                pass
    return found


# --- load ------------------------------------------------------------------------------------------

async def run_phase(mode: str, phase: int, model: str, args) -> list[Result]:
    body = lambda i: {"model": model, "messages": short_chat(i), "max_tokens": args.max_tokens,  # noqa: E731
                      "stream": True, "stream_options": {"include_usage": True}, "temperature": 0}
    async with httpx.AsyncClient(base_url=BASE_URL, timeout=args.client_timeout) as client:
        for i in range(args.warmup):  # a fresh router's first requests: dropped
            await one_request(client, mode, "warmup", "high", body(i), time.monotonic())
        start = time.monotonic()
        results: list[Result] = []

        async def worker(w: int):
            i = 0
            while time.monotonic() - start < args.phase_s:
                results.append(await one_request(client, mode, str(phase), "high", body(w * 1000 + i), start))
                i += 1

        await asyncio.gather(*(worker(w) for w in range(args.concurrency)))
        return results


def stats(rs: list[Result]) -> dict:
    ttfts = [r.ttft_s for r in rs if r.status == 200 and r.ttft_s is not None]
    span = (max(r.done_at for r in rs) - min(r.sent_at for r in rs)) if rs else 0.0
    return {"requests": len(rs), "ok": sum(r.status == 200 for r in rs),
            "errors": sum(r.status != 200 for r in rs),
            "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
            "ttft_mean_s": sum(ttfts) / len(ttfts) if ttfts else None,
            "out_tok_s": sum(r.output_tokens for r in rs) / span if span else 0.0}


def summarise(results: list[Result], rows: list[dict]) -> dict:
    """Per mode, all its phases together: TTFT percentiles over every request; output tok/s as the
    phases' tokens over the phases' durations (each phase's clock starts at zero)."""
    summary = {}
    for mode in ("off", "on"):
        summary[mode] = stats([r for r in results if r.target == mode])
        spans = []
        for phase in {r.phase for r in results if r.target == mode}:
            rs = [r for r in results if r.target == mode and r.phase == phase]
            spans.append((sum(r.output_tokens for r in rs), max(r.done_at for r in rs) - min(r.sent_at for r in rs)))
        summary[mode]["out_tok_s"] = sum(t for t, _ in spans) / sum(d for _, d in spans) if spans else 0.0
        summary[mode]["spans"] = sum(r["spans"] for r in rows if r["mode"] == mode)
    ratio = lambda k: summary["on"][k] / summary["off"][k] if summary["on"][k] and summary["off"][k] else None  # noqa: E731
    summary["ratio_on_off_ttft_p50"] = ratio("ttft_p50_s")
    summary["ratio_on_off_ttft_p99"] = ratio("ttft_p99_s")
    summary["ratio_on_off_out_tok_s"] = ratio("out_tok_s")
    return summary


def table(rows: list[dict]) -> str:
    fmt = lambda v: "-" if v is None else f"{v * 1000:.0f}"  # noqa: E731
    lines = ["| phase | mode | requests | errors | TTFT p50 ms | TTFT p99 ms | out tok/s | spans to sink |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['phase']} | {r['mode']} | {r['requests']} | {r['errors']} | {fmt(r['ttft_p50_s'])} | "
                     f"{fmt(r['ttft_p99_s'])} | {r['out_tok_s']:.1f} | {r['spans']} |")
    return "\n".join(lines)


def plot(results: list[Result], rows: list[dict], summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"off": "tab:blue", "on": "tab:orange"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for mode in ("off", "on"):
        ttfts = sorted(r.ttft_s * 1000 for r in results if r.target == mode and r.ttft_s is not None
                       and r.status == 200)
        if ttfts:
            ax1.plot(ttfts, [(i + 1) / len(ttfts) for i in range(len(ttfts))], c=colours[mode],
                     label=f"tracing {mode}: p50 {summary[mode]['ttft_p50_s'] * 1000:.0f} ms, "
                           f"p99 {summary[mode]['ttft_p99_s'] * 1000:.0f} ms (n={len(ttfts)})")
    ax1.set_xscale("log")
    ax1.set_xlabel("time to first token (ms, log), client side")
    ax1.set_ylabel("fraction of requests")
    ax1.set_title("TTFT distribution, all phases of each mode")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8, loc="lower right")
    xs = list(range(len(rows)))
    ax2.bar([x - 0.2 for x in xs], [r["ttft_p50_s"] * 1000 for r in rows], width=0.4,
            color=[colours[r["mode"]] for r in rows], label="p50")
    ax2.bar([x + 0.2 for x in xs], [r["ttft_p99_s"] * 1000 for r in rows], width=0.4,
            color=[colours[r["mode"]] for r in rows], alpha=0.45, hatch="//", label="p99")
    ax2.set_xticks(xs, [f"{r['phase']}\n{r['mode']}\n{r['spans']} spans" for r in rows], fontsize=8)
    ax2.set_ylabel("TTFT (ms)")
    ratio = summary["ratio_on_off_ttft_p50"]
    ax2.set_title("per phase, in run order" + (f" (ratio on/off p50 {ratio:.2f})" if ratio is not None else ""))
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(rows: list[dict], summary: dict) -> None:
    print(table(rows))
    print()
    print("| mode | requests | errors | TTFT p50 ms | TTFT p99 ms | out tok/s | spans to sink |")
    print("|---|---|---|---|---|---|---|")
    for mode in ("off", "on"):
        s = summary[mode]
        if s["ttft_p50_s"] is None:  # no phase of this mode (--replica-spans runs "on" only)
            continue
        print(f"| {mode} | {s['requests']} | {s['errors']} | {s['ttft_p50_s'] * 1000:.0f} | "
              f"{s['ttft_p99_s'] * 1000:.0f} | {s['out_tok_s']:.1f} | {s['spans']} |")
    if summary["ratio_on_off_ttft_p50"] is not None:
        print(f"ratio on/off TTFT p50: {summary['ratio_on_off_ttft_p50']:.3f}; p99: "
              f"{summary['ratio_on_off_ttft_p99']:.3f}; out tok/s: {summary['ratio_on_off_out_tok_s']:.3f}")
    print(f"sink received {summary['sink']['spans']} spans in {summary['sink']['requests']} exports "
          f"({summary['sink']['bytes']} bytes): {summary['sink']['span_names']}")
    print(f"same engine actor in every phase: {summary['engine_kept']}")
    if summary.get("breakdown"):
        print()
        print("| span (tracing on) | n | p50 ms | p90 ms |")
        print("|---|---|---|---|")
        for name, b in sorted(summary["breakdown"].items()):
            print(f"| {name} | {b['n']} | {b['p50_ms']:.1f} | {b['p90_ms']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="embedded-cpu")
    parser.add_argument("--modes", default="off,on,off,on,off,on", help="phases in run order")
    parser.add_argument("--phase-s", type=float, default=30.0, help="seconds each phase sends for")
    parser.add_argument("--concurrency", type=int, default=2, help="closed-loop clients")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=4, help="requests dropped after each switch")
    parser.add_argument("--client-timeout", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=Path("docs/bench/tracing"))
    parser.add_argument("--from-json", type=Path, help="no serving: recompute the summary and plot of a run's JSON")
    parser.add_argument("--replica-spans", action="store_true",
                        help="the LLM replicas export their span too (the whole cluster gets the sink's OTEL_* "
                             "variables, so only --modes on); splits the replica call in the breakdown")
    args = parser.parse_args()
    if args.replica_spans and set(args.modes.split(",")) != {"on"}:
        parser.error("--replica-spans: every phase has tracing on (--modes on[,on...])")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        results = [Result(**r) for r in data["results"]]
        summary = {**data["summary"], **summarise(results, data["phases"])}
        report(data["phases"], summary)
        data["summary"] = summary
        (args.out / "tracing_overhead.json").write_text(json.dumps(data, indent=1))
        (args.out / "tracing_overhead.md").write_text(table(data["phases"]) + "\n")
        plot(results, data["phases"], summary, args.out / "tracing_overhead.png")
        return
    for name in [n for n in os.environ if n.startswith("OTEL_")]:
        os.environ.pop(name)  # "off" is the default: no OTEL_* anywhere (workers inherit this environment)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`, kill: still stop Ray below
    import ray
    from ray import serve

    sink = Sink()
    if args.replica_spans:  # before Ray starts: every worker, the LLM replicas' too, inherits it
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = sink.url
    fixed_code_version()
    ray.init(include_dashboard=False, num_cpus=max(4, os.cpu_count() or 1))
    results: list[Result] = []
    rows: list[dict] = []
    engines: list[dict[str, str]] = []
    t0 = time.monotonic()
    try:
        for phase, mode in enumerate(args.modes.split(","), 1):
            t_switch = time.monotonic()
            model = deploy(args, mode, sink)
            engines.append({name: aid for name, aid in replica_actors().items() if "Router" not in name})
            print(f"phase {phase}: tracing {mode} (router ready in {time.monotonic() - t_switch:.0f}s, "
                  f"{time.monotonic() - t0:.0f}s into the run); other replicas {engines[-1]}", flush=True)
            before = sink.counts()
            got = asyncio.run(run_phase(mode, phase, model, args))
            time.sleep(6)  # the batch processor exports every 5 s: this phase's spans reach the sink
            after = sink.counts()
            results += got
            row = {"phase": phase, "mode": mode, **stats(got), "spans": after["spans"] - before["spans"],
                   "export_requests": after["requests"] - before["requests"],
                   "bytes": after["bytes"] - before["bytes"]}
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            sink.close()

    summary = summarise(results, rows)
    summary["engine_kept"] = len({tuple(sorted(e.items())) for e in engines}) == 1
    summary["sink"] = sink.counts()
    summary["breakdown"] = sink.breakdown()

    (args.out / "tracing_overhead.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "phases": rows, "summary": summary,
         "engine_actors": engines, "results": [asdict(r) for r in results]}, indent=1))
    report(rows, summary)
    (args.out / "tracing_overhead.md").write_text(table(rows) + "\n")
    plot(results, rows, summary, args.out / "tracing_overhead.png")


if __name__ == "__main__":
    main()
