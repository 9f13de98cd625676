"""The requests an engine is warmed up and measured with.

The one-token request proves an engine answers: the replica's own warm-up and
the router's probe both send it, so it is built in one place (a short chat,
one token, greedy, not streamed). The measuring request is the replica's own:
one stream alone, long enough to time the engine's decoding steps.
"""

from __future__ import annotations

WARM_UP_PROMPT = "Hi"


def one_token_request(model_id: str):
    """A ChatCompletionRequest for ``model_id`` that generates one token."""
    return _greedy_chat(model_id, max_tokens=1)


# Decoding steps the measuring request times: enough for a median that ignores a first slow step or two.
MEASURING_TOKENS = 32


def measuring_request(model_id: str):
    """A ChatCompletionRequest for ``model_id`` that decodes ``MEASURING_TOKENS`` tokens, greedy, whatever
    the model would say (``ignore_eos``)."""
    return _greedy_chat(model_id, max_tokens=MEASURING_TOKENS, ignore_eos=True)


def _greedy_chat(model_id: str, **fields):
    from ray.serve.llm.openai_api_models import ChatCompletionRequest

    return ChatCompletionRequest(model=model_id, messages=[{"role": "user", "content": WARM_UP_PROMPT}],
                                 temperature=0.0, stream=False, **fields)
