"""Dashboards as code: the committed JSON and ConfigMap are what the generator writes, and well formed.
(That every expression names only metrics a live scrape has: tests/test_metrics_live.py.)"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml

from deployments.observability import dashboards
from deployments.observability.dashboards import CONFIGMAP_PATH, DASHBOARD_PATH

ROWS = ("Router", "Pools and replicas", "Engines", "GPU", "Autoscaler")


def test_committed_files_are_generated():
    for path, text in dashboards.rendered().items():
        assert path.read_text() == text, f"{path} is stale: run python -m deployments.observability.dashboards"


def test_dashboard_rows_and_panels():
    board = json.loads(DASHBOARD_PATH.read_text())
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert [any(r.startswith(want) for r in rows) for want in ROWS] == [True] * len(ROWS), rows
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for panel in board["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps another panel"
                cells.add((x, y))
        if panel["type"] != "row":
            assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"])
            assert panel["datasource"]["uid"] == "${datasource}"
    assert {v["name"] for v in board["templating"]["list"]} == {"datasource", "pool", "class"}


def test_configmap_carries_the_dashboard():
    text = CONFIGMAP_PATH.read_text()
    cm = yaml.safe_load(text)
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"][DASHBOARD_PATH.name]) == json.loads(DASHBOARD_PATH.read_text())


def test_shipped_prometheus_config_is_valid():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian's prometheus package; scripts/install.sh)")
    config = dashboards.HERE / "prometheus.yml"
    checked = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
