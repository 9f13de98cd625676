"""Read a POST body as JSON whatever Content-Type the client sent.

FastAPI parses a body as JSON only when it is declared JSON. curl's ``-d``
declares ``application/x-www-form-urlencoded``, some clients send no
Content-Type or ``text/plain``; FastAPI then validates the raw bytes, fails,
and the validation error (which carries those bytes) could not even be
written out: HTTP 500 "Object of type bytes is not JSON serializable". Every
POST endpoint here takes JSON, so a body that parses as JSON is served as JSON
(OpenAI's API does the same); one that does not gets a 400 in OpenAI's format.

Python's ``json`` also reads what strict JSON parsers (OpenAI's included)
refuse, and what then breaks further in: a ``\\ud800`` escape (or its raw
UTF-8 bytes) becomes a lone surrogate, a ``str`` no tokenizer can encode (a 500
before this check), and ``NaN`` / ``Infinity`` become floats that slip through
range checks written as ``x <= limit``. Such a body gets a 400 naming the field.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any, Iterator

from deployments.observability import metrics
from deployments.router.errors import openai_error
from deployments.router.live_settings import current

JSON = b"application/json"
# Cheap pre-filters over the raw bytes, so an ordinary body is not parsed twice:
# a surrogate escape, a raw UTF-8 surrogate, or a non-standard constant.
_SURROGATE_HINT = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")
_CONSTANT_HINT = re.compile(rb"NaN|Infinity")
_SURROGATE = re.compile("[\ud800-\udfff]")


def declares_json(content_type: bytes | None) -> bool:
    """Does this Content-Type already make FastAPI parse the body as JSON?"""
    if not content_type:
        return False
    mime = content_type.split(b";", 1)[0].strip().lower()
    return mime == JSON or (mime.startswith(b"application/") and mime.endswith(b"+json"))


def json_problem(body: bytes, what: str = "request body",
                 hint: str = "send a JSON object with Content-Type: application/json") -> str | None:
    """Why ``body`` is not JSON, or None when it is (an empty body is left to the endpoint's own check).
    ``what``/``hint`` word it for where it came from (an HTTP body, a WebSocket message)."""
    if not body.strip():
        return None
    try:
        json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        return f"{what} is not valid JSON ({exc}); {hint}"
    return None


def strict_json_problem(body: bytes) -> tuple[str, str | None] | None:
    """(why, param) when a parseable body holds what strict JSON refuses: lone surrogates, NaN, Infinity."""
    utf8 = json.detect_encoding(body) == "utf-8"
    if utf8 and not (_SURROGATE_HINT.search(body) or _CONSTANT_HINT.search(body)):
        return None
    try:
        parsed = json.loads(body, parse_constant=_refuse_constant)
    except _NonStandardConstant as constant:
        return f"request body is not valid JSON: {constant} is not a JSON value", None
    except (ValueError, UnicodeDecodeError):
        return None  # not JSON at all: json_problem or FastAPI answers it
    for path in _paths_with_lone_surrogates(parsed, ""):
        return (f"'{path or 'body'}' holds an unpaired UTF-16 surrogate (a \\ud800-\\udfff escape "
                f"without its pair), which is not a Unicode character", path or None)
    return None


class _NonStandardConstant(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _NonStandardConstant(name)


def _paths_with_lone_surrogates(value: Any, path: str) -> Iterator[str]:
    """Where (as OpenAI writes params: ``messages[0].content``) a string or key holds a lone surrogate."""
    if isinstance(value, str):
        if _has_surrogate(value):
            yield path
    elif isinstance(value, dict):
        for original, item in value.items():
            key = original.encode("utf-8", "backslashreplace").decode()  # the path goes into a UTF-8 reply
            child = f"{path}.{key}" if path else key
            if key != original:
                yield child
            yield from _paths_with_lone_surrogates(item, child)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths_with_lone_surrogates(item, f"{path}[{index}]")


def _has_surrogate(text: str) -> bool:
    # json.loads joins a valid escaped pair into one character, so any left is unpaired.
    return _SURROGATE.search(text) is not None


def as_json_request(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The same headers with Content-Type set to JSON."""
    return [(k, v) for k, v in headers if k.lower() != b"content-type"] + [(b"content-type", JSON)]


class JsonBody:
    """ASGI middleware: a POST body not declared JSON is re-declared JSON if it is, else 400;
    a body strict JSON refuses is 400 whatever its Content-Type.

    Bodies are read whole, at most ``admission.max_request_bytes`` (a chunked upload declares no
    length for BodySizeLimit), then replayed to the app; a body that stalls for
    ``admission.body_read_timeout_s`` between parts gets 408.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = list(scope.get("headers") or [])
        admission = current(scope).admission
        max_bytes = admission.max_request_bytes
        try:
            body = await _read_body(receive, max_bytes, admission.body_read_timeout_s)
        except TimeoutError:
            metrics.refused_at_door(408, "body_timeout")
            return await openai_error(408, f"no part of the request body arrived for "
                                           f"{admission.body_read_timeout_s:g}s; send the whole body at once")(
                scope, receive, send)
        if body is None:
            metrics.refused_at_door(413, "body_too_large")
            return await openai_error(413, f"request body is larger than {max_bytes} bytes")(scope, receive, send)
        if not declares_json(dict(headers).get(b"content-type")):
            problem = json_problem(body)
            if problem is not None:
                metrics.refused_at_door(400, "invalid_json")
                return await openai_error(400, problem)(scope, receive, send)
            headers = as_json_request(headers)
        strict = strict_json_problem(body)
        if strict is not None:
            metrics.refused_at_door(400, "strict_json")
            return await openai_error(400, strict[0], param=strict[1])(scope, receive, send)
        await self.app({**scope, "headers": headers}, _replay(body, receive), send)


async def _read_body(receive, max_bytes: int, read_timeout_s: float) -> bytes | None:
    """The whole body; None when over ``max_bytes``. TimeoutError when ``read_timeout_s`` passes with no
    part of it arriving."""
    chunks, size = [], 0
    while True:
        async with asyncio.timeout(read_timeout_s):
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
