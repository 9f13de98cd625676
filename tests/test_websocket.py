"""The chat socket on the running app: turns, stop, close, errors, against the real engine.

Real WebSocket through Serve's proxy to the router, real vLLM CPU engine with
the embedded model (the session cluster). The engine's own running count in
``/health`` shows that a stop or a closed socket aborts the engine request.
Nothing here asserts a timing: only order, statuses and engine state.
The same protocol, every branch, without Ray: tests/test_websocket_protocol.py.
"""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest
from websockets.sync.client import connect

from tests.test_log_privacy import files_containing, leak_fragments

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a very long story about a lighthouse keeper."}]


def socket_url(base_url: str) -> str:
    return base_url.replace("http://", "ws://") + "/v1/chat/ws"


def receive(ws) -> dict:
    return json.loads(ws.recv(timeout=120))


def until_end(ws) -> list[dict]:
    """A turn's messages up to and including its done or error."""
    messages = [receive(ws)]
    while messages[-1]["type"] not in ("done", "error"):
        messages.append(receive(ws))
    return messages


def start(ws, messages, **request) -> None:
    ws.send(json.dumps({"type": "start", "request": {"messages": messages, **request}}))


def engine_load(base_url) -> dict:
    return httpx.get(base_url + "/health", timeout=30).json()["pools"]["main"]["engine_load"]


def engine_idle(base_url, timeout=30.0) -> dict:
    """Poll the engine's own counters until nothing runs or waits; return them."""
    deadline = time.monotonic() + timeout
    load = {}
    while time.monotonic() < deadline:
        load = engine_load(base_url)
        if load["running"] == 0 and load["waiting"] == 0:
            return load
        time.sleep(0.25)
    raise AssertionError(f"engine still busy after {timeout}s: {load}")


def engine_running(base_url, timeout=30.0) -> dict:
    """Poll until the engine reports a running request (its stats lag a step behind the first token)."""
    deadline = time.monotonic() + timeout
    load = {}
    while time.monotonic() < deadline:
        load = engine_load(base_url)
        if load["running"] > 0:
            return load
        time.sleep(0.1)
    raise AssertionError(f"the engine never reported the request running: {load}")


def long_turn(ws, n_deltas=5) -> list[dict]:
    """Start a generation that runs for minutes (ignore_eos); return once ``n_deltas`` deltas came."""
    start(ws, STORY, max_tokens=2000, ignore_eos=True, temperature=0)
    deltas = [receive(ws) for _ in range(n_deltas)]
    assert [d["type"] for d in deltas] == ["delta"] * n_deltas, deltas
    return deltas


def test_a_turn_streams_token_by_token_and_ends_with_usage_and_the_router_figures(base_url):
    with connect(socket_url(base_url)) as ws:
        start(ws, QUESTION, max_tokens=20, temperature=0)
        messages = until_end(ws)
    deltas, done = messages[:-1], messages[-1]
    assert len(deltas) > 2 and all(m["type"] == "delta" and m["turn"] == 1 for m in deltas)
    assert "Paris" in "".join(m["content"] for m in deltas)
    assert done["type"] == "done" and done["finish_reason"] in ("stop", "length")
    usage = done["usage"]
    assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= 20 == done["router"]["max_tokens_applied"]
    assert done["tokens"] == usage["completion_tokens"] and usage["prompt_tokens"] == done["router"]["prompt_tokens"]
    assert done["router"]["class"] == "high" and done["router"]["pool"] == "main"
    assert done["router"]["queue_wait_ms"] >= 0
    assert 0 < done["ttft_ms"] < done["duration_ms"] and done["tokens_per_s"] > 0


def test_several_turns_follow_one_another_on_one_socket(base_url):
    with connect(socket_url(base_url)) as ws:
        answers = []
        for turn in (1, 2, 3):
            start(ws, QUESTION, max_tokens=8, temperature=0)
            messages = until_end(ws)
            assert {m["turn"] for m in messages} == {turn} and messages[-1]["type"] == "done"
            answers.append("".join(m["content"] for m in messages[:-1]))
    assert answers[0] == answers[1] == answers[2]  # temperature 0: the same answer each turn


def test_the_socket_takes_the_same_priority_and_limits_as_http(base_url):
    medium = [{"role": "user", "content": "word " * 300}]
    with connect(socket_url(base_url)) as ws:
        ws.send(json.dumps({"type": "start", "priority": "low", "request": {"messages": medium, "max_tokens": 2}}))
        assert until_end(ws)[-1]["router"]["class"] == "low"
        ws.send(json.dumps({"type": "start", "priority": "high", "request": {"messages": medium, "max_tokens": 2}}))
        [error] = until_end(ws)
    assert error["status"] == 400 and error["error"]["param"] == "x-priority"  # as over HTTP: no upgrade


def test_stop_aborts_the_engine_request_and_the_socket_serves_the_next_turn(base_url):
    with connect(socket_url(base_url)) as ws:
        long_turn(ws)
        assert engine_running(base_url)["running"] > 0
        ws.send(json.dumps({"type": "stop"}))
        messages = until_end(ws)
        done = messages[-1]
        assert done["type"] == "done" and done["finish_reason"] == "stopped" and done["turn"] == 1
        assert 5 <= done["tokens"] < 2000 and done["usage"] is None
        assert engine_idle(base_url)["running"] == 0
        start(ws, QUESTION, max_tokens=8, temperature=0)
        after = until_end(ws)
    assert after[-1]["type"] == "done" and after[-1]["turn"] == 2
    assert "Paris" in "".join(m["content"] for m in after[:-1])


def test_closing_the_socket_aborts_the_engine_request(base_url):
    with connect(socket_url(base_url)) as ws:
        long_turn(ws)
        assert engine_running(base_url)["running"] > 0
    assert engine_idle(base_url)["running"] == 0


def test_a_start_while_a_turn_runs_is_refused_and_the_turn_goes_on(base_url):
    with connect(socket_url(base_url)) as ws:
        long_turn(ws, 2)
        start(ws, QUESTION)
        while (message := receive(ws))["type"] == "delta":
            pass
        assert message["type"] == "error" and message["status"] == 409 and message["turn"] is None
        ws.send(json.dumps({"type": "stop"}))
        assert until_end(ws)[-1]["finish_reason"] == "stopped"
    engine_idle(base_url)


@pytest.mark.parametrize("sent, status, words", [
    ("not json", 400, "not valid JSON"),
    ('{"type": "start"}', 400, "needs 'request'"),
    ('{"type": "start", "request": {"messages": []}}', 400, "messages"),
    ('{"type": "start", "request": {"messages": [{"role": "user"}]}}', 400, "content"),
    ('{"type": "start", "request": {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}}',
     404, "no-such-model"),
    ('{"type": "start", "request": {"messages": [{"role": "user", "content": "hi"}], "temperature": -1}}',
     400, "temperature"),
    ('{"type": "start", "request": {"messages": [{"role": "user", "content": "hi"}]}, "request_timeout": "soon"}',
     400, "X-Request-Timeout"),
])
def test_bad_start_messages_get_openai_errors(base_url, sent, status, words):
    with connect(socket_url(base_url)) as ws:
        ws.send(sent)
        error = receive(ws)
        assert error["type"] == "error" and error["status"] == status and words in error["message"], error
        assert error["error"]["code"] == status and error["error"]["message"] == error["message"]
        assert error["error"]["type"] and "Traceback" not in error["message"]
        start(ws, QUESTION, max_tokens=4)  # the socket is still usable
        assert until_end(ws)[-1]["type"] == "done"


def test_an_over_limit_prompt_gets_the_http_apis_error(base_url, model_id):
    messages = [{"role": "user", "content": "hello " * 9000}]
    over_http = httpx.post(base_url + "/v1/chat/completions", json={"model": model_id, "messages": messages}, timeout=120)
    with connect(socket_url(base_url)) as ws:
        start(ws, messages)
        [error] = until_end(ws)
    assert error["status"] == over_http.status_code == 400
    assert error["message"] == over_http.json()["error"]["message"] and "context" in error["message"]


def test_a_message_over_the_body_limit_is_413(base_url):
    with connect(socket_url(base_url), max_size=None) as ws:
        start(ws, [{"role": "user", "content": "x" * (5 * 1024 * 1024)}])
        error = receive(ws)
        assert error["status"] == 413 and error["error"]["code"] == 413
        start(ws, QUESTION, max_tokens=4)
        assert until_end(ws)[-1]["type"] == "done"


def test_no_prompt_or_reply_text_of_a_socket_turn_in_the_logs(base_url):
    # As tests/test_log_privacy.py checks for HTTP: a marked prompt, served, refused and stopped.
    marker = f"zq{uuid.uuid4().hex[:12]}socket"
    prompt = [{"role": "user", "content": f"Write one sentence about the blue whale named {marker}."}]
    with connect(socket_url(base_url)) as ws:
        start(ws, prompt, max_tokens=24, temperature=0)
        reply = "".join(m.get("content", "") for m in until_end(ws))
        start(ws, prompt, temperature=9)  # refused by the router
        assert until_end(ws)[-1]["status"] == 400
        ws.send(json.dumps({"type": "start", "request": {"messages": prompt, "n": marker}}))  # by the request model
        assert until_end(ws)[-1]["status"] == 400
        start(ws, prompt, max_tokens=200, ignore_eos=True)
        receive(ws)
        ws.send(json.dumps({"type": "stop"}))
        until_end(ws)
    fragments = leak_fragments(reply)
    assert fragments, f"reply too short to look for: {reply!r}"
    time.sleep(3)  # replicas' log handlers write asynchronously
    assert not files_containing(marker), f"the prompt's marker is logged in {files_containing(marker)}"
    for fragment in fragments:
        assert not files_containing(fragment), f"reply text {fragment!r} is logged in {files_containing(fragment)}"
