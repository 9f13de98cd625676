"""Errors in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import json
import re
from typing import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from deployments.observability import metrics
from deployments.router.request_models import FieldError, request_field_names

# OpenAI's error `type` for the statuses that have their own; any other 4xx is the client's
# (invalid_request_error), any other 5xx the server's (server_error).
ERROR_TYPES = {
    401: "authentication_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}
_KNOWN_TYPES = frozenset(ERROR_TYPES.values()) | {"invalid_request_error", "server_error", "permission_error"}


def error_type_for(status: int, given: str | None = None) -> str:
    """OpenAI's error ``type``: ``given`` when it is one of OpenAI's, else the status's. (vLLM and Ray Serve
    LLM put their exception class there: ``BadRequestError``, ``OpenAIHTTPException``.)"""
    if given in _KNOWN_TYPES:
        return given
    return ERROR_TYPES.get(status) or ("invalid_request_error" if 400 <= status < 500 else "server_error")


# Ray Serve LLM wraps an engine's error as "Message: <module.Class: message> (Request ID: ...), Internal
# exception: <the same again>, original exception: ..."; vLLM names the field as "(parameter=NAME, ...)".
_WRAPPED = re.compile(r"^Message: (?:[\w.]+(?:Error|Exception): )?(?P<message>.*?)(?: \(Request ID: [^)]*\))?"
                      r", Internal exception: ", re.S)
_PARAMETER = re.compile(r"\(parameter=(?P<param>[\w.\[\]]+)")
_QUOTED_NAME = re.compile(r"['`\"](?P<name>[a-z_]+)['`\"]")
_NAME = re.compile(r"\b(?P<name>[A-Za-z][a-z_]*)\b")
# Request fields too common as words to be read as a field's name when unquoted.
_PROSE_WORDS = frozenset({"n", "user", "model", "echo", "stream", "messages", "tools"})


def readable(message: str) -> tuple[str, str | None]:
    """An engine error's message as a client should read it (once, without exception classes or the
    request id) and the request field it names, if any: vLLM's ``(parameter=...)`` marker where it
    gives one, else the first request field the message names ("top_k must be -1 (disable), or at least
    1, got -5." names ``top_k``), quoted names first."""
    wrapped = _WRAPPED.match(message)
    if wrapped:
        message = wrapped.group("message")
    named = _PARAMETER.search(message)
    return message.strip(), named.group("param") if named else field_named_in(message)


def field_named_in(message: str) -> str | None:
    """The request field a message is about: the first quoted field name, else the first field name
    written as a word (not one of the common words in ``_PROSE_WORDS``); None when it names none."""
    fields = request_field_names()
    for match in _QUOTED_NAME.finditer(message):
        if match.group("name") in fields:
            return match.group("name")
    for match in _NAME.finditer(message):
        name = match.group("name").lower()
        if name in fields and name not in _PROSE_WORDS:
            return name
    return None


def openai_error(
    status: int,
    message: str,
    error_type: str | None = None,
    *,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
    code: int | str | None = None,
) -> JSONResponse:
    """``code``: OpenAI's error code where it names one (``invalid_api_key``); else the status."""
    error_type = error_type_for(status, error_type)
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code or status}}
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


async def _http_exception_to_openai(request: Request, exc: HTTPException) -> JSONResponse:
    # FastAPI's default answers {"detail": ...}; OpenAI clients expect {"error": ...}.
    if exc.status_code >= 400:
        metrics.refused_at_door(exc.status_code, "http_error")
    return openai_error(exc.status_code, str(exc.detail), headers=exc.headers)


async def _validation_error_to_openai(request: Request, exc: RequestValidationError) -> JSONResponse:
    # Ray's handler puts the offending *input* (a dict, or raw bytes it then
    # cannot serialise) in `param`; OpenAI's param is the field's path.
    first = _most_telling(exc.errors())
    param = param_path(first.get("loc", ()))
    refused = (first.get("ctx") or {}).get("error")
    if isinstance(refused, FieldError):  # vLLM's own check across fields, naming the field
        metrics.refused_at_door(400, "schema")
        prefix = f"Invalid value for '{refused.param}': " if refused.param else "invalid request: "
        return openai_error(400, prefix + refused.message, param=refused.param)
    if first.get("type") == "json_invalid":
        message = f"request body is not valid JSON: {first.get('msg', '')} ({(first.get('ctx') or {}).get('error', '')})"
        param = None
    elif param is None and not isinstance(first.get("input"), dict):
        message = f"request body must be a JSON object: {first.get('msg', 'invalid request')}"
    elif param is None:  # a check across fields (a model validator) of a well-formed object
        message = f"invalid request: {first.get('msg', 'invalid').removeprefix('Value error, ')}"
    else:
        message = _type_mismatch(exc.errors(), param, first) or f"Invalid value for '{param}': {first.get('msg', 'invalid')}"
    metrics.refused_at_door(400, "schema")
    return openai_error(400, message, param=param)


def _most_telling(errors: list[dict]) -> dict:
    """The error to report: the first, unless the same field has one that is not a type mismatch.

    A field declared as a union (``stop``: a string or a list of at most 4) gets an error per member;
    for a list of 500 the first says "Input should be a valid string", the one that tells is the list's
    "at most 4 items"."""
    if not errors:
        return {}
    first = errors[0]
    field = param_path(first.get("loc", ()))
    for error in errors:
        if param_path(error.get("loc", ())) == field and not str(error.get("type", "")).endswith("_type"):
            return error
    return first


# pydantic's type-mismatch error types, as OpenAI's messages name the JSON types.
_JSON_TYPE_OF_ERROR = {"string_type": "a string", "list_type": "an array", "int_type": "an integer",
                       "float_type": "a number", "bool_type": "a boolean", "dict_type": "an object",
                       "model_type": "an object", "model_attributes_type": "an object"}
_JSON_TYPE_OF_VALUE = ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
                       (list, "an array"), (dict, "an object"), (type(None), "null"))


def _type_mismatch(errors: list[dict], param: str, first: dict) -> str | None:
    """OpenAI's own wording where a value's JSON type fits none of its field's union members
    (``"prompt": 123``: "Invalid type for 'prompt': expected a string or an array, but got an integer
    instead."); None where some member took the type and failed on the value (that error tells more)."""
    mine = [e for e in errors if param_path(e.get("loc", ())) == param]
    if len(mine) < 2 or not all(str(e.get("type", "")) in _JSON_TYPE_OF_ERROR for e in mine):
        return None
    named = {_JSON_TYPE_OF_ERROR[str(e["type"])] for e in mine}
    expected = [name for name in dict.fromkeys(_JSON_TYPE_OF_ERROR.values()) if name in named]  # a fixed order
    got = next((name for kind, name in _JSON_TYPE_OF_VALUE if isinstance(first.get("input"), kind)), "another type")
    wanted = expected[0] if len(expected) == 1 else ", ".join(expected[:-1]) + " or " + expected[-1]
    return f"Invalid type for '{param}': expected {wanted}, but got {got} instead."


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "dict", "list", "tuple", "set", "bytes"})


def param_path(loc) -> str | None:
    """pydantic's error location as OpenAI writes a param: ``messages[0].content``.

    The location names union members too (``ChatCompletionUserMessageParam``,
    ``function-after[...]``, ``list[...]``); only field names and indices are kept.
    """
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier() and not part[0].isupper() and part not in _TYPE_TAGS:
            path += f".{part}" if path else part
    return path or None


async def _engine_exception_to_openai(request: Request, exc) -> JSONResponse:
    # Raised by the routes the router inherits from Ray Serve LLM's ingress (GET /v1/models/{id}).
    message, param = readable(exc.message)
    return openai_error(exc.status_code, message, exc.type, param=param)


class ApplicationErrors:
    """Ray Serve LLM's last application-error layer, as a plain ASGI middleware: an exception no handler
    took (the handlers above convert the known ones) becomes an OpenAI-format error, 500 "Internal Server
    Error" unless the exception carries a status (Ray Serve LLM's ``get_response_for_error`` decides it and
    logs it, as before).

    Ray Serve LLM installs that layer as a Starlette ``BaseHTTPMiddleware``, which runs every request in a
    task group of its own and passes every streamed chunk through an in-memory stream; this one only
    watches the response start. An exception after the response started propagates, as it did."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as exc:  # CancelledError is a BaseException: it passes, as before
            if started:
                raise
            await _uncaught_as_openai(Request(scope), exc)(scope, receive, send)


def _uncaught_as_openai(request: Request, exc: Exception) -> JSONResponse:
    from ray.llm._internal.serve.utils.server_utils import get_response_for_error

    error = get_response_for_error(exc, request.headers.get("x-request-id", "")).error
    message, param = readable(error.message)
    return openai_error(error.code, message, error.type, param=param)


def replace_application_error_middleware(app: FastAPI) -> bool:
    """Swap Ray Serve LLM's ``BaseHTTPMiddleware`` error layer in ``app`` for ``ApplicationErrors``, in its
    place; False (and nothing changed) if this Ray's app has no such layer."""
    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware

    for at, middleware in enumerate(app.user_middleware):
        if middleware.cls is BaseHTTPMiddleware and "application_exceptions" in getattr(
                middleware.kwargs.get("dispatch"), "__name__", ""):
            app.user_middleware[at] = Middleware(ApplicationErrors)
            return True
    return False


def install_openai_error_handlers(app: FastAPI) -> None:
    from ray.llm._internal.serve.core.configs.openai_api_models import OpenAIHTTPException

    app.add_exception_handler(HTTPException, _http_exception_to_openai)
    app.add_exception_handler(RequestValidationError, _validation_error_to_openai)
    app.add_exception_handler(OpenAIHTTPException, _engine_exception_to_openai)


def sse_error_event(status: int, message: str) -> str:
    """An error inside an SSE stream whose 200 headers are already sent."""
    error = {"message": message, "type": error_type_for(status), "param": None, "code": status}
    return f"data: {json.dumps({'error': error})}\n\n"
