"""The chat socket's protocol against a stand-in router, in-process (no Ray): fast, every branch.

``serve_chat_socket`` only translates between socket messages and
``Router.chat``; here ``Router.chat`` is a fake that records what it was given
and answers with a scripted SSE stream or an OpenAI-format error, so the
translation (deltas, done, errors, stop, close, several turns) is checked
exactly. The same protocol against the real app: tests/test_websocket.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import pytest
from starlette.applications import Starlette
from starlette.responses import StreamingResponse
from starlette.routing import WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from deployments.router.errors import openai_error, sse_error_event
from deployments.router.websocket import serve_chat_socket

ROUTER_HEADERS = {"x-priority-class": "high", "x-llm-pool": "main", "x-queue-wait-ms": "3",
                  "x-prompt-tokens": "12", "x-max-tokens-applied": "16", "x-router-replica": "r1"}
HELLO = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16}


def chunk(content=None, finish=None, role=False):
    delta = {"role": "assistant"} if role else ({"content": content} if content is not None else {})
    event = {"id": "chatcmpl-1", "object": "chat.completion.chunk",
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(event)}\n\n"


def usage(completion_tokens):
    event = {"id": "chatcmpl-1", "choices": [],
             "usage": {"prompt_tokens": 12, "completion_tokens": completion_tokens,
                       "total_tokens": 12 + completion_tokens}}
    return f"data: {json.dumps(event)}\n\n"


class FakeRouter:
    """Router.chat's contract: a StreamingResponse of SSE chunks with the router's headers, or a JSON error."""

    def __init__(self):
        self._settings = SimpleNamespace(admission=SimpleNamespace(max_request_bytes=1000),
                                         cors=SimpleNamespace(allow_origins=["https://chat.example.org"]))
        self.calls = []          # (body, request headers)
        self.closed = []         # per call: did its stream end early (what aborts the engine request)?
        self.script = None       # chunks for the next call, or a Response
        self.endless = False     # stream tokens until closed

    async def chat(self, body, request):
        self.calls.append((body, dict(request.headers), request.url.path, request.method))
        if not isinstance(self.script, list) and self.script is not None:
            return self.script
        index = len(self.closed)
        self.closed.append(None)
        return StreamingResponse(self._stream(index, list(self.script or [])), headers=ROUTER_HEADERS)

    async def _stream(self, index, chunks):
        finished = False
        try:
            yield chunk(role=True)
            for part in chunks:
                yield part
            while self.endless:
                await asyncio.sleep(0.01)
                yield chunk("la ")
            finished = True
        finally:
            self.closed[index] = not finished


@pytest.fixture
def router():
    return FakeRouter()


@pytest.fixture
def socket(router):
    async def endpoint(websocket):
        await serve_chat_socket(router, websocket)

    app = Starlette(routes=[WebSocketRoute("/v1/chat/ws", endpoint)])
    with TestClient(app) as client, client.websocket_connect("/v1/chat/ws?api_key=from-url",
                                                              headers={"x-custom": "kept"}) as ws:
        yield ws


def until_end(ws) -> list[dict]:
    """Messages up to and including the turn's done or error."""
    messages = []
    while True:
        messages.append(ws.receive_json())
        if messages[-1]["type"] in ("done", "error"):
            return messages


def test_a_turn_streams_deltas_then_done_with_usage_and_the_router_figures(socket, router):
    router.script = [chunk("Hel"), chunk("lo"), chunk("!", finish="stop"), usage(3), "data: [DONE]\n\n"]
    socket.send_json({"type": "start", "request": HELLO})
    messages = until_end(socket)
    deltas, done = messages[:-1], messages[-1]
    assert [m["type"] for m in deltas] == ["delta"] * 3 and "".join(m["content"] for m in deltas) == "Hello!"
    assert done["type"] == "done" and done["turn"] == 1 and done["finish_reason"] == "stop"
    assert done["usage"] == {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15} and done["tokens"] == 3
    assert done["router"] == {"class": "high", "pool": "main", "queue_wait_ms": 3.0, "prompt_tokens": 12,
                              "max_tokens_applied": 16, "replica": "r1"}
    assert done["ttft_ms"] >= 0 and done["duration_ms"] >= done["ttft_ms"]
    assert router.closed == [False]


def test_the_turn_goes_through_router_chat_as_a_streaming_post_with_the_sockets_headers(socket, router):
    router.script = ["data: [DONE]\n\n"]
    socket.send_json({"type": "start", "request": HELLO, "api_key": "sk-1", "priority": "low",
                      "request_timeout": 30})
    until_end(socket)
    body, headers, path, method = router.calls[0]
    assert (path, method) == ("/v1/chat/completions", "POST")
    assert body.stream is True and body.stream_options.include_usage is True and body.max_tokens == 16
    assert headers["authorization"] == "Bearer sk-1" and headers["x-custom"] == "kept"
    assert headers["x-priority"] == "low" and headers["x-request-timeout"] == "30"
    assert headers["x-request-id"].startswith("ws-")
    assert not any(name.startswith("sec-websocket") for name in headers)


def test_a_key_in_the_url_is_never_used(socket, router):
    router.script = ["data: [DONE]\n\n"]
    socket.send_json({"type": "start", "request": HELLO})
    until_end(socket)
    _, headers, _, _ = router.calls[0]
    assert "authorization" not in headers and "from-url" not in json.dumps(headers)


def test_several_turns_follow_one_another_each_with_its_number(socket, router):
    for turn in (1, 2, 3):
        router.script = [chunk(f"turn {turn}", finish="stop"), usage(2), "data: [DONE]\n\n"]
        socket.send_json({"type": "start", "request": HELLO})
        messages = until_end(socket)
        assert messages[0] == {"type": "delta", "turn": turn, "content": f"turn {turn}"}
        assert messages[-1]["type"] == "done" and messages[-1]["turn"] == turn
    assert len(router.calls) == 3


def test_a_router_refusal_is_an_error_with_its_status_message_and_retry_after(socket, router):
    router.script = openai_error(429, "the high class would wait about 9.0s", headers={"retry-after": "9"})
    socket.send_json({"type": "start", "request": HELLO})
    [error] = until_end(socket)
    assert error["type"] == "error" and error["turn"] == 1 and error["status"] == 429
    assert error["message"] == "the high class would wait about 9.0s" and error["retry_after"] == "9"
    assert error["error"] == {"message": error["message"], "type": "rate_limit_error", "param": None, "code": 429}


def test_an_error_inside_the_stream_ends_the_turn_with_its_status(socket, router):
    router.script = [chunk("partial"), sse_error_event(504, "generation budget of 9s passed"), "data: [DONE]\n\n"]
    socket.send_json({"type": "start", "request": HELLO})
    messages = until_end(socket)
    assert messages[0]["content"] == "partial"
    assert messages[-1]["type"] == "error" and messages[-1]["status"] == 504
    assert "generation budget" in messages[-1]["message"] and messages[-1]["error"]["type"] == "timeout_error"


def test_stop_aborts_the_stream_and_answers_done_stopped(socket, router):
    router.endless = True
    socket.send_json({"type": "start", "request": HELLO})
    assert socket.receive_json()["type"] == "delta"
    socket.send_json({"type": "stop"})
    messages = until_end(socket)
    assert messages[-1]["type"] == "done" and messages[-1]["finish_reason"] == "stopped"
    assert messages[-1]["usage"] is None and messages[-1]["tokens"] >= 1
    assert router.closed == [True]  # the router's stream was closed early: its guard cancels the engine request
    router.endless = False
    router.script = [chunk("again", finish="stop"), usage(1), "data: [DONE]\n\n"]
    socket.send_json({"type": "start", "request": HELLO})  # the socket serves the next turn
    assert until_end(socket)[-1]["type"] == "done"


def test_a_stop_with_no_turn_running_is_ignored(socket, router):
    socket.send_json({"type": "stop"})
    router.script = ["data: [DONE]\n\n"]
    socket.send_json({"type": "start", "request": HELLO})
    [done] = until_end(socket)  # nothing answered the stop
    assert done["type"] == "done" and done["turn"] == 1


def test_a_start_while_a_turn_runs_is_409_and_the_turn_goes_on(socket, router):
    router.endless = True
    socket.send_json({"type": "start", "request": HELLO})
    assert socket.receive_json()["type"] == "delta"
    socket.send_json({"type": "start", "request": HELLO})
    while (message := socket.receive_json())["type"] == "delta":
        pass
    assert message["type"] == "error" and message["status"] == 409 and message["turn"] is None
    socket.send_json({"type": "stop"})
    assert until_end(socket)[-1]["finish_reason"] == "stopped"


@pytest.mark.parametrize("sent, status, param, words", [
    ("not json", 400, None, "in a text frame"),  # not the HTTP API's Content-Type hint
    ("[1, 2]", 400, None, "JSON object"),
    ('{"type": "start", "request": {"messages": [{"role": "user", "content": "\\ud800"}]}}', 400,
     "request.messages[0].content", "surrogate"),
    ('{"type": "hello"}', 400, "type", "unknown message type"),
    ('{"type": "start"}', 400, "request", "needs 'request'"),
    ('{"type": "start", "messages": []}', 400, "messages", "under 'request'"),
    ('{"type": "start", "request": {"messages": "hi"}}', 400, "request.messages", "messages"),
    ('{"type": "start", "request": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}}',
     400, "request.max_tokens", "max_tokens"),
    ('{"type": "start", "request": {"messages": [{"role": "user", "content": "hi"}], "n": 2}}', 400, "request.n", "one choice"),
    ('{"type": "start", "request": {"messages": []}, "api_key": "caf\\u00e9"}', 400, "api_key", "ASCII"),
    ("x" * 1001, 413, None, "larger than 1000 bytes"),
])
def test_bad_messages_get_openai_errors_and_the_socket_stays_usable(socket, router, sent, status, param, words):
    socket.send_text(sent)
    error = socket.receive_json()
    assert error["type"] == "error" and error["status"] == status and words in error["message"], error
    assert error["error"]["param"] == param and error["error"]["code"] == status
    assert error["error"]["type"] == "invalid_request_error" and "Traceback" not in error["message"]
    router.script = [chunk("fine", finish="stop"), usage(1), "data: [DONE]\n\n"]
    socket.send_json({"type": "start", "request": HELLO})
    assert until_end(socket)[-1]["type"] == "done"


def test_binary_messages_are_refused(socket):
    socket.send_bytes(b'{"type": "stop"}')
    assert socket.receive_json()["status"] == 400


def test_closing_the_socket_mid_turn_aborts_the_stream(router):
    router.endless = True

    async def endpoint(websocket):
        await serve_chat_socket(router, websocket)

    app = Starlette(routes=[WebSocketRoute("/v1/chat/ws", endpoint)])
    with TestClient(app) as client:
        with client.websocket_connect("/v1/chat/ws") as ws:
            ws.send_json({"type": "start", "request": HELLO})
            assert ws.receive_json()["type"] == "delta"
        # the handler has returned once the client's context exits; its turn's stream was closed early
        for _ in range(100):
            if router.closed and router.closed[0] is not None:
                break
            time.sleep(0.02)
    assert router.closed == [True]


@pytest.mark.parametrize("origin, admitted", [
    (None, True),                          # not a browser
    ("http://testserver", True),           # the page the app serves itself
    ("https://chat.example.org", True),    # router.cors.allow_origins
    ("https://evil.example.com", False),   # any other page, through a visitor's browser
])
def test_only_the_apps_own_and_allowed_origins_may_open_a_socket(router, origin, admitted):
    async def endpoint(websocket):
        await serve_chat_socket(router, websocket)

    app = Starlette(routes=[WebSocketRoute("/v1/chat/ws", endpoint)])
    headers = {"origin": origin} if origin else {}
    with TestClient(app) as client:
        if admitted:
            with client.websocket_connect("/v1/chat/ws", headers=headers) as ws:
                ws.send_json({"type": "stop"})
        else:
            with pytest.raises(WebSocketDisconnect) as refused:
                with client.websocket_connect("/v1/chat/ws", headers=headers):
                    pass
            assert refused.value.code == 1008


def test_the_routers_own_error_code_is_kept(socket, router):
    router.script = openai_error(401, "Incorrect API key provided.", "invalid_request_error", code="invalid_api_key")
    socket.send_json({"type": "start", "request": HELLO, "api_key": "sk-wrong"})
    [error] = until_end(socket)
    assert error["status"] == 401 and error["error"]["code"] == "invalid_api_key"
