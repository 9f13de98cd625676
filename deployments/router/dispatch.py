"""One admitted request's life in the router, from the door to the last byte, in one place.

``RequestPlan`` is what the HTTP layer decided (class, pool, budgets, the
headers to send); ``RequestLife.run`` carries it out: it refuses at once what
cannot be served in time (loading pool, open circuit, predicted wait beyond
the start deadline), waits for a window slot, calls the replica under the
start deadline, then guards a stream with the generation budget and the stall
timeout. It alone releases the slot, cancels the engine work when the router
gives up, and tells the circuit what happened:

=====================================  ==========  ===========================
what happened                          status      circuit
=====================================  ==========  ===========================
served                                 200         success
refused: loading / circuit / predicted 503 / 429   -
queue slower than predicted (shed)     429         - (no engine work was spent)
start deadline passed in the queue     429         - (no engine work was spent)
X-Request-Timeout passed in the queue  504         - (no engine work was spent)
start deadline passed in prefill       504         - (aborted in the engine)
generation budget passed               504         - (aborted in the engine)
no output for ``stall_s``              504         opens it (aborted)
replica error / dead engine            503 / 5xx   fault
client error reported by the engine    4xx         -
client went away                       -           - (aborted in the engine)
=====================================  ==========  ===========================
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Awaitable, Callable

from starlette.responses import Response, StreamingResponse

from ray.llm._internal.serve.core.configs.openai_api_models import OpenAIHTTPException

from deployments.observability import metrics
from deployments.observability.tracing import RequestTrace
from deployments.router.budgets import TIMEOUT_HEADER, Budgets
from deployments.router.cancellation import CallTracker
from deployments.router.errors import openai_error, readable, sse_error_event
from deployments.router.forecast import admits
from deployments.router.pool import PoolState
from deployments.router.scheduler import QueueFull, QueueTimeout, Shed
from deployments.router.settings import PriorityClass
from deployments.tenancy.fairness import cost

if TYPE_CHECKING:
    from deployments.router.tenants import TenantUse


@dataclass
class RequestPlan:
    """What the HTTP layer decided for one request; ``headers`` go on every answer."""

    cls: PriorityClass
    pool: str
    max_tokens: int
    budgets: Budgets
    stream: bool
    headers: dict[str, str] = field(default_factory=dict)
    prompt_tokens: int = 0
    trace: RequestTrace = field(default_factory=RequestTrace.disabled)
    # Its tenant (router/tenants.py): quota to settle at the end, and the weighted tokens it may
    # cost, charged to the tenant's fair-sharing counter when it starts (tenancy/fairness.py).
    tenant: "TenantUse | None" = None
    cost: float = 0.0
    choices: int = 1  # the request's `n`: each choice may produce max_tokens

    @property
    def tokens_reserved(self) -> int:
        """The most tokens it may use: its prompt and, per choice, max_tokens (the tenant's quota takes these)."""
        return self.prompt_tokens + self.max_tokens * self.choices


def _seconds(value: float) -> str:
    """A duration for a message: whole seconds from 10 s, else to a tenth, never below 0 ("0.3s", "30s")."""
    value = max(0.0, value)
    return f"{value:.0f}s" if value >= 10 else f"{value:.1f}s"


def engine_error_in(chunk: str) -> tuple[int, str] | None:
    """(code, message) when an SSE chunk from the replica carries an OpenAI error event, else None.
    ray.serve.llm forwards an engine failure during a stream as such an event and then ends the stream
    normally, so without this a dead engine's stream would count as served."""
    if '"error"' not in chunk:  # the common case, without parsing
        return None
    for line in chunk.splitlines():
        if not line.startswith("data: {"):
            continue
        try:
            error = json.loads(line[len("data: "):]).get("error")
        except ValueError:
            continue
        if isinstance(error, dict):
            code = error.get("code")
            return (code if isinstance(code, int) else 500), str(error.get("message", ""))
    return None


def _usage_tokens(text) -> int | None:
    """``usage.completion_tokens`` of a whole answer's body, or of a stream's usage event; None if absent."""
    try:
        if isinstance(text, (bytes, bytearray)):
            text = text.decode("utf-8", "replace")
        at = text.rfind('"completion_tokens":')
        if at < 0:
            return None
        digits = text[at + len('"completion_tokens":'):].lstrip()[:12]
        end = next((i for i, ch in enumerate(digits) if not ch.isdigit()), len(digits))
        return int(digits[:end]) if end else None
    except Exception:
        return None


class _Slot:
    """A window slot, released exactly once; the pool knows what holds it (class, max_tokens)."""

    def __init__(self, pool: PoolState, cls: PriorityClass, max_tokens: int, tenant: str = ""):
        self._pool, self._cls, self._tenant, self._held = pool, cls, tenant, True
        pool.started(self, cls, max_tokens)

    def first_token(self) -> None:
        self._pool.first_token(self)

    def release(self) -> None:
        if self._held:
            self._held = False
            self._pool.finished(self)
            self._pool.scheduler.release(self._cls, self._tenant)


class RequestLife:
    """Runs one ``RequestPlan`` against its pool. ``call`` makes the replica call and returns its Response."""

    def __init__(self, plan: RequestPlan, pool: PoolState, clock: Callable[[], float] = time.monotonic):
        self.plan, self.pool, self._clock = plan, pool, clock
        self._settings = pool.queue_settings
        self._recorded = False
        self._started_at: float | None = None
        self._first_token_at: float | None = None

    def _error(self, status: int, message: str, error_type: str | None = None, *, reason: str,
               param: str | None = None, **extra_headers) -> Response:
        self._finished(status, reason)
        return openai_error(status, message, error_type, param=param, headers=self.plan.headers | extra_headers)

    def _finished(self, status: int, reason: str, output_tokens: int | None = None) -> None:
        """Record the request's outcome once (metrics), and what its engine work cost and delivered."""
        if self._recorded:
            return
        self._recorded = True
        try:
            self._record(status, reason, output_tokens)
        except Exception:  # metrics must never fail a request
            metrics.logger.debug("could not record a request's metrics", exc_info=True)
        self.plan.trace.finish(status, reason, **{"llm.output_tokens": output_tokens})
        self._settle_tenant(status, output_tokens)

    def _settle_tenant(self, status: int, output_tokens: int | None) -> None:
        """Give the tenant's unused quota back, and correct its fair-sharing charge to the tokens produced."""
        tenant, started = self.plan.tenant, self._started_at is not None
        try:
            if started and output_tokens is not None:
                produced = cost(self.plan.prompt_tokens, output_tokens)
                self.pool.scheduler.settle(self._tenant, produced - self.plan.cost)
            if tenant is not None:
                tenant.finished(status, self.plan.prompt_tokens, output_tokens, started)
        except Exception:  # bookkeeping must never fail a request
            metrics.logger.warning("could not settle a request's tenant usage", exc_info=True)

    def _record(self, status: int, reason: str, output_tokens: int | None) -> None:
        pool, cls = self.plan.pool, self.plan.cls.label
        metrics.request_finished(pool, cls, status, reason)
        if self._started_at is None:  # never reached an engine
            return
        now, arrived = self._clock(), self.plan.budgets.arrived_at
        served = status == 200
        ttft = tpot = None
        if self._first_token_at is not None:
            ttft = self._first_token_at - arrived
            if output_tokens and output_tokens > 1:
                tpot = (now - self._first_token_at) / (output_tokens - 1)
        within = False
        if served:
            slo = self._settings.targets(self.plan.cls)
            if ttft is not None:  # a stream: TTFT and TPOT measured
                within = ttft <= slo.ttft_s and (tpot is None or tpot <= slo.tpot_s)
            else:  # a whole answer: its end by the TTFT SLO plus its tokens at the TPOT SLO
                within = now - arrived <= slo.ttft_s + max(0, (output_tokens or 1) - 1) * slo.tpot_s
        metrics.engine_work(pool, cls, prompt_tokens=self.plan.prompt_tokens, output_tokens=output_tokens,
                            served=served, ttft_s=ttft, tpot_s=tpot, e2e_s=now - arrived if served else None,
                            within_slo=within, wasted_reason=None if served else reason)

    @property
    def _tenant(self) -> str:
        return self.plan.tenant.tenant if self.plan.tenant else ""

    async def run(self, call: Callable[[], Awaitable[Response]]) -> Response:
        try:
            return await self._run(call)
        except BaseException:  # the client went away (in the queue or the call); nothing else raises here
            self._finished(499, "client_gone")  # a no-op where already settled
            raise

    async def _run(self, call: Callable[[], Awaitable[Response]]) -> Response:
        trace = self.plan.trace
        trace.begin("router.admission")
        refused = self._refusal()
        if refused is not None:
            return refused
        trace.end("router.admission")
        trace.begin("router.queue")
        waited = await self._acquire()
        if isinstance(waited, Response):
            return waited
        trace.end("router.queue", **{"llm.queue_wait_s": waited})
        self.plan.headers["x-queue-wait-ms"] = f"{waited * 1000:.0f}"
        metrics.queue_waited(self.plan.pool, self.plan.cls.label, waited)
        self._started_at = self._clock()
        return await self._call(call, _Slot(self.pool, self.plan.cls, self.plan.max_tokens, self._tenant))

    def _refusal(self) -> Response | None:
        """503 while the pool cannot serve at all; 429 when it could not start this request in time."""
        unavailable = self.pool.unavailable()
        if unavailable is not None:
            reason, retry_after = unavailable
            return self._error(503, reason, reason="circuit_open" if getattr(self.pool, "ready", True) else "loading",
                               **{"retry-after": str(retry_after)})
        budgets, now, within = self.plan.budgets, self._clock(), self._settings.admit_within
        if budgets.end_by is not None:
            # No wait or retry makes an engine faster than it is alone: a 400 the client can act on, not a 429.
            alone_s = self.pool.alone_s(self.plan.max_tokens)
            if alone_s is not None and alone_s > budgets.end_by - budgets.arrived_at:
                return self._error(
                    400, f"X-Request-Timeout of {_seconds(budgets.end_by - budgets.arrived_at)} is shorter than "
                         f"this request needs with the engine to itself: about {_seconds(alone_s)} to generate "
                         f"max_tokens {self.plan.max_tokens}; raise the timeout or lower max_tokens",
                    param=TIMEOUT_HEADER, reason="client_timeout_too_short")
        forecast = self.pool.forecast(self.plan.cls, self.plan.max_tokens, self._tenant)
        if not admits(forecast, budgets.start_by - now, within):
            return self._error(
                429, f"the {self.plan.cls.label} class would wait about {forecast.seconds:.1f}s to start, beyond "
                     f"its start deadline of {_seconds(budgets.start_by - now)}; retry later",
                reason="predicted_wait", **{"retry-after": str(forecast.retry_after_s)})
        if budgets.end_by is not None:
            # The client's own deadline bounds the whole request: refuse now what could not finish
            # by then even at the engine's current speed, instead of spending engine time on an
            # answer nobody will read.
            joining = self.pool.scheduler.in_flight + self.pool.scheduler.ahead_of(self.plan.cls, self._tenant)
            finish_s = forecast.seconds + self.pool.decode_s(self.plan.cls, self.plan.max_tokens, joining)
            if finish_s > within * (budgets.end_by - now):
                return self._error(
                    429, f"this request would take at least {finish_s:.1f}s (wait and generation), beyond its "
                         f"X-Request-Timeout of {_seconds(budgets.end_by - budgets.arrived_at)}; retry later",
                    reason="client_timeout_forecast", **{"retry-after": str(forecast.retry_after_s)})
        return None

    async def _acquire(self) -> float | Response:
        start_s = self.plan.budgets.start_by - self._clock()
        try:
            return await self.pool.scheduler.acquire(self.plan.cls, start_s, self.plan.max_tokens, self._tenant,
                                                     self.plan.cost)
        except QueueFull as full:
            forecast = self.pool.forecast(self.plan.cls, self.plan.max_tokens, self._tenant)
            return self._error(429, f"{full}; retry later", reason="shed" if isinstance(full, Shed) else "queue_full",
                               **{"retry-after": str(forecast.retry_after_s)})
        except QueueTimeout as late:
            budgets = self.plan.budgets
            if budgets.end_by is not None and budgets.end_by <= budgets.start_by:  # the client's own timeout
                return self._error(504, f"X-Request-Timeout of {budgets.start_deadline_s:.0f}s passed while "
                                        f"queued ({late}); no engine work was spent", reason="client_timeout_queued")
            # Never started: a refusal for load, like a shed, not a server fault.
            forecast = self.pool.forecast(self.plan.cls, self.plan.max_tokens, self._tenant)
            return self._error(429, f"the {self.plan.cls.label} class could not start within its start deadline "
                                    f"of {budgets.start_deadline_s:.0f}s ({late}); no engine work was spent; "
                                    "retry later", reason="queue_expired", **{"retry-after": str(forecast.retry_after_s)})

    async def _call(self, call: Callable[[], Awaitable[Response]], slot: _Slot) -> Response:
        budgets = self.plan.budgets
        # A stream's call returns at its first token; a whole response only at its end.
        deadline = budgets.start_by if self.plan.stream else budgets.finish_by(budgets.start_by)
        calls = CallTracker()
        self.plan.trace.begin("router.replica_call")
        try:
            async with asyncio.timeout(max(0.0, deadline - self._clock())):
                response = await call()
        except TimeoutError:
            calls.cancel_all()  # the replica's request is cancelled; vLLM aborts it
            slot.release()
            if self.plan.stream:
                what, reason = "start deadline", "start_deadline"
            elif deadline == budgets.end_by:  # a whole answer: the client's timeout
                what, reason = "X-Request-Timeout", "client_timeout"
            else:  # or the start deadline plus the generation budget
                what, reason = "deadline (start + generation)", "deadline"
            return self._error(504, f"{what} of {deadline - budgets.arrived_at:.0f}s passed before the answer; "
                                    "the engine request was aborted", reason=reason)
        except OpenAIHTTPException as exc:
            slot.release()
            if exc.status_code >= 500:
                self.pool.circuit.record_failure(f"engine error {exc.status_code}: {exc.message}"[:300])
            message, param = readable(exc.message)
            return self._error(exc.status_code, message, exc.type, param=param,
                               reason=metrics.engine_reason(exc.status_code))
        except Exception as exc:  # the replica or its engine failed
            calls.cancel_all()
            slot.release()
            self.pool.circuit.record_failure(f"replica call failed: {type(exc).__name__}: {exc}"[:300])
            return self._error(503, f"model replicas unavailable: {type(exc).__name__}", reason="replica_error",
                               **{"retry-after": "1"})
        except BaseException:  # client went away (CancelledError): free the slot, abort, settle nothing
            calls.cancel_all()
            slot.release()
            self._finished(499, "client_gone")
            raise
        finally:
            calls.detach()
        if isinstance(response, StreamingResponse):
            slot.first_token()  # a stream's call returns at its first token
            self._first_token_at = self._clock()
            self.plan.trace.end("router.replica_call")
            self.plan.trace.event("first_token")
            self.plan.trace.begin("router.stream")
            response.body_iterator = self._guard_stream(response.body_iterator, slot, calls)
        else:
            slot.release()
            self._served()
            status = response.status_code
            self._finished(status, "ok" if status == 200 else metrics.engine_reason(status),
                           _usage_tokens(getattr(response, "body", b"")))
        response.headers.update(self.plan.headers)
        return response

    def _served(self) -> None:
        self.pool.circuit.record_success()
        first_token_s = None if self._first_token_at is None else self._first_token_at - self._started_at
        self.pool.service[self.plan.cls].record(self._clock() - self._started_at, self.plan.max_tokens, first_token_s)

    async def _guard_stream(self, chunks: AsyncIterator[str], slot: _Slot, calls: CallTracker):
        """Enforce the generation budget and the stall timeout between chunks; clean up however it ends."""
        budgets = self.plan.budgets
        finish_by = budgets.finish_by(self._clock())
        completed = False
        # What the stream delivered, counted per chunk in C (str.count) and settled once at its end:
        # SSE events; the usage event's tokens when the client asked for one (exact), else the events.
        events, role_events, tail = 0, 0, ("", "")
        status, reason = 499, "client_gone"
        try:
            while True:
                left = finish_by - self._clock()
                try:
                    # asyncio.timeout, not wait_for: on Python 3.11 wait_for makes a Task per chunk.
                    async with asyncio.timeout(max(0.0, min(left, budgets.stall_s))):
                        chunk = await anext(chunks)
                except StopAsyncIteration:
                    completed = True
                    self._served()
                    status, reason = 200, "ok"
                    return
                except TimeoutError:
                    if left <= budgets.stall_s:
                        message = (f"generation budget of {finish_by - budgets.arrived_at:.0f}s passed "
                                   "(max_tokens at the class's per-token SLO, with slack)")
                    else:
                        message = f"no output for {budgets.stall_s:.0f}s; the engine request was aborted"
                        self.pool.circuit.trip(f"stall: {message}")  # a hung engine: open now, probe later
                    status, reason = 504, "generation_budget" if left <= budgets.stall_s else "stall"
                    yield sse_error_event(504, message)
                    yield "data: [DONE]\n\n"
                    return
                except Exception as exc:  # the replica died mid-stream
                    self.pool.circuit.record_failure(f"replica failed mid-stream: {type(exc).__name__}: {exc}"[:300])
                    status, reason = 503, "replica_error"
                    yield sse_error_event(503, f"model replica failed mid-stream: {type(exc).__name__}")
                    yield "data: [DONE]\n\n"
                    return
                failed = engine_error_in(chunk)
                if failed is not None:  # the engine reported an error inside the stream (say, it died)
                    code, message = failed
                    if code >= 500:
                        self.pool.circuit.record_failure(f"engine error mid-stream: {message}"[:300])
                    status, reason = code, metrics.engine_reason(code)
                    yield chunk
                    if not chunk.rstrip().endswith("data: [DONE]"):
                        yield "data: [DONE]\n\n"
                    return
                if not events:  # a chat stream's first event (one per choice) names the role, no token
                    role_events = chunk.count('"role"')
                events += chunk.count("data: ")
                tail = (tail[1], chunk)
                if chunk.rstrip().endswith("data: [DONE]"):
                    # The whole answer. A client that closes on [DONE] (the openai library does) is gone
                    # before the replica's stream reports its end, at this very yield: served, not gone.
                    status, reason = 200, "ok"
                yield chunk
        finally:
            slot.release()
            if not completed and status == 200:
                completed = True
                self._served()
            if not completed:  # budget, stall or client gone: the replica aborts the request
                calls.cancel_all()
            tokens = _usage_tokens("".join(tail))
            if tokens is None:  # no usage event: one token per event, less the role and [DONE] events
                tokens = max(0, events - role_events - tail[1].count("[DONE]"))
            self._finished(status, reason, tokens)
            await chunks.aclose()
