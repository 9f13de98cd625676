"""Unit tests of the router's request models: what vLLM's raw-body validators choke on is a 400 naming the field."""

import pytest
from pydantic import ValidationError

from deployments.router.request_models import ChatCompletionRequest, CompletionRequest

CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}
NAMED_TOOL = {"type": "function", "function": {"name": "f"}}


@pytest.mark.parametrize(("extra", "field"), [
    ({"messages": None}, "messages"),
    ({"structured_outputs": "x"}, "structured_outputs"),
    ({"tools": ["x"], "tool_choice": NAMED_TOOL}, "tools"),
    ({"tools": [{}], "tool_choice": NAMED_TOOL}, "tools"),
])
def test_chat_raw_validator_failures_name_the_field(extra, field):
    with pytest.raises(ValidationError) as raised:
        ChatCompletionRequest.model_validate({**CHAT, **extra})
    assert f"'{field}'" in str(raised.value)


def test_completion_raw_validator_failure_names_the_field():
    with pytest.raises(ValidationError) as raised:
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "structured_outputs": []})
    assert "'structured_outputs'" in str(raised.value)


def test_valid_requests_still_parse():
    assert ChatCompletionRequest.model_validate({**CHAT, "seed": 5}).seed == 5
    assert CompletionRequest.model_validate({"model": "m", "prompt": "x", "n": None}).n == 1
