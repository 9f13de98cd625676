"""The OpenAI-compatible API through the router, with the official client.

Runs against the session cluster: real Ray, real Serve, the real vLLM CPU
engine with the embedded model, real HTTP.
"""

from __future__ import annotations

import httpx
import openai
import pytest

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_models_lists_the_served_model(client, model_id):
    models = client.models.list()
    assert [m.id for m in models.data] == [model_id]
    assert client.models.retrieve(model_id).id == model_id


def test_chat_completion_answers(client, model_id):
    reply = client.chat.completions.create(model=model_id, messages=QUESTION, max_tokens=20, temperature=0)
    assert "Paris" in reply.choices[0].message.content
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0


def test_chat_completion_streams(client, model_id):
    stream = client.chat.completions.create(
        model=model_id, messages=QUESTION, max_tokens=20, temperature=0, stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 2
    assert "Paris" in text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_completion_answers(client, model_id):
    reply = client.completions.create(model=model_id, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert reply.choices[0].text.strip()
    assert reply.usage.completion_tokens > 0


def test_completion_streams(client, model_id):
    chunks = list(client.completions.create(model=model_id, prompt="One, two, three,", max_tokens=8, stream=True))
    assert len(chunks) >= 2
    assert "".join(c.choices[0].text for c in chunks).strip()


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_sse_ends_with_done(base_url, model_id, path):
    body = {"model": model_id, "max_tokens": 4, "stream": True}
    body |= {"messages": QUESTION} if "chat" in path else {"prompt": "Hello"}
    with httpx.stream("POST", base_url + path, json=body, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"


def test_health(base_url, model_id):
    response = httpx.get(base_url + "/health", timeout=30)
    assert response.status_code == 200
    health = response.json()
    assert health["status"] == "ok" and health["models"] == [model_id]
    main = health["pools"]["main"]  # serve_config.yaml serves one profile: one pool
    assert main["circuit"] == "closed" and main["classes"] == ["high", "low", "medium"]
    assert set(main["engine_load"]) >= {"running", "waiting", "kv_cache_usage"}


# --- bad input: OpenAI-format errors, never a 500, never a dead replica ----------


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]
    assert {"message", "type", "code"} <= error.keys()
    return error


def test_unknown_model_is_404_through_the_client(client):
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="no-such-model", messages=QUESTION, max_tokens=4)
    assert "no-such-model" in raised.value.message


def test_unknown_model_is_404_in_openai_format(base_url):
    response = httpx.post(base_url + "/v1/completions", json={"model": "nope", "prompt": "hi"}, timeout=30)
    assert "nope" in assert_openai_error(response, 404)["message"]


def test_unknown_route_is_404_in_openai_format(base_url):
    assert_openai_error(httpx.get(base_url + "/v1/engines", timeout=30), 404)


@pytest.mark.parametrize(
    "raw",
    ['{"model": ', "not json at all", "[1, 2", '{"model": "x", "messages": [}'],
    ids=["truncated", "text", "array", "broken-inner"],
)
def test_malformed_json_is_400(base_url, raw):
    response = httpx.post(
        base_url + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}, timeout=30
    )
    assert_openai_error(response, 400)


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"messages": []},
        {"messages": "hello"},
        {"messages": [{"role": "user"}]},
        {"messages": [{"content": "hi"}]},
        {"messages": [42]},
        {"messages": QUESTION, "max_tokens": "many"},
    ],
    ids=["missing", "empty", "string", "no-content", "no-role", "number", "bad-max-tokens"],
)
def test_bad_messages_are_rejected(base_url, model_id, body):
    response = httpx.post(base_url + "/v1/chat/completions", json={"model": model_id, **body}, timeout=60)
    assert response.status_code in (400, 422), response.text
    assert_openai_error(response, response.status_code)


def test_missing_prompt_is_rejected(base_url, model_id):
    response = httpx.post(base_url + "/v1/completions", json={"model": model_id}, timeout=60)
    assert_openai_error(response, 400)


def test_prompt_beyond_context_is_400(base_url, model_id):
    body = {"model": model_id, "messages": [{"role": "user", "content": "hello " * 9000}]}
    response = httpx.post(base_url + "/v1/chat/completions", json=body, timeout=120)
    message = assert_openai_error(response, 400)["message"]
    assert "context" in message and "4096" in message


def test_replica_survives_bad_input(client, model_id):
    # Runs after the bad-input tests in this file: the engine still answers.
    reply = client.chat.completions.create(model=model_id, messages=QUESTION, max_tokens=8, temperature=0)
    assert reply.choices[0].message.content
