"""Refuse oversized bodies before anything parses them: 413 in OpenAI's format."""

from __future__ import annotations

from deployments.observability import metrics
from deployments.router.errors import openai_error
from deployments.router.live_settings import current


class BodySizeLimit:
    """ASGI middleware: a declared Content-Length above ``admission.max_request_bytes`` gets 413.

    HTTP clients (the openai client included) send Content-Length with JSON
    bodies; chunked uploads pass through to the normal limits.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            max_bytes = current(scope).admission.max_request_bytes
            declared = dict(scope.get("headers") or []).get(b"content-length", b"")
            if declared.isdigit() and int(declared) > max_bytes:
                metrics.refused_at_door(413, "body_too_large")
                response = openai_error(413, f"request body is larger than {max_bytes} bytes")
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)
