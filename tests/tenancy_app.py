"""The app with API keys on, as the tenancy tests deploy it: tenants, tiers, keys and the redeploy.

Shared by tests/test_tenancy_live.py, test_two_routers_live.py and the socket tests through
conftest's session fixture ``tenants_file``: keys and router replicas are the Router entry's
``user_config`` and options, so the redeploy leaves the engine running.
"""

from __future__ import annotations

import copy
from pathlib import Path

import httpx
import yaml

from deployments.config.app_args import load_serve_config, router_entry
from deployments.tenancy.tenants import digest
from tests.cluster import app_status, redeploy, wait_for

KEYS = {name: f"sk-test-{name}-{'x' * 24}" for name in ("heavy", "light", "capped", "tight", "narrow", "small",
                                                        "rotating")}
RELOAD_S = 0.5
TIERS = {
    "standard": {"max_class": "high", "requests_per_minute": 100000, "tokens_per_minute": 100000000,
                 "max_concurrent": 256},
    "capped": {"max_class": "medium", "requests_per_minute": 100000, "tokens_per_minute": 100000000,
               "max_concurrent": 256},
    "tight": {"max_class": "high", "requests_per_minute": 6, "tokens_per_minute": 100000000, "max_concurrent": 256},
    "narrow": {"max_class": "high", "requests_per_minute": 100000, "tokens_per_minute": 100000000,
               "max_concurrent": 1},
    "small": {"max_class": "high", "requests_per_minute": 100000, "tokens_per_minute": 600, "max_concurrent": 256},
}
TENANT_TIER = {"heavy": "standard", "light": "standard", "capped": "capped", "tight": "tight", "narrow": "narrow",
               "small": "small", "rotating": "standard"}


def tenants_doc(sharing="fair", rotating_keys=(KEYS["rotating"],)) -> dict:
    tenants = {name: {"tier": TENANT_TIER[name], "key_sha256": [digest(KEYS[name])]} for name in TENANT_TIER}
    tenants["rotating"]["key_sha256"] = [digest(key) for key in rotating_keys]
    return {"sharing": sharing, "tiers": TIERS, "tenants": tenants}


def write_tenants(path: Path, doc: dict) -> None:
    partial = path.with_suffix(".new")
    partial.write_text(yaml.safe_dump(doc))
    partial.replace(path)  # atomic, as a Secret update is


def auth(name_or_key: str) -> dict:
    return {"Authorization": f"Bearer {KEYS.get(name_or_key, name_or_key)}"}


def routers_running() -> int:
    return app_status()["deployments"]["Router"]["replica_states"].get("RUNNING", 0)



def deploy_with_keys(base_url: str, folder: Path) -> Path:
    """Redeploy the session app with a tenants file in ``folder`` and two router replicas; its path."""
    path = folder / "tenants.yaml"
    write_tenants(path, tenants_doc())
    config = copy.deepcopy(load_serve_config())
    router = router_entry(config["applications"][0])  # user_config and options: the engines keep running
    router["user_config"]["tenancy"] = {"keys_file": str(path), "reload_s": RELOAD_S}
    # A fixed count with the code's autoscaling_config switched off: adding an autoscaling_config entry
    # would change the app's code version in Serve (it hashes deployment-level autoscaling policies)
    # and restart the engine; num_replicas is a lightweight update.
    router.update(num_replicas=2, autoscaling_config=None)
    config_path = folder / "serve_tenancy.yaml"
    config_path.write_text(yaml.safe_dump(config))
    redeploy(str(config_path))
    # Several answers in a row, so that both router replicas (the proxy picks one per request) are ready.
    wait_for(lambda: routers_running() == 2 and all(httpx.get(base_url + "/health", timeout=30).status_code == 200
                                                    for _ in range(6)),
             300, "two RUNNING router replicas with keys")
    return path
