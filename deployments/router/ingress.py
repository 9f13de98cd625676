"""Router ingress deployment: OpenAI-compatible HTTP on top of ray.serve.llm.

``OpenAiIngress`` already speaks the OpenAI protocol (vLLM's request and
response models, SSE streaming, OpenAI-format errors) and reaches the LLM
replicas through DeploymentHandles; the router extends it rather than copying
it. Per request it: validates, counts prompt tokens, classifies, picks the
LLM pool (one unless the layout has several), admits against that pool's
context, checks the pool's circuit, waits for a slot in the pool's priority
queues, then forwards under the class deadline. The decisions live in the pure modules beside this
one; this file only wires them to Serve and Starlette.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from typing import AsyncIterator, Callable

from fastapi import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ray.llm._internal.serve.core.configs.openai_api_models import OpenAIHTTPException
from ray.llm._internal.serve.core.ingress.ingress import DEFAULT_ENDPOINTS, init
from ray import serve
from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

from deployments.autoscaling.signals import ROUTER_QUEUED, router_queued_metric
from deployments.router.admission import admit
from deployments.router.cancellation import CallTracker, TrackingHandle
from deployments.router.circuit_breaker import CircuitBreaker
from deployments.router.classification import PRIORITY_HEADER, classify
from deployments.router.deadlines import TIMEOUT_HEADER, decide_timeout_s
from deployments.router.errors import install_openai_error_handlers, openai_error, sse_error_event
from deployments.router.pools import PoolRoute, choose_pool, tokens_needed
from deployments.router.replica_counts import follow_replica_counts
from deployments.router.request_limits import BodySizeLimit
from deployments.router.scheduler import PriorityScheduler, QueueFull, QueueTimeout
from deployments.router.settings import CircuitSettings, PriorityClass, QueueSettings, RouterSettings
from deployments.router.tokens import PromptTokenCounter
from deployments.router.validation import RequestProblem, check_chat_messages

# Only what a chat model serves; embeddings, audio and scoring are not offered.
ENDPOINTS = {
    name: DEFAULT_ENDPOINTS[name] for name in ("models", "model_data", "completions", "chat")
} | {
    "health": lambda app: app.get("/health"),
}
SAMPLING_FIELDS = ("temperature", "top_p", "n", "repetition_penalty")
_CHOSEN_POOL: contextvars.ContextVar[str] = contextvars.ContextVar("chosen_pool")


class Router(OpenAiIngress):
    def __init__(
        self,
        llm_deployments,
        model_cards,
        *,
        pool_deployments: dict,
        pool_routes: list[dict],
        router_settings: dict,
        tokenizer_source: str,
        **kwargs,
    ):
        super().__init__(llm_deployments, model_cards, **kwargs)
        self._settings = RouterSettings.model_validate(router_settings)
        self._tokens = PromptTokenCounter(tokenizer_source)
        self._pools = {
            route["name"]: _Pool(PoolRoute.from_dict(route), pool_deployments[route["name"]],
                                 QueueSettings.model_validate(route["queues"]), self._settings.circuit)
            for route in pool_routes
        }
        self._routes = [pool.route for pool in self._pools.values()]
        self._replica_watch: asyncio.Task | None = None

    def _follow_replicas(self) -> None:
        """Start (once, on the replica's event loop) keeping each pool's window sized to its replicas."""
        if self._replica_watch is None:
            self._replica_watch = asyncio.create_task(
                follow_replica_counts(serve.get_replica_context().app_name, self._apply_replica_counts))

    def _apply_replica_counts(self, counts: dict) -> None:
        for pool in self._pools.values():
            pool.scheduler.set_replicas(counts.get(pool.handle.deployment_name, 1))

    # --- endpoints ---------------------------------------------------------------

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        problem = check_chat_messages(body.messages)
        if problem is not None:
            return _problem_response(problem, request)
        return await self._serve(body, request, "chat", lambda: self._tokens.chat(body.messages))

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        return await self._serve(body, request, "completions", lambda: self._tokens.completion(body.prompt))

    async def health(self) -> JSONResponse:
        """Ready when every pool's replicas answer their engine health check."""
        unhealthy, pools = {}, {}
        for name, pool in self._pools.items():
            try:
                await pool.handle.check_health.remote()
                engine_load = await pool.handle.engine_load.remote()  # one replica's view
            except Exception as exc:  # any failure means "not ready", reported, not raised
                unhealthy[name] = f"{type(exc).__name__}: {exc}"[:500]
                continue
            pools[name] = pool.describe() | {"engine_load": engine_load}
        if unhealthy:
            return openai_error(503, f"model replicas unhealthy: {unhealthy}")
        return JSONResponse({"status": "ok", "models": sorted(self._model_cards), "pools": pools})

    def _get_configured_serve_handle(self, model_id: str):
        # Called by OpenAiIngress inside _process_llm_request, in the request's
        # own task: the pool chosen for it is in _CHOSEN_POOL.
        return TrackingHandle(self._pools[_CHOSEN_POOL.get()].streaming_handle)

    async def record_autoscaling_stats(self) -> dict:
        """Queued requests per pool, for the application's autoscaling policy."""
        self._follow_replicas()
        per_pool = {router_queued_metric(name): float(pool.queued) for name, pool in self._pools.items()}
        return {ROUTER_QUEUED: sum(per_pool.values()), **per_pool}

    # --- the pipeline ------------------------------------------------------------

    async def _serve(self, body, request: Request, call_method: str, count_tokens: Callable[[], int]) -> Response:
        headers = {"x-request-id": request.state.request_id}
        self._follow_replicas()
        await self._get_model_id(body.model)  # unknown model: 404 before any work
        # Tokenising a 1 MB prompt takes a while; keep the event loop free.
        prompt_tokens = await asyncio.to_thread(count_tokens)
        decided = self._classify_and_admit(body, request, prompt_tokens)
        if isinstance(decided, RequestProblem):
            return _problem_response(decided, request)
        body, cls, admitted, pool = decided
        timeout_s = decide_timeout_s(pool.queue_settings.timeouts_s[cls.label], request.headers.get(TIMEOUT_HEADER))
        if isinstance(timeout_s, RequestProblem):
            return _problem_response(timeout_s, request)
        headers["x-priority-class"] = cls.label
        headers["x-llm-pool"] = pool.route.name
        headers["x-prompt-tokens"] = str(prompt_tokens)
        headers["x-max-tokens-applied"] = str(admitted.max_tokens)

        retry_after = pool.circuit.try_pass()
        if retry_after is not None:
            return openai_error(503, f"model replicas of pool {pool.route.name!r} are failing; circuit open",
                                headers=headers | {"retry-after": str(retry_after)})
        outcome = _Outcome(pool.circuit)
        _CHOSEN_POOL.set(pool.route.name)
        try:
            return await self._dispatch(body, request, call_method, cls, timeout_s, headers, outcome, pool)
        finally:
            outcome.abandon_if_unsettled()

    def _classify_and_admit(self, body, request: Request, prompt_tokens: int):
        classification = classify(prompt_tokens, request.headers.get(PRIORITY_HEADER), self._settings.classification)
        if isinstance(classification, RequestProblem):
            return classification
        fields = {name: getattr(body, name, None) for name in SAMPLING_FIELDS}
        fields["max_tokens"] = getattr(body, "max_completion_tokens", None) or body.max_tokens
        admission = self._settings.admission
        needed = tokens_needed(prompt_tokens, fields["max_tokens"], admission.max_tokens_cap)
        pool = self._pools[choose_pool(classification.priority, needed, self._routes).name]
        admitted = admit(fields, prompt_tokens, pool.route.max_model_len, admission)
        if isinstance(admitted, RequestProblem):
            return admitted
        updates = dict(admitted.updates)
        if hasattr(body, "max_completion_tokens"):
            updates["max_completion_tokens"] = admitted.max_tokens
        if pool.route.engine_priority:
            updates["priority"] = int(classification.priority)
        return body.model_copy(update=updates), classification.priority, admitted, pool

    async def _dispatch(self, body, request, call_method, cls: PriorityClass, timeout_s: float, headers, outcome,
                        pool: "_Pool") -> Response:
        deadline = time.monotonic() + timeout_s
        scheduler = pool.scheduler
        try:
            waited = await scheduler.acquire(cls, timeout_s)
        except QueueFull as full:
            retry = {"retry-after": str(pool.queue_settings.retry_after_s)}
            return openai_error(429, f"{full}; retry later", headers=headers | retry)
        except QueueTimeout as late:
            return openai_error(504, f"deadline of {timeout_s:.0f}s passed: {late}", headers=headers)
        headers["x-queue-wait-ms"] = f"{waited * 1000:.0f}"
        slot = _Slot(scheduler, cls)
        calls = CallTracker()
        try:
            async with asyncio.timeout(deadline - time.monotonic()):
                response = await self._process_llm_request(body, call_method=call_method, raw_request=request)
        except TimeoutError:
            calls.cancel_all()  # the replica's request is cancelled; vLLM aborts it
            slot.release()
            outcome.settle(ok=False)
            return openai_error(504, f"deadline of {timeout_s:.0f}s passed while generating", headers=headers)
        except OpenAIHTTPException as exc:
            slot.release()
            outcome.settle(ok=exc.status_code < 500)
            return openai_error(exc.status_code, exc.message, exc.type, headers=headers)
        except Exception as exc:
            slot.release()
            outcome.settle(ok=False)
            return openai_error(503, f"model replicas unavailable: {type(exc).__name__}", headers=headers | {"retry-after": "1"})
        except BaseException:  # client went away (CancelledError): free the slot, settle nothing
            calls.cancel_all()
            slot.release()
            raise
        finally:
            calls.detach()
        if isinstance(response, StreamingResponse):
            response.body_iterator = _guard_stream(response.body_iterator, deadline, timeout_s, slot, outcome, calls)
        else:
            slot.release()
            outcome.settle(ok=True)
        response.headers.update(headers)
        return response


class _Pool:
    """One LLM deployment behind the router, with its own queues, window and circuit."""

    def __init__(self, route: PoolRoute, handle, queues: QueueSettings, circuit: CircuitSettings):
        self.route, self.handle = route, handle
        self.streaming_handle = handle.options(stream=True)
        self.queue_settings = queues
        self.scheduler = PriorityScheduler(queues)
        self.circuit = CircuitBreaker(circuit)

    @property
    def queued(self) -> int:
        return sum(self.scheduler.depths().values())

    def describe(self) -> dict:
        return {"classes": sorted(self.route.classes), "max_model_len": self.route.max_model_len,
                "circuit": self.circuit.state.value, "queued": self.scheduler.depths(),
                "in_flight": self.scheduler.in_flight, "replicas": self.scheduler.replicas}


class _Slot:
    """A concurrency-window slot, released exactly once."""

    def __init__(self, scheduler: PriorityScheduler, cls: PriorityClass):
        self._scheduler, self._cls, self._held = scheduler, cls, True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._scheduler.release(self._cls)


class _Outcome:
    """Reports one request's result to the circuit breaker exactly once."""

    def __init__(self, circuit: CircuitBreaker):
        self._circuit, self._settled, self._streaming = circuit, False, False

    def settle(self, ok: bool) -> None:
        if not self._settled:
            self._settled = True
            (self._circuit.record_success if ok else self._circuit.record_failure)()

    def hand_over_to_stream(self) -> None:
        self._streaming = True

    def abandon_if_unsettled(self) -> None:
        # A request that never reached a replica (rejected, queued out, client
        # gone) says nothing about the replicas; only give back a probe turn.
        if not self._settled and not self._streaming:
            self._settled = True
            self._circuit.abandon()


async def _guard_stream(
    chunks: AsyncIterator[str], deadline: float, timeout_s: float, slot: _Slot, outcome: _Outcome, calls: CallTracker
):
    """Enforce the deadline between chunks; free the slot however the stream ends."""
    outcome.hand_over_to_stream()
    completed = False
    try:
        while True:
            try:
                chunk = await asyncio.wait_for(anext(chunks), deadline - time.monotonic())
            except StopAsyncIteration:
                completed = True
                outcome.settle(ok=True)
                return
            except TimeoutError:
                outcome.settle(ok=False)
                yield sse_error_event(504, f"deadline of {timeout_s:.0f}s passed while streaming")
                yield "data: [DONE]\n\n"
                return
            yield chunk
    finally:
        slot.release()
        if not completed:  # deadline or client gone: the replica aborts the request
            calls.cancel_all()
        await chunks.aclose()


def _problem_response(problem: RequestProblem, request: Request) -> JSONResponse:
    return openai_error(problem.status, problem.message, param=problem.param,
                        headers={"x-request-id": request.state.request_id})


def router_ingress_class(max_request_bytes: int) -> type:
    """The Router class wired to its FastAPI app, ready for serve.deployment."""
    app = init()  # ray.serve.llm's app: request ids, CORS, HTTP metrics, error middleware
    install_openai_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=max_request_bytes)
    return make_fastapi_ingress(Router, endpoint_map=ENDPOINTS, app=app)
