"""The web chat page, served by the app itself at ``/`` (its files at ``/web/<name>``).

Plain HTML, JavaScript and CSS beside this module: no build step, nothing
fetched from elsewhere at run time (the Content-Security-Policy says so to the
browser too). The page talks to the router over ``/v1/chat/ws``
(``deployments/router/websocket.py``). Only the files listed here are served,
so a request can never name anything else on the disk.
"""

from __future__ import annotations

from pathlib import Path

from starlette.responses import Response

from deployments.router.errors import openai_error

HERE = Path(__file__).resolve().parent
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8"}
ASSETS = ("chat.js", "markdown.js", "chat.css")
# Scripts, styles and the socket from this origin only; no inline script, nothing from the internet.
HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "cache-control": "no-cache",  # a redeployed app's page is picked up at once
}


def _file(name: str) -> Response:
    path = HERE / name
    return Response(path.read_bytes(), media_type=MEDIA_TYPES[path.suffix], headers=HEADERS)


def page() -> Response:
    return _file("index.html")


def asset(name: str) -> Response:
    if name not in ASSETS:
        return openai_error(404, f"no page asset named {name[:80]!r}")
    return _file(name)
