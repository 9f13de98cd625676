"""Read a POST body as JSON whatever Content-Type the client sent.

FastAPI parses a body as JSON only when it is declared JSON. curl's ``-d``
declares ``application/x-www-form-urlencoded``, some clients send no
Content-Type or ``text/plain``; FastAPI then validates the raw bytes, fails,
and the validation error (which carries those bytes) could not even be
written out: HTTP 500 "Object of type bytes is not JSON serializable". Every
POST endpoint here takes JSON, so a body that parses as JSON is served as JSON
(OpenAI's API does the same); one that does not gets a 400 in OpenAI's format.
"""

from __future__ import annotations

import json

from deployments.router.errors import openai_error

JSON = b"application/json"


def declares_json(content_type: bytes | None) -> bool:
    """Does this Content-Type already make FastAPI parse the body as JSON?"""
    if not content_type:
        return False
    mime = content_type.split(b";", 1)[0].strip().lower()
    return mime == JSON or (mime.startswith(b"application/") and mime.endswith(b"+json"))


def json_problem(body: bytes) -> str | None:
    """Why ``body`` is not JSON, or None when it is (an empty body is left to the endpoint's own check)."""
    if not body.strip():
        return None
    try:
        json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        return f"request body is not valid JSON ({exc}); send a JSON object with Content-Type: application/json"
    return None


def as_json_request(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The same headers with Content-Type set to JSON."""
    return [(k, v) for k, v in headers if k.lower() != b"content-type"] + [(b"content-type", JSON)]


class JsonBody:
    """ASGI middleware: a POST body not declared JSON is re-declared JSON if it is, else 400.

    Bodies declared JSON pass straight through. Others are read whole, at most
    ``max_bytes`` (a chunked upload declares no length for BodySizeLimit).
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = list(scope.get("headers") or [])
        if declares_json(dict(headers).get(b"content-type")):
            return await self.app(scope, receive, send)
        body = await _read_body(receive, self.max_bytes)
        if body is None:
            return await openai_error(413, f"request body is larger than {self.max_bytes} bytes")(scope, receive, send)
        problem = json_problem(body)
        if problem is not None:
            return await openai_error(400, problem)(scope, receive, send)
        await self.app({**scope, "headers": as_json_request(headers)}, _replay(body, receive), send)


async def _read_body(receive, max_bytes: int) -> bytes | None:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks)  # disconnected: the app sees what came
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive):
    """A receive that hands the app the body once, then the client's own messages (disconnects)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
