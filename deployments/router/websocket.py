"""Chat turns over one WebSocket, each through the same pipeline as ``POST /v1/chat/completions``.

A web page keeps one socket open for a conversation; a socket, unlike an SSE
request, also carries the user's *stop*. This module only translates: a
``start`` message becomes a chat completion request (vLLM's request model,
forced to stream with usage) that goes through ``Router.chat``, so
validation, classification, admission, pools, queues, budgets, API keys and
OpenAI-format errors are exactly the HTTP API's. The router's SSE events come
back as ``delta`` messages, its end as ``done`` (usage, the router's class,
pool and queue wait, TTFT), any refusal or failure as ``error`` with the
status and message the HTTP API would have answered. A ``stop`` message or a
closed socket aborts the turn in the engine (the router's stream guard
cancels the replica call when its stream is closed early). The protocol is
documented in docs/websocket.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from ray.llm._internal.serve.core.configs.openai_api_models import OpenAIHTTPException

from deployments.observability import metrics
from deployments.router.budgets import TIMEOUT_HEADER
from deployments.router.classification import PRIORITY_HEADER
from deployments.router.errors import _validation_error_to_openai, error_type_for, readable
from deployments.router.json_body import json_problem, strict_json_problem
from deployments.router.request_models import ChatCompletionRequest

logger = logging.getLogger("ray.serve")

CHAT_PATH = "/v1/chat/completions"
# What the start message may carry besides its type: the chat request, and what HTTP clients send as headers.
START_FIELDS = {"type", "request", "api_key", "priority", "request_timeout"}
# Headers of the upgrade itself, meaningless on the chat request built from it.
_UPGRADE_HEADERS = {b"upgrade", b"connection", b"content-length", b"x-request-id"}
# The router's headers, as they appear in a done message's "router" object.
ROUTER_FIELDS = {"x-priority-class": "class", "x-llm-pool": "pool", "x-queue-wait-ms": "queue_wait_ms",
                 "x-prompt-tokens": "prompt_tokens", "x-max-tokens-applied": "max_tokens_applied",
                 "x-router-replica": "replica"}
_COUNTS = {"prompt_tokens", "max_tokens_applied"}


class TurnError(Exception):
    """A turn answered with an OpenAI-format error instead of a reply."""

    def __init__(self, status: int, message: str, *, param: str | None = None, error_type: str | None = None,
                 retry_after: str | None = None, code: int | str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.retry_after = status, message, param, retry_after
        self.error_type = error_type_for(status, error_type)
        self.code = code or status  # OpenAI's code where the router names one (invalid_api_key), else the status

    @classmethod
    def from_response(cls, response: Response) -> "TurnError":
        """The router's JSON error answer (any status) as a TurnError, its OpenAI error kept as is."""
        try:
            error = json.loads(bytes(response.body))["error"]
            message, param, error_type, code = (str(error["message"]), error.get("param"), error.get("type"),
                                                error.get("code"))
        except (ValueError, KeyError, TypeError):
            message, param, error_type, code = bytes(response.body).decode("utf-8", "replace")[:500], None, None, None
        return cls(response.status_code, message, param=param, error_type=error_type,
                   retry_after=response.headers.get("retry-after"), code=code)

    def message_for(self, turn: int | None) -> dict:
        error = {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}
        return {"type": "error", "turn": turn, "status": self.status, "message": self.message,
                "retry_after": self.retry_after, "error": error}


@dataclass
class Reply:
    """What one turn streamed so far, and when; becomes the done message."""

    started_at: float
    request_id: str
    first_token_at: float | None = None
    content_events: int = 0
    finish_reason: str | None = None
    usage: dict | None = None
    router: dict = field(default_factory=dict)
    error: TurnError | None = None  # an error event inside the stream ends the turn with it

    def done(self, turn: int, stopped: bool) -> dict:
        now = time.monotonic()
        tokens = self.usage["completion_tokens"] if self.usage else self.content_events
        rate = None
        if self.first_token_at is not None and tokens > 1 and now > self.first_token_at:
            rate = round((tokens - 1) / (now - self.first_token_at), 2)  # decode rate after the first token
        ttft = None if self.first_token_at is None else round((self.first_token_at - self.started_at) * 1000, 1)
        return {"type": "done", "turn": turn, "request_id": self.request_id,
                "finish_reason": "stopped" if stopped else self.finish_reason,
                "usage": self.usage, "tokens": tokens, "router": self.router, "ttft_ms": ttft,
                "tokens_per_s": rate, "duration_ms": round((now - self.started_at) * 1000, 1)}


def parse_message(text: str | None, max_bytes: int) -> dict:
    """A client message as a dict, or TurnError(400/413) saying what is wrong with it."""
    if text is None:
        raise TurnError(400, "send JSON text messages, not binary ones")
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) > max_bytes:
        metrics.refused_at_door(413, "body_too_large")
        raise TurnError(413, f"message is larger than {max_bytes} bytes")
    problem = (json_problem(raw, "message", "send each message as one JSON object in a text frame")
               or ("message is empty; send a JSON object" if not raw.strip() else None))
    if problem is not None:
        metrics.refused_at_door(400, "invalid_json")
        raise TurnError(400, problem.replace("request body", "message"))
    strict = strict_json_problem(raw)  # lone surrogates, NaN: what the HTTP API refuses too
    if strict is not None:
        metrics.refused_at_door(400, "strict_json")
        raise TurnError(400, strict[0].replace("request body", "message"), param=strict[1])
    message = json.loads(raw)
    if not isinstance(message, dict):
        raise TurnError(400, "a message must be a JSON object with a 'type'")
    return message


async def chat_request(message: dict) -> ChatCompletionRequest:
    """The start message's chat request, validated as the HTTP API validates one, streaming with usage."""
    unknown = sorted(set(message) - START_FIELDS)
    if unknown:
        hint = " (the chat request's fields go under 'request')" if "messages" in unknown else ""
        raise schema_error(f"unknown field(s) in the start message: {', '.join(unknown)}{hint}", unknown[0])
    body = message.get("request")
    if not isinstance(body, dict):
        raise schema_error("the start message needs 'request': a chat completion request object "
                           "(messages, max_tokens, ...)", "request")
    if body.get("n") not in (None, 1):
        raise schema_error("the chat socket streams one choice: 'n' must be 1", "request.n")
    body = {**body, "stream": True, "stream_options": {**(body.get("stream_options") or {}), "include_usage": True}}
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as invalid:
        # The HTTP API's own message for a schema error.
        errors = [{**error, "loc": ("body", *error.get("loc", ()))} for error in invalid.errors()]
        error = TurnError.from_response(await _validation_error_to_openai(None, RequestValidationError(errors)))
        error.param = f"request.{error.param}" if error.param else "request"  # a path in the socket message
        raise error from None
    except (TypeError, ValueError) as failed:
        raise schema_error(f"invalid chat request: {failed}"[:500], "request") from None


def schema_error(message: str, param: str) -> TurnError:
    """A 400 for a start message that does not fit the protocol; counted as a schema refusal."""
    metrics.refused_at_door(400, "schema")
    return TurnError(400, message, param=param)


def http_request(websocket: WebSocket, message: dict, request_id: str) -> Request:
    """The POST /v1/chat/completions request this turn stands for: the socket's headers, never its query."""
    headers = [(name, value) for name, value in websocket.scope.get("headers", [])
               if name not in _UPGRADE_HEADERS and not name.startswith(b"sec-websocket-")]
    extra = {"content-type": "application/json", "x-request-id": request_id}
    for key, header, form in (("api_key", "authorization", "Bearer {}"), ("priority", PRIORITY_HEADER, "{}"),
                              ("request_timeout", TIMEOUT_HEADER, "{}")):
        value = message.get(key)
        if value is None:
            continue
        if not isinstance(value, (str, int, float)) or any(ord(ch) < 32 or ord(ch) > 126 for ch in str(value)):
            raise schema_error(f"'{key}' must be a string of printable ASCII characters", key)
        extra[header] = form.format(value)
    names = {name.encode() for name in extra}
    headers = [(k, v) for k, v in headers if k not in names] + [(k.encode(), v.encode()) for k, v in extra.items()]
    scope = {**websocket.scope, "type": "http", "method": "POST", "path": CHAT_PATH, "raw_path": CHAT_PATH.encode(),
             "query_string": b"", "headers": headers, "state": {"request_id": request_id}}
    return Request(scope)


def router_figures(headers) -> dict:
    """The router's headers on a turn's answer as the done message's "router" object, numbers as numbers."""
    figures = {}
    for header, name in ROUTER_FIELDS.items():
        value = headers.get(header)
        if value is not None:
            try:
                figures[name] = float(value) if name == "queue_wait_ms" else int(value) if name in _COUNTS else value
            except ValueError:
                figures[name] = value
    return figures


def sse_events(chunk: str):
    """The JSON payloads of one chunk's SSE ``data:`` lines; ``None`` for ``[DONE]``."""
    for line in chunk.splitlines():
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data.strip() == "[DONE]":
            yield None
        else:
            try:
                yield json.loads(data)
            except ValueError:  # never the event itself: it may hold the user's text
                logger.warning("chat socket: skipped an SSE event that is not JSON (%d characters)", len(data))


class ChatSocket:
    """One accepted socket: reads client messages; runs at most one turn at a time, as its own task."""

    def __init__(self, router, websocket: WebSocket, max_bytes: int):
        self.router, self.websocket, self.max_bytes = router, websocket, max_bytes
        self.turn: asyncio.Task | None = None
        self.turns = 0
        self.stopping = False
        self._send_lock = asyncio.Lock()
        self.open = True

    async def send(self, message: dict) -> None:
        if not self.open:
            return
        try:
            async with self._send_lock:
                await self.websocket.send_text(json.dumps(message, ensure_ascii=False))
        except (WebSocketDisconnect, RuntimeError, OSError):
            self.open = False  # the client is gone; the receive loop sees the disconnect and aborts the turn

    async def run(self) -> None:
        try:
            while True:
                received = await self.websocket.receive()
                if received["type"] == "websocket.disconnect":
                    return
                await self.handle(received.get("text"))
        except (WebSocketDisconnect, RuntimeError):
            return
        finally:
            self.open = False
            await self.abort()  # a closed socket aborts its turn in the engine

    async def handle(self, text: str | None) -> None:
        try:
            message = parse_message(text, self.max_bytes)
            kind = message.get("type")
            if kind == "stop":
                await self.abort()
            elif kind == "start":
                if self.turn is not None and not self.turn.done():
                    raise TurnError(409, "a turn is already running on this socket; send stop or wait for "
                                         "its done", error_type="invalid_request_error")
                self.turns += 1
                self.turn = asyncio.create_task(self.run_turn(self.turns, message))
            else:
                raise TurnError(400, f"unknown message type {str(kind)[:40]!r}; send 'start' or 'stop'",
                                param="type")
        except TurnError as error:
            await self.send(error.message_for(None))

    async def abort(self) -> None:
        """Stop the running turn, if any; returns once its engine request is cancelled."""
        turn = self.turn
        if turn is None or turn.done():
            return
        self.stopping = True
        turn.cancel()
        try:
            await turn
        except asyncio.CancelledError:
            pass
        finally:
            self.stopping = False

    async def run_turn(self, turn: int, message: dict) -> None:
        reply = Reply(time.monotonic(), f"ws-{uuid.uuid4().hex}")
        try:
            body = await chat_request(message)
            request = http_request(self.websocket, message, reply.request_id)
            answer = await self.call_router(body, request)
            await self.stream(turn, answer, reply)
        except TurnError as error:
            await self.send(error.message_for(turn))
        except asyncio.CancelledError:
            if not self.stopping:  # cancelled from outside the socket (the replica shutting down)
                raise
            await self.send(reply.done(turn, stopped=True))
        except Exception as exc:  # never a dead socket or a stack trace for the client
            # The type only: an exception's message may quote the user's text, which logs must not hold.
            logger.error("chat socket turn failed: %s", type(exc).__name__)
            await self.send(TurnError(500, f"internal error: {type(exc).__name__}").message_for(turn))

    async def call_router(self, body: ChatCompletionRequest, request: Request) -> StreamingResponse:
        """The router's streaming answer; its JSON error answers and raised HTTP errors as TurnError."""
        try:
            answer = await self.router.chat(body, request)
        except OpenAIHTTPException as exc:
            raise TurnError(exc.status_code, readable(exc.message)[0]) from None
        except HTTPException as exc:
            raise TurnError(exc.status_code, str(exc.detail)) from None
        if not isinstance(answer, StreamingResponse):
            raise TurnError.from_response(answer)
        return answer

    async def stream(self, turn: int, answer: StreamingResponse, reply: Reply) -> None:
        """Send the answer's events as deltas, then done (or its error); closing the stream early aborts it
        in the engine. Read to its end, so the router settles it as served, not as a client gone."""
        reply.router = router_figures(answer.headers)
        chunks = answer.body_iterator
        try:
            # Nothing awaited between the router's answer and this loop: a stop lands inside the stream
            # guard, whose cleanup cancels the engine request.
            async for chunk in chunks:
                await self.forward(turn, chunk, reply)
                if not self.open:  # the client is gone: end the stream here, which aborts the engine request
                    return
        finally:
            await chunks.aclose()
        await self.send(reply.error.message_for(turn) if reply.error else reply.done(turn, stopped=False))

    async def forward(self, turn: int, chunk: str, reply: Reply) -> None:
        """Send one chunk's text as a delta; note its finish reason, usage or error."""
        content = []
        for event in sse_events(chunk):
            if event is None or reply.error is not None:  # [DONE], or anything after an error
                continue
            if "error" in event:
                error = event["error"] if isinstance(event["error"], dict) else {"message": str(event["error"])}
                code = error.get("code") if isinstance(error.get("code"), int) else 500
                reply.error = TurnError(code, str(error.get("message", "")), error_type=error.get("type"))
                continue
            if event.get("usage"):
                reply.usage = event["usage"]
            for choice in event.get("choices") or ():
                text = (choice.get("delta") or {}).get("content")
                if text:
                    content.append(text)
                    reply.content_events += 1
                if choice.get("finish_reason"):
                    reply.finish_reason = choice["finish_reason"]
        await self.send_delta(turn, content, reply)

    async def send_delta(self, turn: int, content: list[str], reply: Reply) -> None:
        if not content:
            return
        if reply.first_token_at is None:
            reply.first_token_at = time.monotonic()
        await self.send({"type": "delta", "turn": turn, "content": "".join(content)})
        content.clear()


def origin_allowed(headers, allowed: list[str]) -> bool:
    """Browsers let any page open a socket anywhere (CORS does not apply to WebSockets), so a page from
    another origin could chat through a visitor's browser; as for the HTTP API, only the app's own
    origin and the configured ``cors.allow_origins`` (router settings) may. Clients that send no Origin (not
    browsers) are let in: they could send anything anyway."""
    origin = headers.get("origin")
    if origin is None:
        return True
    return urlsplit(origin).netloc == headers.get("host") or origin in allowed or "*" in allowed


async def serve_chat_socket(router, websocket: WebSocket) -> None:
    """Accept the socket and serve its turns until the client closes it."""
    cors = getattr(router._settings, "cors", None)
    if not origin_allowed(websocket.headers, list(getattr(cors, "allow_origins", None) or [])):
        await websocket.close(code=1008)  # before the handshake: the browser gets a 403
        return
    await websocket.accept()
    await ChatSocket(router, websocket, router._settings.admission.max_request_bytes).run()
