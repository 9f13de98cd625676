"""Make a router-side give-up reach the engine.

Cancelling the task that iterates a streaming DeploymentHandle response does
not cancel the replica's request (Ray Serve 2.60 only cancels on an explicit
``DeploymentResponseGenerator.cancel()``), so a timed-out or disconnected
request would go on generating. ``TrackingHandle`` wraps the handle that
``OpenAiIngress`` calls and records every response in the current request's
``CallTracker``; the router cancels them when it gives up, and LLMServer's
cancellation makes vLLM abort the request.
"""

from __future__ import annotations

import contextvars
from typing import Any

_current: contextvars.ContextVar["CallTracker | None"] = contextvars.ContextVar("router_calls", default=None)


class CallTracker:
    def __init__(self) -> None:
        self._responses: list[Any] = []
        self._token = _current.set(self)

    def add(self, response: Any) -> None:
        self._responses.append(response)

    def cancel_all(self) -> None:
        for response in self._responses:
            response.cancel()
        self._responses.clear()

    def detach(self) -> None:
        """Stop collecting for this context (the request's handler is done)."""
        _current.reset(self._token)


class _TrackedMethod:
    def __init__(self, method: Any):
        self._method = method

    def remote(self, *args, **kwargs):
        response = self._method.remote(*args, **kwargs)
        tracker = _current.get()
        if tracker is not None:
            tracker.add(response)
        return response


class TrackingHandle:
    """A DeploymentHandle whose method calls are recorded for cancellation."""

    def __init__(self, handle: Any):
        self._handle = handle

    def options(self, **kwargs) -> "TrackingHandle":
        return TrackingHandle(self._handle.options(**kwargs))

    def __getattr__(self, name: str) -> _TrackedMethod:
        return _TrackedMethod(getattr(self._handle, name))
