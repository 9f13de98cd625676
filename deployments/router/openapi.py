"""The router's /openapi.json, made to say what the router actually answers.

FastAPI derives the document from the endpoint signatures alone, so out of the
box it promised a 422 ``{"detail": [...]}`` for bad bodies (the router answers
400 in OpenAI's format), no 404/413/429/503/504 at all, and a schema-less 200
for chat and completions (which also stream ``text/event-stream``). Clients
and schema-driven tests (tests/test_fuzz.py runs schemathesis on it) read this
document, so here each route declares its real statuses, all errors share
OpenAI's error schema, and FastAPI's 422 is taken out.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from ray.serve.llm.openai_api_models import ChatCompletionResponse, CompletionResponse

# What the router and ray.serve.llm answer on a chat or completion request:
# bad input, unknown model, body too big, Ray's own router timeout, refused
# for load, pool not ready or circuit open, deadline.
GENERATION_ERRORS = (400, 404, 408, 413, 429, 503, 504)


class OpenAIError(BaseModel):
    message: str
    type: str
    param: str | None
    code: int | str | None


class OpenAIErrorResponse(BaseModel):
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""

    error: OpenAIError


def errors(*statuses: int) -> dict[int, dict[str, Any]]:
    return {status: {"model": OpenAIErrorResponse, "description": "error in OpenAI's format"} for status in statuses}


def generation_responses(model: type[BaseModel]) -> dict[int, dict[str, Any]]:
    """A chat or completion route: the JSON reply, or (``"stream": true``) server-sent events."""
    ok = {"model": model, "description": "the reply, or server-sent events ending in `data: [DONE]`",
          "content": {"text/event-stream": {}}}
    return {200: ok} | errors(*GENERATION_ERRORS)


CHAT_RESPONSES = generation_responses(ChatCompletionResponse)
COMPLETION_RESPONSES = generation_responses(CompletionResponse)
MODEL_RESPONSES = errors(404)
HEALTH_RESPONSES = errors(503)


def without_validation_422(app: FastAPI) -> None:
    """Wrap ``app.openapi`` so the document drops FastAPI's 422 and its schemas (the router answers 400)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = build()
            for operations in document.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            schemas = document.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi
