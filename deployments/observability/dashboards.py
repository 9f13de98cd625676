"""Grafana dashboards as code: ``python -m deployments.observability.dashboards`` writes them.

One dashboard, ``dashboards/llm-serving.json``, with a row each for the router's classes, the pools
and their replicas, the engines (vLLM's figures, as each LLM replica exports them: ``metrics.engine_series``), the GPUs and the
autoscaler; and the same JSON in a ConfigMap for Grafana's dashboard sidecar,
``k8s/dashboards-configmap.yaml``. Both are committed; tests/test_dashboards.py checks that they are
what this file generates, and tests/test_metrics_live.py that every expression names only metrics a
live scrape of the app has (the GPU panels: metrics the app defines, absent without GPUs).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from deployments.config.names import PRIORITY_CLASSES
from deployments.observability import metrics as m

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
DASHBOARD_PATH = HERE / "dashboards" / "llm-serving.json"
CONFIGMAP_PATH = REPO_ROOT / "k8s" / "dashboards-configmap.yaml"

DS = {"type": "prometheus", "uid": "${datasource}"}
R = "ray_llm_router_"
SEL = 'pool=~"$pool",class=~"$class"'
POOL = 'pool=~"$pool"'


def _q(name: str) -> str:
    return m.exported(name)


class _Layout:
    def __init__(self):
        self.panels: list[dict] = []
        self.y = 0
        self.x = 0
        self.next_id = 1

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def row(self, title: str) -> None:
        if self.x:
            self.y, self.x = self.y + 8, 0
        self.panels.append({"type": "row", "title": title, "id": self._id(), "collapsed": False,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.y += 1

    def panel(self, title: str, targets: list[tuple[str, str]], unit: str = "short", description: str = "",
              stack: bool = False) -> None:
        if self.x >= 24:
            self.y, self.x = self.y + 8, 0
        self.panels.append({
            "type": "timeseries", "title": title, "id": self._id(), "datasource": DS,
            "description": description,
            "gridPos": {"h": 8, "w": 8, "x": self.x, "y": self.y},
            "fieldConfig": {"defaults": {"unit": unit, "custom": {"stacking": {"mode": "normal" if stack else "none"}}},
                            "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
            "targets": [{"datasource": DS, "expr": expr, "legendFormat": legend, "refId": chr(ord("A") + i)}
                        for i, (expr, legend) in enumerate(targets)],
        })
        self.x += 8


def _quantile(q: float, name: str, by: str = "pool, class", sel: str = SEL) -> str:
    return f"histogram_quantile({q}, sum by ({by}, le) (rate({_q(name)}_bucket{{{sel}}}[$__rate_interval])))"


def dashboard() -> dict:
    d = _Layout()
    d.row("Router: per class")
    d.panel("Requests by outcome", [
        (f"sum by (class, outcome) (rate({_q(m.REQUESTS)}{{{SEL}}}[$__rate_interval]))", "{{class}} {{outcome}}")],
        "reqps", "Every request the router answered, by the status the client saw.", stack=True)
    d.panel("Rejections by reason", [
        (f'sum by (outcome, reason) (rate({_q(m.REQUESTS)}{{outcome!="200"}}[$__rate_interval]))',
         "{{outcome}} {{reason}}")],
        "reqps", "400/413 before a pool is chosen carry pool=\"none\"; 429/503/504 name the router's reason.",
        stack=True)
    d.panel("Served within the class SLO", [
        (f"sum by (class) (rate({_q(m.WITHIN_SLO)}{{{SEL}}}[$__rate_interval])) / "
         f'sum by (class) (rate({_q(m.REQUESTS)}{{{SEL},outcome=~"200|429|503|504"}}[$__rate_interval]))',
         "{{class}}")],
        "percentunit", "Requests that met TTFT and TPOT of their class, over requests served or refused for load.")
    d.panel("Goodput and output tokens", [
        (f"sum by (class) (rate({_q(m.GOODPUT_TOKENS)}{{{SEL}}}[$__rate_interval]))", "goodput {{class}}"),
        (f"sum by (class) (rate({_q(m.OUTPUT_TOKENS)}{{{SEL}}}[$__rate_interval]))", "output {{class}}"),
        (f"sum by (class) (rate({_q(m.WASTED_TOKENS)}{{{SEL}}}[$__rate_interval]))", "wasted {{class}}")],
        "short", "Tokens per second: all delivered, those within the SLO, and those generated for nobody.")
    d.panel("Prompt tokens", [
        (f"sum by (class) (rate({_q(m.PROMPT_TOKENS)}{{{SEL}}}[$__rate_interval]))", "{{class}}")], "short")
    d.panel("Time to first token (streams)", [
        (_quantile(0.5, m.TTFT), "p50 {{pool}} {{class}}"), (_quantile(0.99, m.TTFT), "p99 {{pool}} {{class}}")],
        "s")
    d.panel("Time per output token (streams)", [
        (_quantile(0.5, m.TPOT), "p50 {{pool}} {{class}}"), (_quantile(0.99, m.TPOT), "p99 {{pool}} {{class}}")],
        "s")
    d.panel("Queue wait", [
        (_quantile(0.5, m.QUEUE_WAIT), "p50 {{pool}} {{class}}"),
        (_quantile(0.99, m.QUEUE_WAIT), "p99 {{pool}} {{class}}")], "s")
    d.panel("Request duration (served)", [
        (_quantile(0.5, m.E2E), "p50 {{pool}} {{class}}"), (_quantile(0.99, m.E2E), "p99 {{pool}} {{class}}")], "s")

    d.row("Pools and replicas")
    d.panel("Queue depth", [(f"sum by (pool, class) ({_q(m.QUEUE_DEPTH)}{{{SEL}}})", "{{pool}} {{class}}")],
            "short", stack=True)
    d.panel("In flight and window", [
        (f"sum by (pool, class) ({_q(m.IN_FLIGHT)}{{{SEL}}})", "in flight {{pool}} {{class}}"),
        (f"max by (pool) ({_q(m.WINDOW)}{{{POOL}}})", "window per replica {{pool}}")], "short")
    d.panel("Circuit (0 closed, 1 half open, 2 open) and readiness", [
        (f"max by (pool) ({_q(m.CIRCUIT)}{{{POOL}}})", "circuit {{pool}}"),
        (f"min by (pool) ({_q(m.POOL_READY)}{{{POOL}}})", "ready {{pool}}")], "short")
    d.panel("Running LLM replicas", [
        (f"max by (pool) ({_q(m.REPLICAS)}{{{POOL}}})", "{{pool}}")], "short")
    d.panel("Replica starts (restarts)", [
        ("sum by (deployment) (increase(ray_serve_deployment_replica_starts_total[$__rate_interval]))",
         "{{deployment}}")], "short")
    d.panel("Unhealthy replicas", [
        ("sum by (deployment) (1 - ray_serve_deployment_replica_healthy)", "{{deployment}}")], "short")

    d.row("Engines (vLLM, as each LLM replica exports it)")
    d.panel("Running and waiting requests", [
        (f"sum by (pool, replica) ({_q(m.ENGINE_RUNNING)}{{{POOL}}})", "running {{pool}} {{replica}}"),
        (f"sum by (pool, replica) ({_q(m.ENGINE_WAITING)}{{{POOL}}})", "waiting {{pool}} {{replica}}")], "short")
    d.panel("KV-cache usage", [(f"max by (pool, replica) ({_q(m.ENGINE_KV_CACHE_USAGE)}{{{POOL}}})",
                                "{{pool}} {{replica}}")], "percentunit")
    d.panel("Engine TTFT", [(_quantile(q, m.ENGINE_TTFT, "pool", POOL), f"p{round(q * 100)} {{{{pool}}}}")
                            for q in (0.5, 0.99)], "s", "From a request's arrival at the engine to its first token.")
    d.panel("Engine inter-token latency", [
        (_quantile(q, m.ENGINE_STEP_ITL, "pool", POOL), f"p{round(q * 100)} {{{{pool}}}}") for q in (0.5, 0.99)],
        "s", "One value per decoding step (its mean over the streams in it), so quantiles weigh steps, not tokens.")
    d.panel("Engine tokens", [
        (f"sum by (pool) (rate({_q(m.ENGINE_PROMPT_TOKENS)}{{{POOL}}}[$__rate_interval]))", "prompt {{pool}}"),
        (f"sum by (pool) (rate({_q(m.ENGINE_GENERATION_TOKENS)}{{{POOL}}}[$__rate_interval]))",
         "generated {{pool}}")], "short")
    d.panel("Prefix-cache hit rate (prompt tokens found cached)", [
        # The hits counter has no series before the first hit (a Ray counter takes no 0): 0%, not "no data".
        (f"(sum by (pool) (rate({_q(m.ENGINE_PREFIX_CACHE_HITS)}{{{POOL}}}[$__rate_interval])) or "
         f"0 * sum by (pool) (rate({_q(m.ENGINE_PREFIX_CACHE_QUERIES)}{{{POOL}}}[$__rate_interval]))) / "
         f"sum by (pool) (rate({_q(m.ENGINE_PREFIX_CACHE_QUERIES)}{{{POOL}}}[$__rate_interval]))", "{{pool}}")],
            "percentunit")

    d.row("GPU (NVML, per replica's GPU group; no series without GPUs)")
    d.panel("GPU utilisation", [(f"max by (pool, replica) ({_q(m.GPU_UTILIZATION)}{{{POOL}}})",
                                 "{{pool}} {{replica}}")], "percentunit")
    d.panel("GPU memory used", [
        (f"sum by (pool, replica) ({_q(m.GPU_MEMORY_USED)}{{{POOL}}}) / "
         f"sum by (pool, replica) ({_q(m.GPU_MEMORY_TOTAL)}{{{POOL}}})", "{{pool}} {{replica}}")], "percentunit")

    d.row("Autoscaler")
    d.panel("Target vs running replicas", [
        (f"max by (pool) ({_q(m.AUTOSCALER_TARGET)}{{{POOL}}})", "target {{pool}}"),
        (f"max by (pool) ({_q(m.AUTOSCALER_CURRENT)}{{{POOL}}})", "current {{pool}}"),
        (f"max by (pool) ({_q(m.REPLICAS)}{{{POOL}}})", "running {{pool}}")], "short")
    d.panel("Signal behind the decision", [
        (f"max by (pool, signal) ({_q(m.AUTOSCALER_SIGNAL)}{{{POOL}}}) > 0", "{{pool}} {{signal}}")], "short",
        "1 while this signal drove the latest decision (queue, kv_cache, gpu, idle, bounds, hold).")

    variables = [
        {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"},
        {"name": "pool", "type": "query", "datasource": DS, "label": "pool", "includeAll": True, "multi": True,
         "query": {"query": f"label_values({_q(m.POOL_READY)}, pool)", "refId": "pool"},
         "current": {"text": "All", "value": "$__all"}, "refresh": 2, "allValue": ".*"},
        {"name": "class", "type": "custom", "label": "class", "includeAll": True, "multi": True,
         "query": ",".join(PRIORITY_CLASSES), "current": {"text": "All", "value": "$__all"}, "allValue": ".*",
         "options": [{"text": c, "value": c, "selected": False} for c in PRIORITY_CLASSES]},
    ]
    return {
        "uid": "llm-serving", "title": "LLM serving: router, pools, engines, GPUs, autoscaler",
        "tags": ["llm", "ray-serve", "vllm"], "timezone": "utc", "schemaVersion": 39, "version": 1,
        "editable": True, "refresh": "10s", "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": variables}, "annotations": {"list": []}, "panels": d.panels,
    }


def configmap(dashboard_json: str) -> dict:
    return {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "llm-serving-dashboards",
                     "labels": {"app.kubernetes.io/name": "llm-serving", "grafana_dashboard": "1"}},
        "data": {DASHBOARD_PATH.name: dashboard_json},
    }


def rendered() -> dict[Path, str]:
    text = json.dumps(dashboard(), indent=2) + "\n"
    header = ("# Generated by `python -m deployments.observability.dashboards`; do not edit.\n"
              "# Grafana's dashboard sidecar loads ConfigMaps labelled grafana_dashboard=1.\n")
    return {DASHBOARD_PATH: text,
            CONFIGMAP_PATH: header + yaml.safe_dump(configmap(text), sort_keys=False, width=1000)}


def main() -> None:
    for path, text in rendered().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
