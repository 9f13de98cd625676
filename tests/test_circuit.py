"""The circuit breaker against a real failure: vLLM's engine process is killed.

Disruptive: it runs after the other integration tests and waits until Serve
has replaced the broken replica, so the app is whole again afterwards.
"""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from tests.cluster import engine_processes, wait_healthy

pytestmark = [pytest.mark.integration, pytest.mark.disruptive]


def ask(base_url, model_id, timeout_s="5"):
    body = {"model": model_id, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    return httpx.post(base_url + "/v1/chat/completions", json=body, headers={"X-Request-Timeout": timeout_s}, timeout=60)


def test_engine_death_opens_the_circuit_and_recovery_closes_it(base_url, model_id):
    assert ask(base_url, model_id).status_code == 200
    engine = [line for line in engine_processes() if "EngineCore" in line]
    assert len(engine) == 1, engine_processes()
    os.kill(int(engine[0].split()[0]), signal.SIGKILL)

    # Failures (500s from a dead engine, or deadlines) pile up to the threshold,
    # then the router answers 503 itself instead of forwarding.
    statuses = []
    for _ in range(20):
        response = ask(base_url, model_id)
        statuses.append(response.status_code)
        if "circuit open" in response.text:
            break
    assert "circuit open" in response.text, statuses
    assert response.status_code == 503 and int(response.headers["retry-after"]) >= 1
    assert response.json()["error"]["type"] == "service_unavailable_error"
    assert all(code >= 500 for code in statuses), statuses
    assert httpx.get(base_url + "/health", timeout=60).status_code == 503

    # Serve's health check replaces the replica; a half-open probe then
    # succeeds and closes the circuit.
    wait_healthy(base_url, timeout=600)
    deadline = time.monotonic() + 120
    while (response := ask(base_url, model_id, "30")).status_code != 200 and time.monotonic() < deadline:
        time.sleep(1)
    assert response.status_code == 200, response.text
    assert httpx.get(base_url + "/health", timeout=60).json()["pools"]["main"]["circuit"] == "closed"
