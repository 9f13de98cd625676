"""Two router replicas on the running app: each keeps half of the pool's window, both serve.

Redeploys the session app with the router at two replicas (the LLM deployment
is unchanged, so its engine keeps running) and leaves it so (``changes_app``).
"""

from __future__ import annotations

import copy

import httpx
import pytest
import yaml

from deployments.config.app_args import load_serve_config
from tests.cluster import app_status, redeploy, wait_for
from tests.test_router import chat_body, engine_idle, flood

pytestmark = [pytest.mark.integration, pytest.mark.changes_app]


def two_routers_config(tmp_path) -> str:
    config = copy.deepcopy(load_serve_config())
    router = config["applications"][0]["args"]["router"]["deployment"]
    router["autoscaling_config"] = {"min_replicas": 2, "max_replicas": 2}
    path = tmp_path / "serve_two_routers.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def routers_running() -> int:
    return app_status()["deployments"]["Router"]["replica_states"].get("RUNNING", 0)


def test_two_router_replicas_share_the_window_and_keep_overload_a_429(base_url, model_id, tmp_path):
    redeploy(two_routers_config(tmp_path))
    wait_for(lambda: routers_running() == 2, 300, "two RUNNING router replicas")
    # Each router learns the count from Serve within its 5 s poll; /health lands on either.
    def both_know():
        seen = [httpx.get(base_url + "/health", timeout=30).json()["pools"]["main"] for _ in range(8)]
        return all(pool["router_replicas"] == 2 for pool in seen)

    wait_for(both_know, 60, "both routers seeing two router replicas")

    story = [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a message in a bottle."}]
    body = chat_body(model_id, story, max_tokens=128, ignore_eos=True)
    answers = flood(base_url, [body] * 32, clients=16)
    codes = [r.status_code for r in answers]
    served_by = {r.headers["x-router-replica"] for r in answers if "x-router-replica" in r.headers}
    print("statuses:", {c: codes.count(c) for c in set(codes)}, "routers:", served_by)
    assert set(codes) <= {200, 429} and 200 in codes, codes
    assert len(served_by) == 2  # Serve spread the requests over both routers
    engine_idle(base_url, model_id)
