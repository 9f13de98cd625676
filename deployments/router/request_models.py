"""Request models where vLLM's differ from OpenAI's documented API.

vLLM declares the completion request's ``n`` as a plain int, so ``"n": null``
(which OpenAI documents as allowed, meaning the default 1, and which chat
already accepts) fails validation with a 400. Here null means 1.
"""

from __future__ import annotations

from pydantic import field_validator
from ray.serve.llm.openai_api_models import CompletionRequest as _CompletionRequest


class CompletionRequest(_CompletionRequest):
    n: int | None = 1

    @field_validator("n")
    @classmethod
    def _null_means_one(cls, n: int | None) -> int:
        return 1 if n is None else n
