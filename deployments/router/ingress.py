"""Router ingress deployment: OpenAI-compatible HTTP on top of ray.serve.llm.

``OpenAiIngress`` already speaks the OpenAI protocol (vLLM's request and
response models, SSE streaming, OpenAI-format errors) and reaches the LLM
replicas through DeploymentHandles; the router extends it rather than copying
it. This file only does HTTP: per request it validates, counts prompt tokens,
classifies, picks the LLM pool, admits against that pool's context and sets
the request's budgets, all decided by the pure modules beside it, and hands
the resulting ``RequestPlan`` to ``dispatch.RequestLife``, which owns the rest
of the request's life.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from typing import Callable

from fastapi import Request, WebSocket
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response

from ray.llm._internal.serve.core.ingress.ingress import DEFAULT_ENDPOINTS, init
from ray import serve
from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress
from ray.llm._internal.serve.core.configs.openai_api_models import ModelCard

from deployments.config.names import ROUTER_QUEUED, router_queued_metric
from deployments.observability import metrics
from deployments.observability.tracing import RequestTrace
from deployments.router.admission import admit, sequences
from deployments.router.budgets import TIMEOUT_HEADER, decide_budgets
from deployments.router.cancellation import TrackingHandle
from deployments.router.classification import PRIORITY_HEADER, classify
from deployments.router.dispatch import RequestLife, RequestPlan
from deployments.router.errors import (install_openai_error_handlers, openai_error,
                                      replace_application_error_middleware)
from deployments.router import openapi
from deployments.router.json_body import JsonBody
from deployments.router.pool import PoolState
from deployments.router.pools import PoolRoute, choose_pool, tokens_needed
from deployments.router.replica_counts import follow_replica_counts
from deployments.router.request_limits import BodySizeLimit
from deployments.router.request_models import ChatCompletionRequest, CompletionRequest
from deployments.router.live_settings import LiveCors, publish
from deployments.router.settings import RouterSettings, queue_settings_for, settings_digest
from deployments.router.tenants import ApiKeyAuth, TenantGate, rate_limited, unauthorized
from deployments.tenancy.fairness import cost
from deployments.tenancy.ledger import RateLimited
from deployments.tenancy.tenants import AuthFailure
from deployments.router.tokens import PromptTokenCounter, PromptTokens
from deployments.router.websocket import serve_chat_socket
from deployments import web
from deployments.router.validation import (RequestProblem, check_chat_messages, check_chat_template_kwargs,
                                           check_token_ids, TOKEN_ID_FIELDS)

# Only what a chat model serves; embeddings, audio and scoring are not offered.
# Each route declares the statuses it really answers, for /openapi.json.
ENDPOINTS = {
    "models": DEFAULT_ENDPOINTS["models"],
    "model_data": lambda app: app.get("/v1/models/{model:path}", response_model=ModelCard,
                                      responses=openapi.MODEL_RESPONSES),
    "completions": lambda app: app.post("/v1/completions", responses=openapi.COMPLETION_RESPONSES),
    "chat": lambda app: app.post("/v1/chat/completions", responses=openapi.CHAT_RESPONSES),
    "health": lambda app: app.get("/health", responses=openapi.HEALTH_RESPONSES),
    # The web chat: a socket that streams one chat turn after another (router/websocket.py),
    # and the page that uses it (deployments/web/).
    "chat_socket": lambda app: app.websocket("/v1/chat/ws"),
    "page": lambda app: app.get("/", include_in_schema=False),
    "page_asset": lambda app: app.get("/web/{name}", include_in_schema=False),
}
SAMPLING_FIELDS = ("temperature", "top_p", "n", "repetition_penalty")
_CHOSEN_POOL: contextvars.ContextVar[str] = contextvars.ContextVar("chosen_pool")
logger = logging.getLogger("ray.serve")


class Router(OpenAiIngress):
    def __init__(
        self,
        llm_deployments,
        model_cards,
        *,
        pool_deployments: dict,
        pool_routes: list[PoolRoute],
        queue_overrides: dict[str, dict],
        tokenizer_source: str,
        tenant_ledger,
        **kwargs,
    ):
        """``pool_routes``: the pools in routing order; ``queue_overrides``: per pool, its profile's
        ``router_queues`` (merged over the settings' queues on every reconfigure)."""
        super().__init__(llm_deployments, model_cards, **kwargs)
        self._tokens = PromptTokenCounter(tokenizer_source, max(route.max_model_len for route in pool_routes))
        self._replica_id = serve.get_replica_context().replica_id.unique_id
        self._tenants = TenantGate(tenant_ledger, self._replica_id)
        self._queue_overrides = queue_overrides
        self._reconfigured, self._rejected = False, None  # a user_config applied yet; the last one refused
        self._routes = list(pool_routes)
        self._pools: dict[str, PoolState] = {}
        self._apply(RouterSettings(), {route.name: pool_deployments[route.name] for route in pool_routes},
                    next(iter(model_cards)))
        self._background: list[asyncio.Task] = []

    async def reconfigure(self, user_config: dict) -> None:
        """Serve's hook for the deployment's ``user_config`` (the router's settings), at start and on every
        ``serve deploy`` that changes it, without a restart.

        Settings that do not validate (for any pool) fail a starting replica: pydantic.ValidationError,
        and Serve reports the deploy failed. A running replica keeps the settings it has instead, logs
        the error and shows it on /health (``router_settings_rejected``): Serve would stop a replica whose
        reconfigure raised and start ones that fail the same way, so a typo would take the service down.
        ``python -m deployments.config.app_args`` checks a config before it is deployed.

        The pools' readiness watch starts here, before Serve routes to the replica: a router replica
        added to a running app then answers as soon as its first probe has (a lazy start would answer
        its first requests 503, "the model is loading")."""
        try:
            settings = RouterSettings.model_validate(user_config or {})
            self._apply(settings)
        except Exception as exc:  # invalid settings (ValidationError), or a tenants file missing or unparsable
            if not self._reconfigured:
                raise
            self._rejected = f"{type(exc).__name__}: {exc}"[:2000]
            logger.error("router settings rejected, keeping the current ones: %s", self._rejected)
            return
        self._reconfigured, self._rejected = True, None
        self._start_background()

    def _apply(self, settings: RouterSettings, handles: dict | None = None, model_id: str | None = None) -> None:
        queues = {route.name: queue_settings_for(settings.queues, self._queue_overrides.get(route.name, {}))
                  for route in self._routes}  # every pool validates before anything changes
        self._tenants.apply(settings.tenancy)
        for route in self._routes:
            if route.name in self._pools:
                self._pools[route.name].apply(queues[route.name], settings.circuit)
            else:
                self._pools[route.name] = PoolState(route, handles[route.name], model_id, queues[route.name],
                                                    settings.circuit)
            self._pools[route.name].scheduler.set_sharing(self._tenants.fair, self._tenants.reserve)
        self._settings = settings
        self._settings_digest = settings_digest(settings)
        # The replica's FastAPI app, once Serve's wrapper has set it up (`app`; `_asgi_app` where older).
        app = getattr(self, "app", None) or getattr(self, "_asgi_app", None)
        if app is not None:
            publish(app, settings)

    def _start_background(self) -> None:
        """Start (once, on the replica's event loop) the pool watches and the replica-count follower."""
        if not self._background:
            app_name = serve.get_replica_context().app_name
            self._background = [asyncio.create_task(pool.watch()) for pool in self._pools.values()]
            self._background.append(asyncio.create_task(follow_replica_counts(app_name, self._apply_replica_counts)))
            self._background.append(asyncio.create_task(self._tenants.run()))

    def _apply_replica_counts(self, counts: dict) -> None:
        routers = counts.get(serve.get_replica_context().deployment, 1)
        for pool in self._pools.values():
            pool.scheduler.set_replicas(counts.get(pool.handle.deployment_name, 1))
            pool.set_router_replicas(routers)

    # --- endpoints ---------------------------------------------------------------

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        problem = check_chat_messages(body.messages) or check_chat_template_kwargs(body.chat_template_kwargs)
        if problem is not None:
            return _problem_response(problem, "invalid_messages")
        return await self._serve(body, request, "chat", lambda: self._tokens.chat(
            body.messages, add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message))

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        return await self._serve(body, request, "completions", lambda: self._tokens.completion(body.prompt))

    async def health(self) -> JSONResponse:
        """200 when every pool is ready (its engine answered a real request) and its circuit closed; else 503."""
        self._start_background()
        problems, pools = {}, {}
        for name, pool in self._pools.items():
            pools[name] = pool.describe()
            unavailable = pool.unavailable()
            if unavailable is not None:
                problems[name] = unavailable[0]
                continue
            try:
                await pool.handle.check_health.remote()
                pools[name]["engine_load"] = (await pool.handle.engine_load.remote()).as_dict()  # one replica's view
            except Exception as exc:  # any failure means "not ready", reported, not raised
                problems[name] = f"{type(exc).__name__}: {exc}"[:500]
        if problems:
            reasons = "; ".join(problems.values())
            return openai_error(503, f"not ready: {reasons}", headers={"retry-after": "5"})
        return JSONResponse({"status": "ok", "models": sorted(self._model_cards), "pools": pools,
                             "router_settings_sha256": self._settings_digest,
                             "router_settings_rejected": self._rejected})

    async def chat_socket(self, websocket: WebSocket) -> None:
        """Chat turns over one WebSocket, each through the same pipeline as POST /v1/chat/completions."""
        self._start_background()
        await serve_chat_socket(self, websocket)

    async def page(self) -> Response:
        """The web chat page."""
        return web.page()

    async def page_asset(self, name: str) -> Response:
        """The page's scripts and styles, from the repository (nothing fetched from elsewhere)."""
        return web.asset(name)

    def _get_configured_serve_handle(self, model_id: str):
        # Called by OpenAiIngress inside _process_llm_request, in the request's
        # own task: the pool chosen for it is in _CHOSEN_POOL.
        return TrackingHandle(self._pools[_CHOSEN_POOL.get()].streaming_handle)

    async def record_autoscaling_stats(self) -> dict:
        """Queued requests per pool, for the application's autoscaling policy."""
        self._start_background()
        per_pool = {router_queued_metric(name): float(pool.queued) for name, pool in self._pools.items()}
        return {ROUTER_QUEUED: sum(per_pool.values()), **per_pool}

    # --- the pipeline ------------------------------------------------------------

    async def _serve(self, body, request: Request, call_method: str,
                     count_tokens: Callable[[], PromptTokens]) -> Response:
        arrived_at = time.monotonic()
        self._start_background()
        try:  # the HTTP middleware checked it already; a WebSocket turn's key is checked here
            caller = self._tenants.caller_of(request)
        except AuthFailure as failure:
            return unauthorized(failure)
        await self._get_model_id(body.model)  # unknown model: 404 before any work
        trace = RequestTrace.start(request.headers, call_method)
        trace.begin("router.plan")
        id_fields = {name: getattr(body, name, None) for name in ("prompt", "logit_bias", *TOKEN_ID_FIELDS)}
        problem = check_token_ids(id_fields, self._tokens.vocab_size)
        if problem is not None:
            trace.finish(problem.status, "invalid_token_ids")
            return _problem_response(problem, "invalid_token_ids")
        # Tokenising a 1 MB prompt takes a while; keep the event loop free.
        prompt = await asyncio.to_thread(count_tokens)
        planned = self._plan(body, request, prompt, arrived_at, caller)
        if isinstance(planned, RequestProblem):
            trace.finish(planned.status, "invalid_request", **{"llm.prompt_tokens": prompt.total})
            return _problem_response(planned, None)  # counted where _plan found it
        body, plan = planned
        use = await self._tenants.admit(caller, plan.tokens_reserved)
        if isinstance(use, RateLimited):
            trace.finish(429, "rate_limited")
            return rate_limited(use, plan.headers)
        plan.tenant, plan.headers = use, plan.headers | use.headers
        for pool in self._pools.values():
            pool.scheduler.set_sharing(self._tenants.fair, self._tenants.reserve)  # the tenants file may have changed
        trace.end("router.plan")
        trace.set(**{"llm.class": plan.cls.label, "llm.pool": plan.pool, "llm.prompt_tokens": prompt.total,
                     "llm.max_tokens": plan.max_tokens, "llm.stream": plan.stream})
        plan.trace = trace
        _CHOSEN_POOL.set(plan.pool)
        return await RequestLife(plan, self._pools[plan.pool]).run(
            lambda: self._process_llm_request(body, call_method=call_method, raw_request=request))

    def _plan(self, body, request: Request, prompt: PromptTokens, arrived_at: float, caller=None):
        """(the body to send, its RequestPlan), or the RequestProblem that answers it with a 4xx.

        A completions batch is classified, and each of its sequences fits the context, by its longest
        prompt; it reserves and reports (``x-prompt-tokens``, as vLLM's usage) all its prompts' tokens, and
        counts as ``prompts × n`` sequences against ``max_n``."""
        prompt_tokens = prompt.longest
        if not prompt.exact:  # too large to tokenise for any pool: refused from its size
            return _counted(RequestProblem(
                f"prompt has at least {prompt_tokens} tokens (from its size), beyond the model's context of "
                f"{self._tokens.context_limit} tokens",
                "messages" if hasattr(body, "messages") else "prompt"), "admission")
        classification = classify(prompt_tokens, request.headers.get(PRIORITY_HEADER), self._settings.classification)
        if isinstance(classification, RequestProblem):
            return _counted(classification, "classification")
        cls, lowered = self._tenants.cap_class(caller, classification.priority)
        fields = {name: getattr(body, name, None) for name in SAMPLING_FIELDS}
        fields["prompts"] = prompt.prompts
        completion_cap = getattr(body, "max_completion_tokens", None)  # 0 is a value to refuse, not unset
        fields["max_tokens"] = body.max_tokens if completion_cap is None else completion_cap
        admission = self._settings.admission
        needed = tokens_needed(prompt_tokens, fields["max_tokens"], admission.max_tokens_cap)
        pool = self._pools[choose_pool(cls, needed, self._routes).name]
        admitted = admit(fields, prompt_tokens, pool.route.max_model_len, admission)
        if isinstance(admitted, RequestProblem):
            return _counted(admitted, "admission")
        queues = pool.queue_settings
        budgets = decide_budgets(queues.targets(cls), queues, admitted.max_tokens, arrived_at,
                                 request.headers.get(TIMEOUT_HEADER))
        if isinstance(budgets, RequestProblem):
            return _counted(budgets, "timeout_header")
        updates = dict(admitted.updates)
        if hasattr(body, "max_completion_tokens"):
            updates["max_completion_tokens"] = admitted.max_tokens
        if pool.route.engine_priority:
            updates["priority"] = int(cls)
        # No x-request-id here: Serve's proxy puts its own on every response (the same id).
        headers = {"x-router-replica": self._replica_id,
                   "x-priority-class": cls.label,
                   "x-llm-pool": pool.route.name, "x-prompt-tokens": str(prompt.total),
                   "x-max-tokens-applied": str(admitted.max_tokens), **lowered}
        choices = sequences(fields)
        plan = RequestPlan(cls=cls, pool=pool.route.name, max_tokens=admitted.max_tokens, budgets=budgets,
                           stream=bool(getattr(body, "stream", False)), headers=headers, prompt_tokens=prompt.total,
                           cost=cost(prompt.total, admitted.max_tokens * choices), choices=choices)
        return body.model_copy(update=updates), plan


def _restrict_cors(app) -> None:
    """ray.serve.llm's app allows every origin, with credentials; allow only the configured ones, as
    configured now (router/live_settings.py)."""
    at = next(i for i, m in enumerate(app.user_middleware) if m.cls is CORSMiddleware)
    app.user_middleware[at] = Middleware(LiveCors)


def _problem_response(problem: RequestProblem, reason: str | None) -> JSONResponse:
    """The 4xx that answers ``problem``; counted (metrics) under ``reason`` unless already counted."""
    if reason is not None:
        metrics.refused_at_door(problem.status, reason)
    return openai_error(problem.status, problem.message, param=problem.param)


def _counted(problem: RequestProblem, reason: str) -> RequestProblem:
    metrics.refused_at_door(problem.status, reason)
    return problem


def router_ingress_class() -> type:
    """The Router class wired to its FastAPI app, ready for serve.deployment. The middleware reads the
    replica's current settings per request (router/live_settings.py)."""
    app = init()  # ray.serve.llm's app: request ids, CORS, HTTP metrics, error middleware
    _restrict_cors(app)
    if not replace_application_error_middleware(app):
        logger.info("Ray Serve LLM's app has no BaseHTTPMiddleware error layer to replace; kept as it is")
    install_openai_error_handlers(app)
    openapi.without_validation_422(app)
    # Outermost of ours: an unauthenticated request costs nothing, not even reading its body.
    app.add_middleware(ApiKeyAuth)
    # Added first, so it runs inside BodySizeLimit: declared oversize bodies never get read.
    app.add_middleware(JsonBody)
    app.add_middleware(BodySizeLimit)
    return make_fastapi_ingress(Router, endpoint_map=ENDPOINTS, app=app)
