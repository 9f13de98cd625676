"""Unit tests of how requests are read and run: JSON bodies whatever their
Content-Type, ``n: null`` on completions, prompt rendering for the token count,
and seeded sampling under chunked prefill on CPU generators (issue 11).

Fast: no Ray, no engine; the live counterparts are in tests/test_api.py.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
import json
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from deployments.router.errors import ApplicationErrors, replace_application_error_middleware
from deployments.router.live_settings import publish
from deployments.router.settings import RouterSettings
from deployments.router.json_body import JsonBody, as_json_request, declares_json, json_problem
from deployments.router.request_models import CompletionRequest
from deployments.router.tokens import PromptTokenCounter, PromptTokens, max_token_bytes, render_message, text_parts
from deployments.server.worker_extension import (
    EXTENSION_QUALNAME, GPU_UUID_RPC, SEEDED_SAMPLING_RPC, WorkerExtension, extension_kwargs,
)
from deployments.server.seeded_sampling import (
    discarded_generators, generator_lacks_offset, make_seeded_sampling_safe,
)

# --- JSON bodies -------------------------------------------------------------


@pytest.mark.parametrize("content_type", [b"application/json", b"Application/JSON; charset=utf-8",
                                          b"application/vnd.api+json"])
def test_json_content_types_pass_straight_through(content_type):
    assert declares_json(content_type)


@pytest.mark.parametrize("content_type", [None, b"", b"application/x-www-form-urlencoded", b"text/plain",
                                          b"text/json-ish", b"multipart/form-data; boundary=x"])
def test_other_content_types_are_read_as_json(content_type):
    assert not declares_json(content_type)


def test_json_problem():
    assert json_problem(b'{"model": "m"}') is None
    assert json_problem(b"") is None  # the endpoint's own check answers a missing body
    assert "not valid JSON" in json_problem(b"model=m&prompt=hi")
    assert json_problem(b"\xff\xfe{") is not None


def test_content_type_is_replaced_not_added():
    headers = [(b"host", b"x"), (b"Content-Type", b"text/plain"), (b"content-length", b"2")]
    assert as_json_request(headers) == [(b"host", b"x"), (b"content-length", b"2"),
                                        (b"content-type", b"application/json")]


def _call(max_bytes, headers, body_chunks, read_timeout_s=60.0, stall_after=None):
    """Run the ASGI middleware once; what the app saw and what was sent. With ``stall_after`` the
    client sends that many body parts and then nothing more."""
    seen, sent = {}, []

    async def app(scope, receive, send):
        seen["headers"] = scope["headers"]
        seen["body"] = (await receive())["body"]

    messages = [{"type": "http.request", "body": c, "more_body": i < len(body_chunks) - 1}
                for i, c in enumerate(body_chunks)]

    async def receive():
        if stall_after is not None and len(body_chunks) - len(messages) >= stall_after:
            await asyncio.sleep(3600)  # a client that stopped sending
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    # The limit is the replica's current setting, read per request from the app's state.
    router_app = SimpleNamespace(state=SimpleNamespace())
    publish(router_app, RouterSettings(admission={"max_request_bytes": max_bytes,
                                                  "body_read_timeout_s": read_timeout_s}))
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": headers, "app": router_app}
    asyncio.run(JsonBody(app)(scope, receive, send))
    return seen, sent


def test_middleware_serves_a_form_declared_json_body_as_json():
    body = json.dumps({"model": "m", "prompt": "hi"}).encode()
    seen, sent = _call(1000, [(b"content-type", b"application/x-www-form-urlencoded")], [body[:5], body[5:]])
    assert seen["body"] == body and (b"content-type", b"application/json") in seen["headers"]
    assert not sent


def test_middleware_answers_a_non_json_body_with_an_openai_400():
    seen, sent = _call(1000, [(b"content-type", b"text/plain")], [b"hello there"])
    assert not seen
    assert sent[0]["status"] == 400
    error = json.loads(sent[1]["body"])["error"]
    assert error["type"] == "invalid_request_error" and "JSON" in error["message"]


def test_middleware_caps_what_it_reads():
    seen, sent = _call(10, [], [b'{"prompt": ', b'"a long prompt"}'])
    assert not seen and sent[0]["status"] == 413


def test_a_body_that_stalls_between_parts_is_408_without_reaching_the_app():
    started = time.monotonic()
    seen, sent = _call(1000, [], [b'{"prompt": ', b'"hi"}'], read_timeout_s=0.2, stall_after=1)
    assert not seen and sent[0]["status"] == 408 and time.monotonic() - started < 60
    error = json.loads(sent[1]["body"])["error"]
    assert error["type"] == "invalid_request_error" and "0.2s" in error["message"]


# --- n: null -----------------------------------------------------------------


@pytest.mark.parametrize("given, expected", [({"n": None}, 1), ({}, 1), ({"n": 3}, 3)])
def test_completion_n_null_means_one(given, expected):
    assert CompletionRequest.model_validate({"model": "m", "prompt": "hi", **given}).n == expected


# --- the last application-error layer (errors.ApplicationErrors) -----------------------------------

def _run_app(app, sent: list[dict] | None = None) -> list[dict]:
    scope = {"type": "http", "method": "GET", "path": "/", "headers": [(b"x-request-id", b"r1")],
             "query_string": b""}
    sent = [] if sent is None else sent

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(ApplicationErrors(app)(scope, receive, send))
    return sent


def test_an_uncaught_exception_is_an_openai_500_without_its_text():
    async def app(scope, receive, send):
        raise RuntimeError("secret internals")

    sent = _run_app(app)
    error = json.loads(sent[1]["body"])["error"]
    assert sent[0]["status"] == 500 and error["type"] == "server_error" and "secret" not in error["message"]


def test_an_exception_with_a_status_keeps_it():
    class Teapot(Exception):
        status_code = 418

    async def app(scope, receive, send):
        raise Teapot("short and stout")

    sent = _run_app(app)
    assert sent[0]["status"] == 418 and "short and stout" in json.loads(sent[1]["body"])["error"]["message"]


def test_an_exception_after_the_response_started_propagates_and_chunks_pass_unchanged():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        raise RuntimeError("mid-stream")

    sent: list[dict] = []
    with pytest.raises(RuntimeError):
        _run_app(app, sent)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[1]["body"] == b"data: 1\n\n"


def test_ray_serve_llms_error_layer_is_replaced_in_place():
    from ray.llm._internal.serve.core.ingress.ingress import init
    from starlette.middleware.base import BaseHTTPMiddleware

    app = init()
    before = [m.cls for m in app.user_middleware]
    assert replace_application_error_middleware(app)
    after = [m.cls for m in app.user_middleware]
    assert BaseHTTPMiddleware not in after and after[before.index(BaseHTTPMiddleware)] is ApplicationErrors
    assert not replace_application_error_middleware(app)  # nothing left to replace


# --- prompt rendering for the token count ------------------------------------

TWO_PARTS = [{"type": "text", "text": "What is the capital"}, {"type": "text", "text": " of France?"}]


def test_text_parts_are_joined_with_newlines_like_vllm():
    message = {"role": "user", "content": TWO_PARTS}
    assert render_message(message, "string") == {"role": "user", "content": "What is the capital\n of France?"}


def test_empty_texts_are_dropped_from_string_content_only():
    message = {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": ""}, "b"]}
    assert render_message(message, "string")["content"] == "a\nb"
    assert len(render_message(message, "openai")["content"]) == 3


def test_openai_format_keeps_the_parts():
    rendered = render_message({"role": "user", "content": "hi"}, "openai")
    assert rendered["content"] == [{"type": "text", "text": "hi"}]


def test_tool_content_is_always_a_string():
    message = {"role": "tool", "tool_call_id": "c1", "content": TWO_PARTS}
    assert render_message(message, "openai") == {"role": "tool", "content": "What is the capital\n of France?",
                                                  "tool_call_id": "c1"}


def test_text_like_parts_and_null_texts():
    content = ["plain", {"type": "refusal", "refusal": "no"}, {"type": "text", "text": None},
               {"type": "input_text", "text": "in"}, {"type": "image_url", "image_url": {"url": "x"}}]
    assert text_parts(content) == ["plain", "no", "in"]
    assert text_parts(None) == [] and text_parts("s") == ["s"]


def test_a_completions_batch_counts_every_prompt():
    counter = PromptTokenCounter.__new__(PromptTokenCounter)  # no tokenizer: one token per word
    counter._count = lambda text: len(text.split())
    assert counter.completion("a b c") == PromptTokens(3, 3, 1)
    assert counter.completion([5, 6, 7, 8]) == PromptTokens(4, 4, 1)  # token ids: one prompt
    assert counter.completion(["a b", "c d e"]) == PromptTokens(3, 5, 2)  # classified by 3, usage 5
    assert counter.completion([[1, 2], [3]]) == PromptTokens(2, 3, 2)
    assert counter.completion([]) == PromptTokens(0, 0, 1)


class _NoEncoding:
    """A tokenizer (one token per character) that must not be asked to encode a long text (refused from
    its size)."""
    chat_template = None

    def apply_chat_template(self, conversation, **kwargs):
        return "".join(m["content"] for m in conversation)

    def encode(self, text, **kwargs):
        assert len(text) <= 100, f"tokenised {len(text)} characters"
        return list(text)


def _counter(tokenizer, context_limit: int, max_token_bytes: int) -> PromptTokenCounter:
    counter = PromptTokenCounter.__new__(PromptTokenCounter)
    counter._tokenizer, counter._content_format = tokenizer, "string"
    counter.context_limit, counter._max_token_bytes = context_limit, max_token_bytes
    return counter


def test_a_text_too_large_for_any_context_is_not_tokenised():
    counter = _counter(_NoEncoding(), context_limit=100, max_token_bytes=4)
    counted = counter.chat([{"role": "user", "content": "x" * 10_000}])
    assert counted == PromptTokens(1250, 1250, 1, exact=False)  # 10,000 bytes / (2 x 4): at least 1,250
    assert counter.completion("é" * 5_000).exact is False  # 10,000 bytes too
    assert counter.completion(["a", "x" * 10_000]) == PromptTokens(1250, 1250, 2, exact=False)


def test_a_text_that_might_fit_is_counted_exactly():
    counter = _counter(_NoEncoding(), context_limit=100, max_token_bytes=4)
    counter._tokenizer.encode = lambda text, **kwargs: text.split()
    assert counter.chat([{"role": "user", "content": "a b c " * 100}]) == PromptTokens(300, 300, 1)  # 600 bytes


def test_max_token_bytes_is_the_longest_token_in_bytes():
    class Vocab:
        def get_vocab(self):
            return {"a": 0, "Ġthe": 1, "<|im_start|>": 2, "巴黎": 3}

    assert max_token_bytes(Vocab()) == len("<|im_start|>")


# --- seeded sampling on CPU generators ---------------------------------------


def test_cpu_generators_lack_the_offset_vllm_rewinds():
    assert generator_lacks_offset("cpu")


def _fake_runner(discard: list[bool]):
    """A model runner with vLLM's shape where it matters: seeded CPU generators, the discard mask."""
    generators = {i: torch.Generator(device="cpu").manual_seed(1234 + i) for i in range(len(discard))}
    batch = SimpleNamespace(num_reqs=len(discard), generators=generators)
    runner = SimpleNamespace(device=torch.device("cpu"), input_batch=batch,
                             discard_request_mask=SimpleNamespace(np=np.array(discard)))

    def sample():  # draws from every request's generator, as vLLM's sampler does
        return [torch.empty(8).exponential_(generator=g).tolist() for g in batch.generators.values()]

    def bookkeeping():  # vLLM's rewind, verbatim in effect: fails on CPU generators
        for i in np.nonzero(runner.discard_request_mask.np[: batch.num_reqs])[0]:
            gen = batch.generators.get(int(i))
            if gen is not None:
                gen.set_offset(gen.get_offset() - 4)
        return "done"

    runner._sample, runner._bookkeeping_sync = sample, bookkeeping
    return runner


def test_unpatched_rewind_fails_on_cpu():
    runner = _fake_runner([True])
    runner._sample()
    with pytest.raises(RuntimeError, match="offset"):
        runner._bookkeeping_sync()


def test_patched_runner_rewinds_discarded_requests_exactly():
    runner = _fake_runner([True, False])
    assert make_seeded_sampling_safe(SimpleNamespace(model_runner=runner)).startswith("patched")
    first = runner._sample()
    assert runner._bookkeeping_sync() == "done"
    second = runner._sample()
    assert second[0] == first[0]  # discarded: the draw is as if it never happened
    assert second[1] != first[1]  # kept: its generator moved on
    assert runner.input_batch.generators  # restored after bookkeeping


def test_patch_is_applied_once_and_only_where_needed():
    runner = _fake_runner([False])
    worker = SimpleNamespace(model_runner=runner)
    make_seeded_sampling_safe(worker)
    assert make_seeded_sampling_safe(worker) == "unchanged: already patched"
    assert make_seeded_sampling_safe(SimpleNamespace(model_runner=None)).startswith("unchanged")
    assert make_seeded_sampling_safe(SimpleNamespace(model_runner=SimpleNamespace(device="cpu"))).startswith(
        "unchanged: this vLLM")


def test_discarded_generators_follow_the_mask():
    runner = _fake_runner([False, True, True])
    del runner.input_batch.generators[2]  # an unseeded request has none
    assert discarded_generators(runner) == [runner.input_batch.generators[1]]


def test_extension_is_added_unless_the_profile_names_its_own():
    assert extension_kwargs({}) == {"worker_extension_cls": EXTENSION_QUALNAME}
    assert extension_kwargs({"worker_extension_cls": EXTENSION_QUALNAME}) == {"worker_extension_cls": EXTENSION_QUALNAME}
    assert extension_kwargs({"worker_extension_cls": "other.Ext"}) is None
    # vLLM refuses an extension whose attributes clash with its worker's: one distinct name.
    assert all(a.startswith("llm_serving_") for a in dir(WorkerExtension) if not a.startswith("__"))
    assert {SEEDED_SAMPLING_RPC, GPU_UUID_RPC} <= set(dir(WorkerExtension))


def test_gpu_uuid_is_none_on_a_cpu_worker():
    import torch

    assert WorkerExtension.llm_serving_gpu_uuid(SimpleNamespace(device=torch.device("cpu"))) is None
    assert WorkerExtension.llm_serving_gpu_uuid(SimpleNamespace()) is None


def test_gpu_group_reading_is_absent_without_nvml_gpus():
    from deployments.autoscaling.gpu import device_uuids, read_group

    if device_uuids():
        pytest.skip("this host has NVIDIA GPUs")
    assert read_group(["GPU-00000000-0000-0000-0000-000000000000"], samples=1) is None
    assert read_group([], samples=1) is None


# --- errors raised by vLLM or Ray Serve LLM, as a client reads them ------------------------------------------

@pytest.mark.parametrize("raw, message, param", [
    ("Message: vllm.exceptions.VLLMValidationError: Either prompt or prompt_embeds must be provided and non-empty. "
     "(parameter=prompt) (Request ID: 4e6b), Internal exception: vllm.exceptions.VLLMValidationError: Either "
     "prompt ... (Request ID: 4e6b), original exception: Either prompt",
     "Either prompt or prompt_embeds must be provided and non-empty. (parameter=prompt)", "prompt"),
    ("Message: Unable to find nope. Please ensure that the model exists and you have permission. (Request ID: 5a6), "
     "Internal exception: ray.llm._internal.serve.core.configs.openai_api_models.OpenAIHTTPException (Request ID: "
     "5a6), original exception: ",
     "Unable to find nope. Please ensure that the model exists and you have permission.", None),
    ("Requested sample logprobs of 100, which is greater than max allowed: 20 (parameter=logprobs, value=100)",
     "Requested sample logprobs of 100, which is greater than max allowed: 20 (parameter=logprobs, value=100)",
     "logprobs"),
    # No (parameter=...) marker: the first request field the message names (a fresh-eye trial found these
    # with param null).
    ("top_k must be 0 (disable), or at least 1, got -5.", "top_k must be 0 (disable), or at least 1, got -5.",
     "top_k"),
    ("min_tokens must be less than or equal to max_tokens=5, got 100.",
     "min_tokens must be less than or equal to max_tokens=5, got 100.", "min_tokens"),
    ("Prompt cannot be empty", "Prompt cannot be empty", "prompt"),
    ("Grammar error: unknown type 'nonsense'", "Grammar error: unknown type 'nonsense'", None),
    ("The model answered with a stream error", "The model answered with a stream error", None),  # a prose word
])
def test_an_engine_error_reads_once_without_exception_classes_and_names_its_field(raw, message, param):
    from deployments.router.errors import readable

    assert readable(raw) == (message, param)


@pytest.mark.parametrize("status, given, expected", [
    (400, "BadRequestError", "invalid_request_error"),
    (404, "OpenAIHTTPException", "invalid_request_error"),
    (405, None, "invalid_request_error"),
    (415, None, "invalid_request_error"),
    (429, None, "rate_limit_error"),
    (401, "authentication_error", "authentication_error"),
    (500, "InternalServerError", "server_error"),
    (503, None, "service_unavailable_error"),
])
def test_an_error_type_is_always_one_of_openais(status, given, expected):
    from deployments.router.errors import error_type_for

    assert error_type_for(status, given) == expected
