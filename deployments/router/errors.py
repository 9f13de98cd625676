"""Errors in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import json
from typing import Mapping

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

# OpenAI's error `type` for each status the router answers with.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


def openai_error(
    status: int,
    message: str,
    error_type: str | None = None,
    *,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    error_type = error_type or ERROR_TYPES.get(status, "server_error")
    body = {"error": {"message": message, "type": error_type, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


async def _http_exception_to_openai(request: Request, exc: HTTPException) -> JSONResponse:
    # FastAPI's default answers {"detail": ...}; OpenAI clients expect {"error": ...}.
    return openai_error(exc.status_code, str(exc.detail), headers=exc.headers)


def install_openai_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(HTTPException, _http_exception_to_openai)


def sse_error_event(status: int, message: str) -> str:
    """An error inside an SSE stream whose 200 headers are already sent."""
    error = {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": None, "code": status}
    return f"data: {json.dumps({'error': error})}\n\n"
