"""Live: router settings change through `serve deploy` without restarting any engine (issue 14).

The router's settings are its deployment's ``user_config`` (serve_config.yaml,
``deployments: - name: Router``). Serve applies a changed one to the running
router replicas through ``Router.reconfigure``; the application's ``args`` are
unchanged, so the LLM deployment keeps its code version and its replica, the
vLLM engine, keeps running. Shown by Ray actor ids, before, during and after,
and by the router's own behaviour (its queue capacity and max_tokens cap).
The session config is deployed back at the end (again without a restart).
"""

from __future__ import annotations

import copy
import json

import httpx
import pytest
import yaml

from deployments.config.app_args import SERVE_CONFIG_PATH, load_serve_config, router_entry
from deployments.config.names import ROUTER_DEPLOYMENT, deployment_name_prefix
from tests.cluster import run, wait_for

pytestmark = pytest.mark.integration

SMALL_CAPACITY = {"high": 1, "medium": 1, "low": 1}
SMALL_CAP = 7  # max_tokens


def replica_actor_ids(deployment_prefix: str) -> set[str]:
    """Ray actor ids of the live replicas of the `llm` app's deployments whose names start so."""
    listed = run("ray", "list", "actors", "--format", "json", "--filter", "state=ALIVE", "--limit", "10000",
                 timeout=60).stdout
    wanted = f"ServeReplica:llm:{deployment_prefix}"
    return {actor["actor_id"] for actor in json.loads(listed) if actor["class_name"].startswith(wanted)}


def health(base_url: str) -> dict:
    return httpx.get(base_url + "/health", timeout=30).json()


def deploy(config: dict, path) -> None:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    run("serve", "deploy", str(path), timeout=180)


def test_a_queue_size_changes_through_serve_deploy_and_the_engine_keeps_running(base_url, model_id, tmp_path):
    engines, routers = replica_actor_ids(deployment_name_prefix("main")), replica_actor_ids(ROUTER_DEPLOYMENT)
    assert len(engines) == 1 and routers
    before = health(base_url)
    assert before["pools"]["main"]["capacity"]["high"] != SMALL_CAPACITY["high"]

    config = copy.deepcopy(load_serve_config())
    settings = router_entry(config["applications"][0])["user_config"]
    settings["queues"]["capacity"] = dict(SMALL_CAPACITY)
    settings["admission"]["max_tokens_cap"] = SMALL_CAP
    try:
        deploy(config, tmp_path / "serve_small_queues.yaml")
        wait_for(lambda: health(base_url)["pools"]["main"]["capacity"] == SMALL_CAPACITY, 180,
                 "the router reporting the new queue capacity")
        changed = health(base_url)
        assert changed["router_settings_sha256"] != before["router_settings_sha256"]
        # The new numbers act: a request asking for more than the cap gets the cap (clamped, 200).
        answer = httpx.post(base_url + "/v1/chat/completions", timeout=120, json={
            "model": model_id, "max_tokens": 50, "messages": [{"role": "user", "content": "Count to fifty."}]})
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-max-tokens-applied"] == str(SMALL_CAP)
        assert answer.json()["usage"]["completion_tokens"] <= SMALL_CAP
        # The engine was not restarted, and the routers were reconfigured in place, not replaced.
        assert replica_actor_ids(deployment_name_prefix("main")) == engines
        assert replica_actor_ids(ROUTER_DEPLOYMENT) == routers
    finally:
        run("serve", "deploy", str(SERVE_CONFIG_PATH), timeout=180)
        wait_for(lambda: health(base_url).get("router_settings_sha256") == before["router_settings_sha256"], 180,
                 "the router back on the session's settings")
    assert replica_actor_ids(deployment_name_prefix("main")) == engines
    assert health(base_url)["pools"]["main"]["capacity"] == before["pools"]["main"]["capacity"]


def test_an_invalid_router_setting_is_refused_and_the_running_router_keeps_its_own(base_url, model_id, tmp_path):
    """A queue size that does not validate: the running router keeps its settings, says why on /health,
    and answers; the engine stays. (Serve would stop a replica whose reconfigure raised.)"""
    engines, routers = replica_actor_ids(deployment_name_prefix("main")), replica_actor_ids(ROUTER_DEPLOYMENT)
    before = health(base_url)
    config = copy.deepcopy(load_serve_config())
    router_entry(config["applications"][0])["user_config"]["queues"]["capacity"]["high"] = -1
    try:
        deploy(config, tmp_path / "serve_bad_queues.yaml")
        wait_for(lambda: "capacity" in (health(base_url).get("router_settings_rejected") or ""), 180,
                 "/health naming the refused capacity")
        assert health(base_url)["router_settings_sha256"] == before["router_settings_sha256"]
        answer = httpx.post(base_url + "/v1/chat/completions", timeout=120, json={
            "model": model_id, "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}]})
        assert answer.status_code == 200, answer.text
        assert replica_actor_ids(ROUTER_DEPLOYMENT) == routers
    finally:
        run("serve", "deploy", str(SERVE_CONFIG_PATH), timeout=180)
        wait_for(lambda: health(base_url).get("router_settings_rejected") is None, 180,
                 "the router back on valid settings")
    assert replica_actor_ids(deployment_name_prefix("main")) == engines
