"""Two router replicas on the running app: each keeps half of the pool's window, both serve.

Runs on the app test_tenancy_live.py deploys (two router replicas, keys on; its
``tenants_file`` fixture, session-wide, so the app is redeployed once for both).
"""

from __future__ import annotations

import httpx
import pytest
from tests.cluster import app_status, wait_for
from tests.test_router import chat_body, engine_idle, flood
from tests.tenancy_app import auth

pytestmark = [pytest.mark.integration, pytest.mark.changes_app]


def routers_running() -> int:
    return app_status()["deployments"]["Router"]["replica_states"].get("RUNNING", 0)


def test_two_router_replicas_share_the_window_and_keep_overload_a_429(base_url, model_id, tenants_file):
    assert routers_running() == 2
    # Each router learns the count from Serve within its 5 s poll; /health lands on either.
    def both_know():
        seen = [httpx.get(base_url + "/health", timeout=30).json()["pools"]["main"] for _ in range(8)]
        return all(pool["router_replicas"] == 2 for pool in seen)

    wait_for(both_know, 60, "both routers seeing two router replicas")

    story = [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a message in a bottle."}]
    body = chat_body(model_id, story, max_tokens=128, ignore_eos=True)
    answers = flood(base_url, [body] * 32, clients=16, headers=auth("heavy"))
    codes = [r.status_code for r in answers]
    served_by = {r.headers["x-router-replica"] for r in answers if "x-router-replica" in r.headers}
    print("statuses:", {c: codes.count(c) for c in set(codes)}, "routers:", served_by)
    assert set(codes) <= {200, 429} and 200 in codes, codes
    assert len(served_by) == 2  # Serve spread the requests over both routers
    engine_idle(base_url, model_id)
