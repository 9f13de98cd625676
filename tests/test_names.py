"""One contract for names (deployments/config/names.py): senders and readers use it, nothing respells it."""

from __future__ import annotations

import re
from pathlib import Path

from deployments.config import names
from deployments.config.layouts import ALL_CLASSES
from deployments.router.settings import ClassificationSettings, PriorityClass, QueueSettings
from sim.fleet import CLASSES as SIM_CLASSES

REPO_ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for folder in ("deployments", "sim") for p in (REPO_ROOT / folder).rglob("*.py")
           if p != REPO_ROOT / "deployments" / "config" / "names.py"]


def test_priority_classes_come_from_the_contract():
    assert tuple(c.label for c in PriorityClass) == names.PRIORITY_CLASSES
    assert [PriorityClass.parse(label) for label in names.PRIORITY_CLASSES] == list(PriorityClass)
    assert ALL_CLASSES == names.PRIORITY_CLASSES and SIM_CLASSES == names.PRIORITY_CLASSES
    queues = QueueSettings()
    assert set(queues.classes) == set(names.PRIORITY_CLASSES) == set(queues.capacity)
    classification = ClassificationSettings()
    assert (classification.high_below_tokens, classification.medium_below_tokens) == (
        names.HIGH_BELOW_TOKENS, names.MEDIUM_BELOW_TOKENS)


def test_nothing_respells_a_contract_name():
    spelled = {f'"{name}"' for name in (*names.LLM_METRICS, names.ROUTER_QUEUED, *names.PRIORITY_CLASSES)}
    spelled |= {"ObservedLLMServer:", '"LLMServer:'}
    found = []
    for path in SOURCES:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            # Another contract that happens to share a word: the simulator averaging FleetSignals'
            # attributes by name.
            line = re.sub(r'avg\("\w+"', "", line)
            for word in spelled:
                if word in line:
                    found.append(f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}")
    assert not found, "use deployments/config/names.py:\n" + "\n".join(found)


def test_the_replica_reports_what_the_policy_reads():
    from deployments.autoscaling import serve_policy
    from deployments.server import llm_server

    reported = set(re.findall(r"\b(ENGINE_WAITING|ENGINE_RUNNING|KV_CACHE_USAGE|GPU_UTILIZATION)\b",
                              Path(llm_server.__file__).read_text()))
    read = set(re.findall(r"\b(ENGINE_WAITING|ENGINE_RUNNING|KV_CACHE_USAGE|GPU_UTILIZATION)\b",
                          Path(serve_policy.__file__).read_text()))
    assert reported == read == {"ENGINE_WAITING", "ENGINE_RUNNING", "KV_CACHE_USAGE", "GPU_UTILIZATION"}
    assert {getattr(names, n) for n in reported} == set(names.LLM_METRICS)


def test_pool_round_trips_through_a_deployment_name():
    assert names.pool_of_deployment(names.deployment_name_prefix("bulk") + "SmolLM2") == "bulk"
    assert names.is_llm_deployment(names.deployment_name_prefix("main") + "m")
    assert not names.is_llm_deployment("Router")
