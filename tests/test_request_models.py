"""Unit tests of the router's request models: what vLLM's raw-body validators choke on is a 400 naming the field."""

import pytest
from pydantic import ValidationError

from deployments.router.request_models import ChatCompletionRequest, CompletionRequest

CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}


@pytest.fixture(scope="module")
def router_errors():
    """A FastAPI app with the router's request models and error handlers, as a TestClient (no Ray)."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from deployments.router.errors import install_openai_error_handlers

    app = FastAPI()
    install_openai_error_handlers(app)

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest):
        return {}

    @app.post("/v1/chat/completions")
    async def chat(request: ChatCompletionRequest):
        return {}

    return TestClient(app, raise_server_exceptions=True)
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


@pytest.mark.parametrize(("extra", "field"), [
    ({"top_k": 10**40}, "top_k"),
    ({"stream": True, "stream_interval": 10**40}, "stream_interval"),
    ({"vllm_xargs": {"a": [1, -(10**40)]}}, "vllm_xargs"),
    ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ({"allowed_token_ids": [2], "response_format": {"type": "json_object"}}, "allowed_token_ids"),
    ({"allowed_token_ids": [2], "structured_outputs": {"regex": "a"}}, "allowed_token_ids"),
])
def test_values_the_engine_fails_on_are_refused(extra, field):
    for model, base in ((ChatCompletionRequest, CHAT), (CompletionRequest, {"model": "m", "prompt": "x"})):
        with pytest.raises(ValidationError) as raised:
            model.model_validate({**base, **extra})
        assert f"'{field}'" in str(raised.value)


def test_int64_edges_and_text_format_still_parse():
    request = ChatCompletionRequest.model_validate({**CHAT, "seed": 2**63 - 1, "top_k": -(2**63),
                                                    "allowed_token_ids": [2], "response_format": {"type": "text"}})
    assert request.seed == 2**63 - 1


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {"model": "m", "prompt": "", "max_tokens": 3}, "prompt"),
    ("/v1/completions", {"model": "m"}, "prompt"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema"}}, "response_format"),
    # pydantic's lax mode read these as 1, true and 0.5 (a fresh-eye trial); OpenAI's API refuses them.
    ("/v1/chat/completions", {**CHAT, "max_tokens": True}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "stream": "yes"}, "stream"),
    ("/v1/completions", {"model": "m", "prompt": "Hi", "temperature": "0.5"}, "temperature"),
    ("/v1/completions", {"model": "m", "prompt": "Hi", "echo": 1}, "echo"),
    # vLLM's raw-body validator fails on these with a TypeError; the 400 named no param (a fresh-eye trial)
    ("/v1/chat/completions", {"model": "m", "messages": None}, "messages"),
    # an integer the engine cannot carry: named in the message, but param was null (session 15's trial)
    ("/v1/chat/completions", {**CHAT, "seed": 2**70}, "seed"),
])
def test_vllms_own_checks_are_a_400_in_openais_format_naming_the_field(router_errors, path, body, param):
    # Found by a fresh-eye trial: vLLM's VLLMValidationError is not a ValueError, so it passed pydantic by;
    # the client got type "VLLMValidationError" and the message three times, the log a 60-line traceback.
    response = router_errors.post(path, json=body)
    error = response.json()["error"]
    assert response.status_code == 400 and error["type"] == "invalid_request_error" and error["param"] == param
    assert error["message"].startswith(f"Invalid value for '{param}': ") and "vllm" not in error["message"]
    assert "(parameter=" not in error["message"] and error["message"].count(". ") <= 1


@pytest.mark.parametrize(("field", "value", "fits"), [
    ("max_tokens", 2, True), ("max_tokens", 2.0, True), ("max_tokens", 2.5, False), ("max_tokens", True, False),
    ("temperature", 1, True), ("temperature", 0.5, True), ("temperature", "0.5", False),
    ("stream", True, True), ("stream", 1, False), ("stream", "true", False),
    ("logprobs", False, True), ("n", None, True), ("seed", False, False),
])
def test_booleans_numbers_and_strings_are_not_taken_for_each_other(field, value, fits):
    body = {**CHAT, field: value}
    if fits:
        ChatCompletionRequest.model_validate(body)
    else:
        with pytest.raises(ValidationError, match="expected (a boolean|a number|an integer), got"):
            ChatCompletionRequest.model_validate(body)


def test_a_union_fields_error_is_the_one_its_value_tells(router_errors):
    # Found by a fresh-eye trial: 500 stop strings were answered "Input should be a valid string" (the
    # string member of stop's union) instead of the list member's "at most 4 items".
    error = router_errors.post("/v1/chat/completions", json={**CHAT, "stop": [f"s{i}" for i in range(500)]}).json()["error"]
    assert error["param"] == "stop" and "at most 4" in error["message"]
    error = router_errors.post("/v1/chat/completions", json={**CHAT, "stop": 5}).json()["error"]  # no member fits its type
    assert error["param"] == "stop"
    assert error["message"] == "Invalid type for 'stop': expected a string or an array, but got an integer instead."


@pytest.mark.parametrize(("body", "param", "message"), [
    # Found by a fresh-eye trial: "prompt": 123 was answered "Input should be a valid list".
    ({"model": "m", "prompt": 123}, "prompt",
     "Invalid type for 'prompt': expected a string or an array, but got an integer instead."),
    ({"model": "m", "prompt": {"text": "Hi"}}, "prompt",
     "Invalid type for 'prompt': expected a string or an array, but got an object instead."),
])
def test_a_value_whose_type_fits_no_member_of_a_union_is_told_the_types_it_may_have(router_errors, body, param,
                                                                                       message):
    error = router_errors.post("/v1/completions", json=body).json()["error"]
    assert (error["param"], error["message"], error["type"]) == (param, message, "invalid_request_error")


def test_a_member_that_took_the_type_still_tells_its_own_error(router_errors):
    # A list of floats is an array, as prompt's token-id member wants: its item error stays the answer.
    error = router_errors.post("/v1/completions", json={"model": "m", "prompt": [1.5]}).json()["error"]
    assert error["param"] == "prompt[0]" and error["message"].startswith("Invalid value for 'prompt[0]': ")
