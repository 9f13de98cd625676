"""The web chat page (issue 17): being written; see the issue."""

from __future__ import annotations

from starlette.responses import PlainTextResponse, Response


def page() -> Response:
    return PlainTextResponse("the chat page is not available yet", status_code=404)


def asset(name: str) -> Response:
    return PlainTextResponse("not found", status_code=404)
