"""Chat turns over a WebSocket (issue 17): being written; see the issue."""

from __future__ import annotations


async def serve_chat_socket(router, websocket) -> None:
    await websocket.close(code=1011, reason="not available yet")
