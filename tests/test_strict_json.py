"""Unit tests of what the fuzzing (tests/test_fuzz.py) found and fixed, without Ray:
bodies strict JSON refuses, pydantic error locations as OpenAI params, and the
OpenAPI document the router serves.
"""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel, model_validator

from deployments.router.errors import param_path
from deployments.router.json_body import strict_json_problem


@pytest.mark.parametrize("raw, param", [
    (b'{"messages": [{"content": "a\\ud800"}]}', "messages[0].content"),
    (b'{"messages": [{"content": [{"text": "\\uDC00"}]}]}', "messages[0].content[0].text"),
    ('{"prompt": "\udc80"}'.encode("utf-8", "surrogatepass"), "prompt"),  # raw surrogate bytes
    ('{"prompt": ["x", "\ud800"]}'.encode("utf-16", "surrogatepass"), "prompt[1]"),
    (b'{"\\ud800": 1}', "\\ud800"),  # the key itself, escaped for the UTF-8 reply
])
def test_lone_surrogates_are_refused_naming_the_field(raw, param):
    message, found = strict_json_problem(raw)
    assert found == param and "surrogate" in message
    json.dumps(message).encode("utf-8")  # the reply can be written


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_standard_constants_are_refused(constant):
    message, param = strict_json_problem(b'{"temperature": ' + constant + b"}")
    assert constant.decode() in message and param is None


@pytest.mark.parametrize("raw", [
    b'{"messages": [{"content": "\\ud83d\\ude00 and NaN as text"}]}',  # a paired escape is one emoji
    '{"prompt": "\U0001f600 e\u0301 \u202e \x00"}'.encode("utf-8"),
    '{"prompt": "hi"}'.encode("utf-16"),
    b'{"prompt": "\\\\ud800"}',  # an escaped backslash, then text
    b"not json",  # left to the other checks
])
def test_ordinary_bodies_pass(raw):
    assert strict_json_problem(raw) is None


@pytest.mark.parametrize("loc, param", [
    (("body", "messages", 0, "ChatCompletionUserMessageParam", "content", "str"), "messages[0].content"),
    (("body", "stop", "list[str]"), "stop"),
    (("body", "messages", 1, "function-after[validate(), Message]", "role"), "messages[1].role"),
    (("body",), None),
])
def test_pydantic_locations_become_openai_params(loc, param):
    assert param_path(loc) == param


class Body(BaseModel):
    messages: list[dict]

    @model_validator(mode="after")
    def _not_empty(self):  # a check across fields, as vLLM's request models have many
        if self.messages == [{}]:
            raise ValueError("a message needs a role")
        return self


def test_validation_errors_are_400_in_openai_format():
    from fastapi import FastAPI
    from starlette.testclient import TestClient

    from deployments.router.errors import install_openai_error_handlers

    app = FastAPI()
    install_openai_error_handlers(app)

    @app.post("/v1/chat/completions")
    def chat(body: Body):
        return {}

    client, messages = TestClient(app), []
    for raw, param in [(b'{"messages": "x"}', "messages"), (b"[1, 2]", None), (b'{"messages": [', None)]:
        response = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
        messages.append(error["message"])
    assert messages[1].startswith("request body must be a JSON object")
    # a model validator's error is about the request, not its JSON shape, and has no pydantic prefix
    response = client.post("/v1/chat/completions", json={"messages": [{}]})
    assert response.status_code == 400 and response.json()["error"]["message"] == "invalid request: a message needs a role"


def test_openapi_document_declares_what_the_router_answers():
    from deployments.router.ingress import router_ingress_class

    cls = router_ingress_class()
    app = next(cell.cell_contents for cell in cls.__init__.__closure__
               if type(cell.cell_contents).__name__ == "FastAPI")  # the app serve.ingress froze
    document = app.openapi()
    chat = document["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "422" not in chat and {"400", "404", "413", "429", "503", "504"} <= chat.keys()
    assert chat["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/OpenAIErrorResponse"}
    assert "text/event-stream" in chat["200"]["content"]
    assert "HTTPValidationError" not in document["components"]["schemas"]


@pytest.mark.parametrize("message, param", [
    ({"role": "bot", "content": "hi"}, "messages[0].role"),
    ({"role": "user", "content": [{"type": "bogus", "text": "hi"}]}, "messages[0].content[0].type"),
    ({"role": "user", "content": ["bare"]}, "messages[0].content[0].type"),
    ({"role": "system", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, "messages[0].content[0].type"),
    ({"role": "tool", "content": "42"}, "messages[0].tool_call_id"),
    ({"role": "function", "content": "42"}, "messages[0].name"),
])
def test_roles_and_part_types_are_checked_as_openai_does(message, param):
    from deployments.router.validation import check_chat_messages

    assert check_chat_messages([message]).param == param


def test_openai_roles_and_parts_pass():
    from deployments.router.validation import check_chat_messages

    assert check_chat_messages([
        {"role": "developer", "content": "x"}, {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},
        {"role": "tool", "content": "1", "tool_call_id": "c"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}}]},
    ]) is None


def test_a_role_less_message_vllm_parses_as_harmony_is_400():
    from deployments.router.request_models import ChatCompletionRequest
    from deployments.router.validation import check_chat_messages

    body = ChatCompletionRequest.model_validate({"messages": [{"author": {"role": "user"}}]})
    assert check_chat_messages(body.messages).param == "messages[0].role"
