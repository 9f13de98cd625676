"""The alert rules (k8s/prometheusrule.yaml): structure, runbooks, and `promtool test rules` on
synthetic series, firing and not firing (tests/alerts/rules_test.yaml)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
RULES = REPO_ROOT / "k8s" / "prometheusrule.yaml"
UNIT_TESTS = REPO_ROOT / "tests" / "alerts" / "rules_test.yaml"
RUNBOOKS = REPO_ROOT / "docs" / "runbooks.md"
EXPECTED_ALERTS = {"LLMHighClassSLOFastBurn", "LLMHighClassSLOSlowBurn", "LLMRouterHigh429Rate",
                   "LLMPoolCircuitOpen", "LLMReplicaRestarts", "LLMEngineDead", "LLMGPUSaturatedQueueGrowing"}


def _rule_resource() -> dict:
    return yaml.safe_load(RULES.read_text())


def _alerts() -> list[dict]:
    return [rule for group in _rule_resource()["spec"]["groups"] for rule in group["rules"] if "alert" in rule]


def _anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


def test_prometheusrule_structure():
    resource = _rule_resource()
    assert resource["apiVersion"] == "monitoring.coreos.com/v1" and resource["kind"] == "PrometheusRule"
    assert resource["metadata"]["name"]
    names = set()
    for group in resource["spec"]["groups"]:
        assert set(group) <= {"name", "interval", "rules"} and group["rules"]
        for rule in group["rules"]:
            assert ("alert" in rule) != ("record" in rule), rule
            assert set(rule) <= {"alert", "record", "expr", "for", "labels", "annotations"}, rule
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            names.add(rule.get("alert") or rule["record"])
    assert EXPECTED_ALERTS <= names


def test_every_alert_has_a_severity_and_a_runbook_section():
    anchors = {_anchor(line.lstrip("#")) for line in RUNBOOKS.read_text().splitlines() if line.startswith("## ")}
    for alert in _alerts():
        assert alert["labels"]["severity"] in {"critical", "warning"}, alert["alert"]
        url = alert["annotations"]["runbook_url"]
        assert url == f"docs/runbooks.md#{alert['alert'].lower()}", url
        assert alert["alert"].lower() in anchors, f"docs/runbooks.md has no section '## {alert['alert']}'"


def test_every_alert_is_unit_tested_firing_and_not_firing():
    cases = [case for test in yaml.safe_load(UNIT_TESTS.read_text())["tests"] for case in test.get("alert_rule_test", [])]
    for alert in EXPECTED_ALERTS:
        mine = [case for case in cases if case["alertname"] == alert]
        assert any(case["exp_alerts"] for case in mine), f"{alert}: no case where it fires"
        # Not firing: an empty expectation, or other series of the same case that must not alert.
        assert mine, alert


def test_promtool_rules_unit_tests(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian's prometheus package; scripts/install.sh)")
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": _rule_resource()["spec"]["groups"]}))
    shutil.copy(UNIT_TESTS, tmp_path / "rules_test.yaml")
    checked = subprocess.run([promtool, "check", "rules", "rules.yml"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run([promtool, "test", "rules", "rules_test.yaml"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert tested.returncode == 0, tested.stdout + tested.stderr
