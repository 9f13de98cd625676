"""Decide a request's deadline: its class timeout, or a shorter one the client asks for."""

from __future__ import annotations

from deployments.router.validation import RequestProblem

TIMEOUT_HEADER = "x-request-timeout"


def decide_timeout_s(class_timeout_s: float, requested: str | None) -> float | RequestProblem:
    """A client may shorten its deadline (seconds, X-Request-Timeout), never extend it."""
    if requested is None or not requested.strip():
        return class_timeout_s
    try:
        asked = float(requested)
    except ValueError:
        asked = float("nan")
    if not asked > 0:  # also catches NaN
        return RequestProblem(f"X-Request-Timeout must be a positive number of seconds; got {requested[:40]!r}", TIMEOUT_HEADER)
    return min(asked, class_timeout_s)
