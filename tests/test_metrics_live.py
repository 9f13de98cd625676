"""A real Prometheus scrapes the running app; the metrics it finds match the traffic this test sends.

Prometheus (Debian's package, scripts/install.sh) runs with the repository's own config
(deployments/observability/prometheus.yml) on a free port and a temporary storage directory, scraping
every Ray metrics port that Ray's service-discovery file lists. The test waits for Ray's metric
report interval and the scrape by polling Prometheus's HTTP API, bounded by those intervals, never
for a fixed time. The dashboards' expressions are checked against the same scrape.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from deployments.observability import metrics
from scripts.processes import spawn, stop
from tests.cluster import REPO_ROOT

CONFIG = REPO_ROOT / "deployments" / "observability" / "prometheus.yml"
DASHBOARDS = REPO_ROOT / "deployments" / "observability" / "dashboards"

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("prometheus") is None,
                                 reason="Debian's prometheus package is not installed (scripts/install.sh)")]


def _report_interval_s() -> float:
    """Ray's metric report interval (what the cluster runs with: the same default and variable)."""
    import ray

    return max(1.0, ray._config.metrics_report_interval_ms() / 1000)


def _scrape_interval_s() -> float:
    text = yaml.safe_load(CONFIG.read_text())["global"]["scrape_interval"]
    return float(text.rstrip("s"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Prometheus:
    def __init__(self, url: str):
        self.url = url

    def query(self, expr: str) -> list[tuple[dict, float]]:
        answer = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10).json()
        assert answer["status"] == "success", answer
        return [(item["metric"], float(item["value"][1])) for item in answer["data"]["result"]]

    def value(self, expr: str) -> float:
        """The one value of ``sum(expr)``; 0 where no series exists yet (a counter never incremented)."""
        found = self.query(f"sum({expr}) or vector(0)")
        return found[0][1] if found else 0.0

    def names(self) -> set[str]:
        answer = httpx.get(self.url + "/api/v1/label/__name__/values", timeout=10).json()
        return set(answer["data"])

    def wait(self, condition, timeout_s: float, what: str, every_s: float = 1.0):
        deadline = time.monotonic() + timeout_s
        while True:
            result = condition()
            if result is True or time.monotonic() > deadline:
                break
            time.sleep(every_s)
        assert result is True, f"{what} not seen within {timeout_s:.0f}s: {result}"


@pytest.fixture(scope="module")
def prometheus(deployed_cluster, tmp_path_factory):
    port, storage = _free_port(), tmp_path_factory.mktemp("prometheus")
    log = open(storage / "prometheus.log", "w")
    proc = spawn(["prometheus", f"--config.file={CONFIG}", f"--storage.tsdb.path={storage / 'data'}",
                  f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                 stdout=log, stderr=subprocess.STDOUT)
    prom = Prometheus(f"http://127.0.0.1:{port}")
    try:
        def scraping():
            if proc.poll() is not None:
                raise RuntimeError(f"prometheus exited {proc.returncode}: {(storage / 'prometheus.log').read_text()}")
            try:
                ups = prom.query('up{job="ray"}')
            except (httpx.TransportError, ValueError, KeyError):
                return "Prometheus not answering yet"
            # Some Ray target scraped: the series the tests need then come within their own settle times.
            # Not every target: Ray's service discovery may list one that is not (yet) up; once one stayed
            # down for the whole wait (run 1 of 2026-12-01) and failed the fixture. Each test waits for
            # the series it reads, so a target that matters and stays down still fails, by name.
            return any(v == 1 for _, v in ups) or f"targets {ups}"
        prom.wait(scraping, 30 + 2 * _scrape_interval_s(), "Prometheus scraping a Ray target")
        yield prom
    finally:
        stop(proc, escalation=((15, 10.0), (9, 5.0)))  # SIGTERM, then SIGKILL
        log.close()


def _counters(prom: Prometheus, queries: dict[str, str]) -> dict[str, float]:
    return {name: prom.value(expr) for name, expr in queries.items()}


R = "ray_llm_router_"
MAIN_HIGH = 'pool="main",class="high"'
QUERIES = {
    "400": f'{R}requests_total{{outcome="400"}}',
    "413": f'{R}requests_total{{outcome="413"}}',
    "timeout_too_short": f'{R}requests_total{{outcome="400",{MAIN_HIGH},reason="client_timeout_too_short"}}',
    "served": f'{R}requests_total{{outcome="200",{MAIN_HIGH},reason="ok"}}',
    "gone": f'{R}requests_total{{outcome="499",{MAIN_HIGH},reason="client_gone"}}',
    "prompt_tokens": f"{R}prompt_tokens_total{{{MAIN_HIGH}}}",
    "output_tokens": f"{R}output_tokens_total{{{MAIN_HIGH}}}",
    "goodput_tokens": f"{R}goodput_tokens_total{{{MAIN_HIGH}}}",
    "within_slo": f"{R}requests_within_slo_total{{{MAIN_HIGH}}}",
    "wasted_tokens": f"{R}wasted_engine_tokens_total{{{MAIN_HIGH}}}",
    "queue_wait": f"{R}queue_wait_seconds_count{{{MAIN_HIGH}}}",
    "ttft": f"{R}ttft_seconds_count{{{MAIN_HIGH}}}",
    "tpot": f"{R}time_per_output_token_seconds_count{{{MAIN_HIGH}}}",
    "e2e": f"{R}request_seconds_count{{{MAIN_HIGH}}}",
    # The LLM replica's own export of its engine (log_engine_metrics is off in every profile).
    "engine_prompt_tokens": metrics.exported(metrics.ENGINE_PROMPT_TOKENS) + '{pool="main"}',
    "engine_generation_tokens": metrics.exported(metrics.ENGINE_GENERATION_TOKENS) + '{pool="main"}',
    "engine_ttft": metrics.exported(metrics.ENGINE_TTFT) + '_count{pool="main"}',
    "engine_step_itl": metrics.exported(metrics.ENGINE_STEP_ITL) + '_count{pool="main"}',
}


def test_prometheus_sees_what_the_traffic_caused(prometheus, base_url, model_id, client: openai.OpenAI):
    report_s, scrape_s = _report_interval_s(), _scrape_interval_s()
    settle_s = 2 * report_s + 2 * scrape_s + 10  # a value recorded now is exported, then scraped, by then

    # The same long prompt twice: the second finds its prefix in the engine's cache (a hit the dashboard's
    # prefix-cache panel shows). Sent before the baseline, so the per-class counts below are unaffected.
    shared = [{"role": "user", "content": "Count the colours in this list. " + "red green blue " * 100}]
    for _ in range(2):
        client.chat.completions.create(model=model_id, messages=shared, max_tokens=1)

    # Baseline: earlier tests' requests were all recorded before now; wait for a scrape that
    # follows their export (one report interval), then read every counter.
    since = time.time() + report_s + 1
    def scraped_since():
        stamps = [v for _, v in prometheus.query('timestamp(up{job="ray"})')]
        return bool(stamps) and min(stamps) > since or f"last scrapes at {stamps}, want after {since:.0f}"

    prometheus.wait(scraped_since, settle_s, "a scrape after one report interval")
    before = _counters(prometheus, QUERIES)

    seen = {"400": 0, "413": 0, "timeout_too_short": 0, "served": 0, "gone": 0}
    prompt_tokens = output_tokens = 0
    chat = lambda **kw: client.chat.completions.with_raw_response.create(model=model_id, **kw)  # noqa: E731
    hello = [{"role": "user", "content": "Name a colour."}]

    # 400s: no messages; a temperature out of range; an unknown X-Priority class;
    # 413: a body beyond max_request_bytes.
    for kwargs in ({"messages": []}, {"messages": hello, "temperature": 9.0},
                   {"messages": hello, "extra_headers": {"X-Priority": "urgent"}}):
        with pytest.raises(openai.BadRequestError):
            chat(max_tokens=2, **kwargs)
        seen["400"] += 1
    with pytest.raises(openai.APIStatusError) as too_large:
        chat(messages=[{"role": "user", "content": "x" * (4 * 1024 * 1024 + 1)}], max_tokens=2)
    assert too_large.value.status_code == 413
    seen["413"] += 1
    # A client timeout no generation of 1000 tokens could meet even alone: 400 before any engine work,
    # counted by its pool and class (it was planned) and among the 400s.
    for _ in range(2):
        with pytest.raises(openai.BadRequestError):
            chat(messages=hello, max_tokens=1000, extra_headers={"X-Request-Timeout": "2"})
        seen["timeout_too_short"] += 1
        seen["400"] += 1
    # Served whole answers, then streams that ask for their usage.
    for _ in range(3):
        raw = chat(messages=hello, max_tokens=6)
        reply = raw.parse()
        prompt_tokens += int(raw.headers["x-prompt-tokens"])
        output_tokens += reply.usage.completion_tokens
        seen["served"] += 1
    streams_past_one_token = 0  # time per output token needs a second token
    for _ in range(2):
        raw = chat(messages=hello, max_tokens=6, stream=True, stream_options={"include_usage": True})
        prompt_tokens += int(raw.headers["x-prompt-tokens"])
        usage = [chunk.usage for chunk in raw.parse() if chunk.usage is not None]
        output_tokens += usage[-1].completion_tokens
        streams_past_one_token += usage[-1].completion_tokens > 1
        seen["served"] += 1
    # A stream the client leaves after a few tokens: 499, its tokens so far wasted engine work.
    body = {"model": model_id, "messages": hello, "max_tokens": 400, "stream": True}
    received = 0
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        prompt_tokens += int(r.headers["x-prompt-tokens"])
        for line in r.iter_lines():
            if line.startswith("data: {") and '"content":"' in line.replace(" ", "") and '"role"' not in line:
                received += 1
                if received >= 3:
                    break
    seen["gone"] += 1

    expected = {
        "400": seen["400"], "413": seen["413"], "timeout_too_short": seen["timeout_too_short"],
        "served": seen["served"], "gone": seen["gone"],
        "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
        "queue_wait": seen["served"] + seen["gone"],  # every request that took a slot
        "ttft": 2, "tpot": streams_past_one_token,  # the served streams
        "e2e": seen["served"],
    }

    def matches():
        now = _counters(prometheus, QUERIES)
        delta = {name: now[name] - before[name] for name in now}
        wrong = {name: (delta[name], want) for name, want in expected.items() if delta[name] != want}
        if delta["wasted_tokens"] < received:
            wrong["wasted_tokens"] = (delta["wasted_tokens"], f">= {received}")
        if not 0 <= delta["goodput_tokens"] <= delta["output_tokens"]:
            wrong["goodput_tokens"] = (delta["goodput_tokens"], f"0..{delta['output_tokens']}")
        if not 0 <= delta["within_slo"] <= seen["served"]:
            wrong["within_slo"] = (delta["within_slo"], f"0..{seen['served']}")
        # The engine's own counts: everything the router sent, and more (the router's probes, a stream
        # generating on past the point its client left).
        for name, at_least in (("engine_prompt_tokens", prompt_tokens), ("engine_generation_tokens", output_tokens),
                               ("engine_ttft", seen["served"] + seen["gone"]), ("engine_step_itl", 1)):
            if delta[name] < at_least:
                wrong[name] = (delta[name], f">= {at_least}")
        return not wrong or wrong

    prometheus.wait(matches, settle_s + 10, "the counters' deltas matching the traffic")

    # Gauges of the pool (set every router poll) and of the autoscaling policy.
    def gauges():
        wrong = {}
        for expr, ok in (
            (f'{R}queue_depth{{{MAIN_HIGH}}}', lambda v: v == 0),
            (f'{R}in_flight{{{MAIN_HIGH}}}', lambda v: v == 0),
            (f'{R}window_per_replica{{pool="main"}}', lambda v: v >= 1),
            (f'{R}circuit_state{{pool="main"}}', lambda v: v == 0),
            (f'{R}pool_ready{{pool="main"}}', lambda v: v == 1),
            (f'{R}pool_running_replicas{{pool="main"}}', lambda v: v >= 1),
            ('ray_llm_autoscaling_target_replicas{pool="main"}', lambda v: v >= 1),
            ('ray_llm_autoscaling_current_replicas{pool="main"}', lambda v: v >= 1),
            ('ray_llm_autoscaling_signal{pool="main"}', lambda v: v == 1),  # one-hot
            # The LLM replica's engine gauges (exported every ENGINE_EXPORT_S, whatever the load).
            (metrics.exported(metrics.ENGINE_RUNNING) + '{pool="main"}', lambda v: v >= 0),
            (metrics.exported(metrics.ENGINE_WAITING) + '{pool="main"}', lambda v: v >= 0),
            (metrics.exported(metrics.ENGINE_KV_CACHE_USAGE) + '{pool="main"}', lambda v: 0 <= v <= 1),
            (metrics.exported(metrics.ENGINE_PREFIX_CACHE_HITS) + '{pool="main"}', lambda v: v > 0),
        ):
            found = prometheus.query(f"sum({expr})")
            if not found or not ok(found[0][1]):
                wrong[expr] = found
        return not wrong or wrong

    prometheus.wait(gauges, settle_s, "the pool's and the policy's gauges")

    # NVML gauges exist only with GPUs: on a machine without any, no series at all (never a zero).
    from deployments.autoscaling.gpu import device_uuids

    if not device_uuids():
        for name in metrics.GPU_GAUGES:
            assert prometheus.query(metrics.exported(name)) == [], name


# --- dashboards: every expression names only metrics this scrape has -----------------------------

_FUNCTIONS_AND_KEYWORDS = {
    "sum", "rate", "irate", "increase", "histogram_quantile", "by", "without", "max", "min", "avg", "count",
    "clamp_min", "clamp_max", "vector", "or", "and", "unless", "on", "ignoring", "group_left", "group_right",
    "topk", "bottomk", "abs", "time", "timestamp", "label_replace", "delta", "deriv", "avg_over_time",
    "max_over_time", "min_over_time", "sum_over_time", "changes", "resets", "offset", "bool", "le", "inf",
    "nan", "scalar", "absent", "round", "sort", "sort_desc",
}


def dashboard_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers outside label matchers, {} and [] ranges,
    that are not functions, keywords or grouping labels."""
    stripped = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    stripped = re.sub(r"\[[^\]]*\]", "", stripped)  # ranges
    stripped = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", stripped)
    stripped = re.sub(r'"[^"]*"', "", stripped)
    names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", stripped))
    return {n for n in names if n.lower() not in _FUNCTIONS_AND_KEYWORDS and not re.fullmatch(r"\d+[smhd]?", n)}


def dashboard_expressions() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expression) for every target of every dashboard."""
    found = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                found.append((path.name, panel.get("title", ""), target["expr"]))
    return found


def test_dashboards_name_only_metrics_the_scrape_has(prometheus):
    expressions = dashboard_expressions()
    assert len(expressions) >= 10, "no dashboards found"
    gpu = {metrics.exported(name) for name in metrics.GPU_GAUGES}
    scraped = prometheus.names()
    missing = []
    for file, title, expr in expressions:
        for name in dashboard_metric_names(expr):
            if name in scraped or name in gpu:
                continue
            missing.append((file, title, name))
    assert not missing, missing
