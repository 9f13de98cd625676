"""Router ingress deployment: OpenAI-compatible HTTP on top of ray.serve.llm.

``OpenAiIngress`` already speaks the OpenAI protocol (vLLM's request and
response models, SSE streaming, OpenAI-format errors) and reaches the LLM
replicas through DeploymentHandles; the router extends it rather than copying
it. What it adds lives in small pure modules next to this one.
"""

from __future__ import annotations

from fastapi import Request
from starlette.responses import JSONResponse, Response

from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress
from ray.serve.llm.openai_api_models import ChatCompletionRequest
from ray.llm._internal.serve.core.ingress.ingress import DEFAULT_ENDPOINTS, init

from deployments.router.errors import install_openai_error_handlers, openai_error
from deployments.router.validation import check_chat_messages


# Only what a chat model serves; embeddings, audio and scoring are not offered.
ENDPOINTS = {
    name: DEFAULT_ENDPOINTS[name] for name in ("models", "model_data", "completions", "chat")
} | {
    "health": lambda app: app.get("/health"),
}


class Router(OpenAiIngress):
    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        problem = check_chat_messages(body.messages)
        if problem is not None:
            return openai_error(problem.status, problem.message, param=problem.param)
        return await super().chat(body, request)

    async def health(self) -> JSONResponse:
        """Ready when every model's replicas answer their engine health check."""
        unhealthy = {}
        for model_id, handle in self._default_serve_handles.items():
            try:
                await handle.check_health.remote()
            except Exception as exc:  # any failure means "not ready", reported, not raised
                unhealthy[model_id] = f"{type(exc).__name__}: {exc}"[:500]
        if unhealthy:
            return openai_error(503, f"model replicas unhealthy: {unhealthy}")
        return JSONResponse({"status": "ok", "models": sorted(self._model_cards)})


def router_ingress_class() -> type:
    """The Router class wired to its FastAPI app, ready for serve.deployment."""
    app = init()  # ray.serve.llm's app: request ids, CORS, HTTP metrics, error middleware
    install_openai_error_handlers(app)
    return make_fastapi_ingress(Router, endpoint_map=ENDPOINTS, app=app)
