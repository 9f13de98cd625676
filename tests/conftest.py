"""Session fixtures: one real Ray cluster with the app deployed, for every test.

Order matters on a 2-core machine: the `serve run` flow (which starts its own
Ray) runs first and alone; then the `serve deploy` cluster comes up once and
serves every integration test; tests that redeploy it with their own config
come after those, and the test that shuts it down runs last.
"""

from __future__ import annotations

import sys

import openai
import pytest

from tests.cluster import BASE_URL, DeployedCluster

FIRST, NORMAL, DISRUPTIVE, CHANGES_APP, LAST = 0, 1, 2, 3, 4


def pytest_collection_modifyitems(config, items):
    def rank(item):
        if item.get_closest_marker("runs_first"):
            return FIRST
        if item.get_closest_marker("disruptive"):
            return DISRUPTIVE
        if item.get_closest_marker("changes_app"):
            # The keys redeploy changes only the router's user_config and replica count, a lightweight
            # update, so it goes first among them, while the app still has the session's args.
            return CHANGES_APP - 0.5 if "tenants_file" in getattr(item, "fixturenames", ()) else CHANGES_APP
        if item.get_closest_marker("runs_last"):
            return LAST
        return NORMAL

    items.sort(key=rank)  # stable: keeps file order within a rank


def pytest_configure(config):
    config.addinivalue_line("markers", "runs_first: needs the machine to itself, before the session cluster")
    config.addinivalue_line("markers", "disruptive: breaks the session app on purpose (after the others)")
    config.addinivalue_line("markers", "changes_app: redeploys the session app with its own config and "
                                       "leaves it so (after the disruptive ones; saves a restore each)")
    config.addinivalue_line("markers", "runs_last: tears the session cluster down")


def pytest_terminal_summary(terminalreporter):
    """Name the slowest fuzzed requests (tests/test_fuzz.py), so a slow case can be replayed."""
    fuzz = sys.modules.get("tests.test_fuzz") or sys.modules.get("test_fuzz")
    cases = fuzz.slowest() if fuzz is not None else []
    if cases:
        terminalreporter.section("slowest fuzzed requests (over 3x the median)")
        for seconds, path, sent in cases:
            terminalreporter.write_line(f"{seconds:7.1f}s  {path}  {sent}")


@pytest.fixture(scope="session")
def tenants_file(deployed_cluster, base_url, tmp_path_factory):
    """The session app redeployed with API keys on and two router replicas (``changes_app`` tests only)."""
    from tests.tenancy_app import deploy_with_keys

    return deploy_with_keys(base_url, tmp_path_factory.mktemp("tenancy"))


@pytest.fixture(scope="session")
def deployed_cluster():
    cluster = DeployedCluster()
    cluster.ready_s = cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def base_url(deployed_cluster) -> str:
    return BASE_URL


@pytest.fixture(scope="session")
def model_id() -> str:
    from deployments.config.app_args import app_args_from_serve_config

    return app_args_from_serve_config().primary.model_id


@pytest.fixture(scope="session")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
