"""Real faults against the live app: a hung engine, a lost replica, a dead engine.

Disruptive: these run after the other integration tests, in this order, and
each waits until the app is whole again. The hang needs no replica
replacement (SIGCONT resumes the engine); the lost replica and the dead engine
cost one replacement each, the two the suite allows.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from tests.cluster import engine_processes, processes, wait_healthy, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.disruptive]

STREAM_TOKENS = 512  # long enough to be mid-stream when the fault comes, on any machine


def ask(base_url, model_id, timeout_s="5"):
    body = {"model": model_id, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    return httpx.post(base_url + "/v1/chat/completions", json=body, headers={"X-Request-Timeout": timeout_s}, timeout=60)


def engine_core_pid() -> int:
    engine = [line for line in engine_processes() if "EngineCore" in line]
    assert len(engine) == 1, engine_processes()
    return int(engine[0].split()[0])


class Stream(threading.Thread):
    """One streamed chat read to its end in a thread: its SSE data events, in order."""

    def __init__(self, base_url: str, model_id: str):
        super().__init__(daemon=True)
        self.base_url, self.model_id = base_url, model_id
        self.events: list[str] = []
        self.status: int | None = None
        self.first_token = threading.Event()
        self.error: Exception | None = None

    def run(self) -> None:
        body = {"model": self.model_id, "stream": True, "max_tokens": STREAM_TOKENS, "ignore_eos": True,
                "messages": [{"role": "user", "content": "Count slowly from one to a thousand."}]}
        try:
            with httpx.stream("POST", self.base_url + "/v1/chat/completions", json=body, timeout=300) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[len("data: "):])
                        self.first_token.set()
        except Exception as exc:  # reported by the assertions, not raised in the thread
            self.error = exc
        finally:
            self.first_token.set()

    def ending(self) -> tuple[dict | None, str | None]:
        """(the error object of the stream's last error event, or None; the last event)."""
        errors = []
        for event in self.events:
            try:
                payload = json.loads(event)
            except ValueError:
                continue
            if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
                errors.append(payload["error"])
        return (errors[-1] if errors else None), (self.events[-1] if self.events else None)


def start_streams(base_url, model_id, count: int) -> list[Stream]:
    streams = [Stream(base_url, model_id) for _ in range(count)]
    for stream in streams:
        stream.start()
    for stream in streams:
        assert stream.first_token.wait(120), "no first token"
        assert stream.status == 200 and stream.error is None, (stream.status, stream.error, stream.events[:2])
    return streams


def finish(streams: list[Stream], timeout_s: float) -> None:
    for stream in streams:
        stream.join(timeout_s)
        assert not stream.is_alive(), "the stream hangs"
        assert stream.error is None, stream.error


def health(base_url) -> httpx.Response:
    return httpx.get(base_url + "/health", timeout=60)


def recovered(base_url, model_id) -> None:
    wait_healthy(base_url, timeout=600)
    deadline = time.monotonic() + 120
    while (response := ask(base_url, model_id, "30")).status_code != 200 and time.monotonic() < deadline:
        time.sleep(1)
    assert response.status_code == 200, response.text
    assert health(base_url).json()["pools"]["main"]["circuit"] == "closed"


def test_a_hung_engine_ends_streams_with_504_opens_the_circuit_and_recovers_by_itself(base_url, model_id):
    pid = engine_core_pid()
    streams = start_streams(base_url, model_id, 2)
    os.kill(pid, signal.SIGSTOP)
    try:
        finish(streams, timeout_s=120)  # stall_s (15 s) after the last token
        for stream in streams:
            error, last = stream.ending()
            assert last == "[DONE]" and error and error["code"] == 504 and "no output" in error["message"], \
                stream.events[-2:]
        # One stall is enough: the circuit is open, and new requests get 503 at once, not a hang.
        refused = ask(base_url, model_id)
        assert refused.status_code == 503 and "circuit open" in refused.text and "stall" in refused.text
        assert int(refused.headers["retry-after"]) >= 1
        answer = health(base_url)
        assert answer.status_code == 503
        assert "'main'" in answer.json()["error"]["message"] and "stall" in answer.json()["error"]["message"]
    finally:
        os.kill(pid, signal.SIGCONT)
    recovered(base_url, model_id)  # the router's own probe closes the circuit
    assert engine_core_pid() == pid  # recovered without a replacement


def test_a_replica_lost_mid_stream_ends_the_stream_with_an_error_and_serve_replaces_it(base_url, model_id):
    replica = [line for line in processes("ServeReplica:llm:ObservedLLMServer") if "ray::" in line]
    assert len(replica) == 1, replica
    engines = [int(line.split()[0]) for line in engine_processes()]
    streams = start_streams(base_url, model_id, 1)
    os.kill(int(replica[0].split()[0]), signal.SIGKILL)
    finish(streams, timeout_s=120)
    error, last = streams[0].ending()
    assert last == "[DONE]" and error and error["code"] >= 500, streams[0].events[-2:]
    for pid in engines:  # vLLM's processes can outlive their replica; free their memory for the new one
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    recovered(base_url, model_id)


def test_engine_death_ends_streams_opens_the_circuit_and_recovery_closes_it(base_url, model_id):
    assert ask(base_url, model_id).status_code == 200
    streams = start_streams(base_url, model_id, 1)
    os.kill(engine_core_pid(), signal.SIGKILL)
    finish(streams, timeout_s=120)
    error, last = streams[0].ending()
    assert last == "[DONE]" and error and error["code"] >= 500, streams[0].events[-4:]
    assert streams[0].events.count("[DONE]") == 1, streams[0].events[-4:]

    # Failures (500s from a dead engine) pile up to the threshold, then the router answers 503
    # itself instead of forwarding; /health names the pool and the fault.
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
    answer = health(base_url)
    assert answer.status_code == 503 and "'main'" in answer.json()["error"]["message"]
    assert "last fault" in answer.json()["error"]["message"]

    # Serve's health check replaces the replica; the router's half-open probe closes the circuit.
    recovered(base_url, model_id)
    assert wait_until(lambda: len([p for p in engine_processes() if "EngineCore" in p]) == 1, 60)
