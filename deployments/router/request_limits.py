"""Refuse oversized bodies before anything parses them: 413 in OpenAI's format."""

from __future__ import annotations

from deployments.observability import metrics
from deployments.router.errors import openai_error


class BodySizeLimit:
    """ASGI middleware: a declared Content-Length above ``max_bytes`` gets 413.

    HTTP clients (the openai client included) send Content-Length with JSON
    bodies; chunked uploads pass through to the normal limits.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            declared = dict(scope.get("headers") or []).get(b"content-length", b"")
            if declared.isdigit() and int(declared) > self.max_bytes:
                metrics.refused_at_door(413, "body_too_large")
                response = openai_error(413, f"request body is larger than {self.max_bytes} bytes")
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)
