"""A request's time budgets: when it must start, how long it may generate, how long it may stall.

A request that has started is not killed for being slow while its tokens flow
at the class's per-token SLO; it is bounded by three separate budgets:

- **start deadline**: queue wait plus first token, from the class (or shorter
  by the client's ``X-Request-Timeout``). Expiring in the router's queue costs
  no engine work; expiring in prefill aborts the engine request at once.
- **generation budget**: after the first token, ``slack x max_tokens x`` the
  class's TPOT SLO (again cut by the client's timeout, counted from arrival).
- **stall**: no output for ``stall_s`` after the first token is a fault (504,
  engine abort, counted by the circuit).

Pure: no Ray, no asyncio.
"""

from __future__ import annotations

from dataclasses import dataclass

from deployments.router.settings import ClassTargets, QueueSettings
from deployments.router.validation import RequestProblem

TIMEOUT_HEADER = "x-request-timeout"


@dataclass(frozen=True)
class Budgets:
    """Absolute monotonic-clock times and one duration, seconds."""

    arrived_at: float
    start_by: float         # first token by then, or 504 (queued: no engine work; prefill: aborted)
    generation_s: float     # after the first token
    end_by: float | None    # the client's own overall deadline, if it sent one
    stall_s: float

    def finish_by(self, first_token_at: float) -> float:
        end = first_token_at + self.generation_s
        return end if self.end_by is None else min(end, self.end_by)

    @property
    def start_deadline_s(self) -> float:
        return self.start_by - self.arrived_at


def client_timeout_s(requested: str | None) -> float | None | RequestProblem:
    """The client's X-Request-Timeout in seconds; None when absent."""
    if requested is None or not requested.strip():
        return None
    try:
        asked = float(requested)
    except ValueError:
        asked = float("nan")
    if not 0 < asked < float("inf"):  # also catches NaN
        return RequestProblem(
            f"X-Request-Timeout must be a positive number of seconds; got {requested[:40]!r}", TIMEOUT_HEADER)
    return asked


def decide_budgets(targets: ClassTargets, queues: QueueSettings, max_tokens: int, arrived_at: float,
                   requested_timeout: str | None) -> Budgets | RequestProblem:
    """The budgets of one admitted request (``max_tokens`` after admission's clamp)."""
    client = client_timeout_s(requested_timeout)
    if isinstance(client, RequestProblem):
        return client
    start_s = targets.start_deadline_s if client is None else min(client, targets.start_deadline_s)
    return Budgets(
        arrived_at=arrived_at,
        start_by=arrived_at + start_s,
        generation_s=queues.generation_slack * max_tokens * targets.tpot_s + queues.stall_s,
        end_by=None if client is None else arrived_at + client,
        stall_s=queues.stall_s,
    )
