"""The one-token request that proves an engine answers: the replica's own warm-up and the router's probe.

Both deployments send it, so it is built in one place: a short chat, one
token, greedy, not streamed.
"""

from __future__ import annotations

WARM_UP_PROMPT = "Hi"


def one_token_request(model_id: str):
    """A ChatCompletionRequest for ``model_id`` that generates one token."""
    from ray.serve.llm.openai_api_models import ChatCompletionRequest

    return ChatCompletionRequest(model=model_id, messages=[{"role": "user", "content": WARM_UP_PROMPT}],
                                 max_tokens=1, temperature=0.0, stream=False)
