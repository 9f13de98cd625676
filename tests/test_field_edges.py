"""Every field of the chat and completion requests at its edge values, against the live engine.

Why: one ordinary field value (``seed`` under chunked prefill) once killed the
CPU engine for every client (issue 11). Fixing such values one at a time
misses the next one, so this sends the whole kind: each field of vLLM's
``ChatCompletionRequest`` and ``CompletionRequest`` (as Ray Serve LLM and the
router extend them) at its edges (zero, negative, huge, empty, null, wrong
type, very long, unicode), plus the combinations vLLM has special paths for.

The field list comes from the models' ``model_fields``: a field a vLLM upgrade
adds fails ``test_every_field_has_edge_values`` until it gets a row in EDGES.

Every answer must be 200, or a 4xx in OpenAI's error format whose message
names the field; never a 5xx, never a hang. After each group the engine must
still serve a plain request. Requests go out a few at a time (the engine
batches them) with one or two output tokens, so the module stays short.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re

import httpx
import pytest

from deployments.models.embedded import model_dir

pytestmark = [pytest.mark.integration]

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
REQUEST_TIMEOUT_S = 90  # a hang fails the request instead of the whole suite
IN_FLIGHT = 6

_CONFIG = json.loads((model_dir() / "config.json").read_text())
VOCAB = _CONFIG["vocab_size"]
EOS = _CONFIG["eos_token_id"]

NAN, INF = float("nan"), float("inf")
LONG = "edge " * 8000  # 40k characters, ~8k tokens: beyond the CPU profile's 4096 context
UNICODE = "Zürich 東京 🚀 e\u0301 \u202eRTL\u202c \u200b\x00\x1f end"
SURROGATE = "lone \ud800 surrogate"  # valid JSON escape, not encodable as UTF-8


def _deep(levels: int) -> dict:
    value: dict = {"leaf": 1}
    for _ in range(levels):
        value = {"k": value}
    return value


DEEP = _deep(200)

# --- the kinds of edge values -----------------------------------------------------

WRONG = [None, "x", [], {}]  # null and the wrong JSON types
INT = [0, 1, -1, 2**31, 2**63, -(2**63) - 1, 10**40, 1.5, True, *WRONG]
FLOAT = [0, -1, 2.5, 1e308, -1e308, NAN, INF, -INF, *WRONG]
BOOL = [True, False, 1, "yes", *WRONG]
TEXT = ["", "x", UNICODE, SURROGATE, LONG, 123, *WRONG]
TOKENS = [[], [0], [EOS], [VOCAB - 1], [VOCAB], [-1], [2**63], list(range(2000)), [1.5], ["a"], [None], None, "x"]
MAPPING = [{}, {"k": "v"}, {"k": LONG}, {"k": UNICODE}, DEEP, None, "x", [], 1]

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
TOOL = {"type": "function", "function": {"name": "f", "description": "d", "parameters": SCHEMA}}


def _deep_schema(levels: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def json_schema(schema) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}


# A Jinja loop of 10^10 steps: a template a client sends must not be run.
JINJA_BOMB = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"

# --- the table: every field, its edge values --------------------------------------
# A value wrapped in With(...) is sent together with other fields.


class With:
    def __init__(self, value, **others):
        self.value, self.others = value, others


class PerPath:
    """A companion value that differs by endpoint: ``logprobs`` is a boolean in chat and a count in
    completions (OpenAI's API; the router refuses the other type, as OpenAI does)."""

    def __init__(self, chat, completions):
        self.values = {CHAT: chat, COMPLETIONS: completions}


LOGPROBS_ON = PerPath(chat=True, completions=1)


# Lets a request with a large or unset max_tokens end after one token: the only
# token it may produce is end-of-sequence.
ONE_TOKEN = {"allowed_token_ids": [EOS]}


def _many_tokens(values):
    return [With(v, **ONE_TOKEN) for v in values]


EDGES: dict[str, list] = {
    # what is asked
    "messages": [
        [], [{"role": "user", "content": ""}], [{"role": "user", "content": LONG}],
        [{"role": "user", "content": UNICODE}], [{"role": "user", "content": SURROGATE}],
        [{"role": "bogus", "content": "hi"}], [{"role": "user", "content": 1}], [{"role": "user"}],
        [{"role": "assistant", "content": "hi"}], [{"role": "system", "content": "hi"}],
        [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "bogus"}]}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}],
        [{"role": "tool", "content": "x", "tool_call_id": "1"}],
        [{"role": "user", "content": "hi"}] * 300, None, "x", {}, [None], [1],
    ],
    "prompt": [
        "", "x", UNICODE, SURROGATE, LONG, [], [[]], [""], ["a", "b"], [0], [EOS], [VOCAB - 1] * 8, [VOCAB], [-1],
        [2**63], [[1, 2], [3]], [[1], "a"], list(range(5000)), [1.5], None, 1, {},
    ],
    "model": ["", "nope", UNICODE, LONG, None, 1, []],
    "suffix": TEXT,
    "prompt_embeds": ["", "x", base64.b64encode(b"\x00" * 64).decode(), [], ["x"], None, 1],
    # how much
    "max_tokens": _many_tokens([0, 1, -1, 2**31, 2**63, 10**40, None, 1.5, "x", []]),
    "max_completion_tokens": _many_tokens([0, 1, -1, 2**31, 2**63, 10**40, None, 1.5, "x", []]),
    "min_tokens": [With(v, max_tokens=2) for v in (0, 1, 2, 3, -1, 2**63, 1.5, None, "x")],
    "n": [*INT, 4, 5, 128],
    "ignore_eos": BOOL,
    "stream": BOOL,
    "stream_options": [{"include_usage": True}, {"continuous_usage_stats": True}, {"bogus": 1}, *WRONG,
                       With({"include_usage": True, "continuous_usage_stats": True}, stream=True)],
    "stream_interval": [With(v, stream=True) for v in INT],
    "echo": BOOL,
    "add_generation_prompt": BOOL,
    "continue_final_message": BOOL + [With(True, add_generation_prompt=False)],
    "add_special_tokens": BOOL,
    # sampling
    "temperature": FLOAT,
    "top_p": FLOAT + [1e-300],
    "top_k": INT + [VOCAB, VOCAB + 1],
    "min_p": FLOAT + [1.0],
    "frequency_penalty": FLOAT + [2.0, -2.0],
    "presence_penalty": FLOAT + [2.0, -2.0],
    "repetition_penalty": FLOAT + [1e-300],
    "length_penalty": FLOAT + [With(NAN, use_beam_search=True)],
    "use_beam_search": BOOL + [With(True, n=4)],
    "seed": INT + [2**63 - 1, -(2**63), With(1, temperature=1.0)],
    "logit_bias": [{}, {"0": 100}, {str(EOS): -100}, {str(VOCAB): 1}, {"-1": 1}, {"abc": 1}, {"1": NAN},
                   {"1": INF}, {"1": 1e308}, {"1": "x"}, {str(i): 1.0 for i in range(VOCAB)}, None, "x", [], 1],
    "bad_words": [[], [""], ["the"], [LONG], [UNICODE], [SURROGATE], [f"w{i}" for i in range(2000)], None, "x",
                  [1]],
    "allowed_token_ids": TOKENS,
    "stop": ["", "x", UNICODE, SURROGATE, LONG, [], [""], ["a", "b", "c", "d", "e"], [LONG],
             [f"s{i}" for i in range(1000)], None, 1, [1], {}],
    "stop_token_ids": TOKENS,
    "include_stop_str_in_output": BOOL,
    "skip_special_tokens": BOOL,
    "spaces_between_special_tokens": BOOL,
    "repetition_detection": [{}, {"max_pattern_size": 2, "min_count": 2}, {"max_pattern_size": -1},
                             {"max_pattern_size": 10**9, "min_count": 2}, {"min_pattern_size": 3, "max_pattern_size": 1},
                             {"bogus": 1}, *WRONG],
    "thinking_token_budget": INT,
    # output form
    "logprobs": [True, False, 0, 1, 5, 20, 21, -1, 2**63, 1.5, "x", None, [], {}],
    "top_logprobs": [With(v, logprobs=True) for v in (0, 1, 20, 21, -1, -2, 2**63, 1.5, None, "x")] + [5],
    "prompt_logprobs": [0, 1, 20, 21, -1, -2, 2**63, 1.5, None, "x", [], With(1, stream=True)],
    "logprob_token_ids": [With(v, logprobs=LOGPROBS_ON) for v in TOKENS] + [[1]],
    "return_tokens_as_token_ids": BOOL + [With(True, logprobs=LOGPROBS_ON)],
    "return_token_ids": BOOL,
    "return_token_offsets": BOOL,
    "return_prompt_text": BOOL,
    "return_assistant_tokens_mask": BOOL,
    "response_format": [
        {"type": "text"}, {"type": "json_object"}, {"type": "json_schema"}, json_schema(SCHEMA),
        json_schema({"type": "nonsense"}), json_schema(_deep_schema(100)), json_schema({"type": "string", "pattern": "(a+)+$"}),
        json_schema("x"), {"type": "structural_tag", "structures": [], "triggers": []}, {"type": "bogus"}, *WRONG,
    ],
    "structured_outputs": [
        {}, {"json": SCHEMA}, {"json": "{not json"}, {"regex": "[a-z]+"}, {"regex": "("}, {"choice": ["a", "b"]},
        {"choice": []}, {"grammar": 'root ::= "a"'}, {"grammar": "garbage ::="}, {"json_object": True},
        {"json": SCHEMA, "regex": "a"}, {"structural_tag": "x"}, {"whitespace_pattern": "("}, {"bogus": 1}, *WRONG,
    ],
    "tools": [[], [TOOL], [{"type": "function"}], [{"type": "bogus"}], [TOOL] * 200,
              [{**TOOL, "function": {**TOOL["function"], "parameters": _deep_schema(100)}}], *WRONG],
    "tool_choice": ["none", "auto", "required", "bogus", {"type": "function", "function": {"name": "f"}},
                    {"type": "function", "function": {}}, With("required", tools=[TOOL]),
                    With({"type": "function", "function": {"name": "f"}}, tools=[TOOL]), *WRONG, 1],
    "parallel_tool_calls": BOOL,
    "reasoning_effort": ["none", "minimal", "low", "high", "max", "bogus", *WRONG],
    "include_reasoning": BOOL,
    # chat rendering
    "chat_template": ["", "{{ 'x' }}", JINJA_BOMB, "{{ raise_exception('boom') }}", "{% if %}", LONG, *WRONG],
    "chat_template_kwargs": [{}, {"add_generation_prompt": False}, {"tokenize": True}, {"chat_template": JINJA_BOMB},
                             {"messages": []}, {"enable_thinking": True}, {"k": LONG}, *WRONG, 1],
    "documents": [[], [{"title": "t", "text": "x"}], [{"title": "t", "text": LONG}], [{"a": 1}], "x", None, [1]],
    "media_io_kwargs": [{}, {"image": {"k": 1}}, {"image": "x"}, *WRONG],
    "mm_processor_kwargs": MAPPING,
    "truncate_prompt_tokens": INT + [-2, 4096, 4097],
    "truncation_side": ["left", "right", "middle", *WRONG, With("left", truncate_prompt_tokens=1)],
    # routing and bookkeeping
    "priority": INT,
    "request_id": TEXT,
    "session_id": TEXT,
    "user": TEXT,
    "cache_salt": ["", "x", "s" * 1024, "s" * 1025, UNICODE, SURROGATE, *WRONG, 1],
    "kv_transfer_params": MAPPING + [{"do_remote_prefill": True, "remote_engine_id": "x", "remote_block_ids": [1]},
                                     {"do_remote_decode": True}],
    "ec_transfer_params": MAPPING,
    "vllm_xargs": [{}, {"a": 1}, {"a": [1, "x", 2.5]}, {"a": {"b": 1}}, {"a": None}, {"a": LONG}, None, "x", []],
    "routed_experts_prompt_start": INT,
}

# Field names the message may use for a field instead of its own.
ALSO_NAMED = {
    # The messages become the prompt; content parts are the fuzz tests' subject (tests/test_fuzz.py).
    "messages": ("prompt", "content", "multimodal"),
    "chat_template_kwargs": ("chat template",),
    # vLLM names the part of the value at fault: a sub-field, the grammar built from it, the other tool field.
    "repetition_detection": ("max_pattern_size", "min_pattern_size", "min_count"),
    "response_format": ("grammar", "schema", "json"),
    "structured_outputs": ("grammar", "choice", "json", "regex"),
    "tools": ("tool_choice",),
    "max_completion_tokens": ("max_tokens",),
    "top_logprobs": ("logprobs",),
    "logprob_token_ids": ("logprobs",),
    "continue_final_message": ("add_generation_prompt",),
    "add_generation_prompt": ("continue_final_message",),
    "stream_interval": ("stream",),
    "length_penalty": ("beam",),
    "use_beam_search": ("beam",),
}

# Combinations vLLM has special paths for, each a set of fields added to the base body.
LONG_PROMPT = "Tell me about the sea. " * 40  # ~240 tokens: prefilled in chunks on the CPU profile
COMBINATIONS: dict[str, tuple[str, dict]] = {
    "seed+n": (CHAT, {"seed": 1, "n": 4, "temperature": 1.0, "max_tokens": 2}),
    "seed+n+stream": (CHAT, {"seed": 2, "n": 3, "temperature": 1.0, "stream": True, "max_tokens": 2}),
    "seed+n+chunked-prefill": (COMPLETIONS, {"prompt": LONG_PROMPT, "seed": 3, "n": 2, "temperature": 1.0}),
    "seed+int64-edges": (CHAT, {"seed": -(2**63), "n": 2, "temperature": 1.0}),
    "seed+prompt_logprobs+chunked": (COMPLETIONS, {"prompt": LONG_PROMPT, "seed": 4, "prompt_logprobs": 5}),
    "seed+logprobs+top_k": (CHAT, {"seed": 5, "logprobs": True, "top_logprobs": 20, "top_k": 1}),
    "seed+structured": (CHAT, {"seed": 6, "n": 2, "response_format": json_schema(SCHEMA), "max_tokens": 4}),
    "logprobs-20+n": (COMPLETIONS, {"logprobs": 20, "n": 4, "echo": True}),
    "logprobs+stream": (CHAT, {"logprobs": True, "top_logprobs": 5, "stream": True, "n": 2}),
    "top_logprobs-no-logprobs": (CHAT, {"logprobs": False, "top_logprobs": 5}),
    "logprob_token_ids+beam": (CHAT, {"logprobs": True, "logprob_token_ids": [1], "use_beam_search": True}),
    "logit_bias+allowed": (CHAT, {"logit_bias": {str(EOS): -100}, "allowed_token_ids": [EOS]}),
    "logit_bias+seed+n": (CHAT, {"logit_bias": {"1": 50, "5": -100}, "seed": 7, "n": 2, "temperature": 1.0}),
    "stop+stop_token_ids+include": (COMPLETIONS, {"stop": ["a"], "stop_token_ids": [EOS], "include_stop_str_in_output": True,
                                                  "max_tokens": 4}),
    "stop+stream": (CHAT, {"stop": [" ", "e"], "stream": True, "max_tokens": 4}),
    "allowed=eos+min_tokens": (CHAT, {"allowed_token_ids": [EOS], "min_tokens": 2, "max_tokens": 3}),
    "allowed+bad_words": (CHAT, {"allowed_token_ids": [EOS, 28], "bad_words": ["the"]}),
    "allowed+stop_token_ids": (COMPLETIONS, {"allowed_token_ids": [28], "stop_token_ids": [28]}),
    "allowed+ignore_eos": (CHAT, {"allowed_token_ids": [EOS], "ignore_eos": True, "max_tokens": 2}),
    "json_schema+stream": (CHAT, {"response_format": json_schema(SCHEMA), "stream": True, "max_tokens": 4}),
    "json_schema+completion": (COMPLETIONS, {"response_format": json_schema(SCHEMA), "max_tokens": 4}),
    "json_object+allowed": (CHAT, {"response_format": {"type": "json_object"}, "allowed_token_ids": [EOS]}),
    "structured+tools": (CHAT, {"structured_outputs": {"regex": "a"}, "tools": [TOOL],
                                "tool_choice": {"type": "function", "function": {"name": "f"}}}),
    "echo+logprobs": (COMPLETIONS, {"echo": True, "logprobs": 5}),
    "echo+stream": (COMPLETIONS, {"echo": True, "stream": True}),
    "echo+token-ids": (COMPLETIONS, {"echo": True, "prompt": [1, 2, 3], "logprobs": 1}),
    "echo+max_tokens-0": (COMPLETIONS, {"echo": True, "max_tokens": 0}),
    "chat-echo+continue": (CHAT, {"echo": True, "continue_final_message": True, "add_generation_prompt": False,
                                  "messages": [{"role": "user", "content": "Hi"},
                                               {"role": "assistant", "content": "Hello"}]}),
    # min_tokens masks the stop tokens' logits by index inside the engine's sampler.
    "min_tokens+stop_token_ids-beyond-vocab": (CHAT, {"min_tokens": 1, "max_tokens": 2, "stop_token_ids": [VOCAB]}),
    "min_tokens+stop_token_ids-negative": (CHAT, {"min_tokens": 1, "max_tokens": 2, "stop_token_ids": [-1]}),
    "min_tokens+stop_token_ids-int64": (COMPLETIONS, {"min_tokens": 1, "max_tokens": 2, "stop_token_ids": [2**63 - 1]}),
    "min_tokens>max_tokens": (CHAT, {"min_tokens": 5, "max_tokens": 2}),
    "min_tokens+stop": (COMPLETIONS, {"min_tokens": 2, "max_tokens": 2, "stop": ["a", " "], "stop_token_ids": [EOS]}),
    "prompt_logprobs+echo+n": (COMPLETIONS, {"prompt_logprobs": 2, "echo": True, "n": 2}),
    "prompt_logprobs+token-ids": (COMPLETIONS, {"prompt_logprobs": 1, "prompt": [VOCAB - 1, 0, EOS]}),
    "prompt_logprobs+stream": (COMPLETIONS, {"prompt_logprobs": 1, "stream": True}),
    "token-ids-batch+n": (COMPLETIONS, {"prompt": [[1, 2], [EOS]], "n": 2}),  # 4 sequences: max_n
    "token-ids+truncate": (COMPLETIONS, {"prompt": list(range(100)), "truncate_prompt_tokens": 10}),
    "truncate-0": (COMPLETIONS, {"prompt": "Hello there", "truncate_prompt_tokens": 0}),
    "string-batch+seed": (COMPLETIONS, {"prompt": ["a", "b", "c"], "seed": 8, "temperature": 1.0}),
    "beam+n+stream": (CHAT, {"use_beam_search": True, "n": 2, "stream": True}),
    "n-max+best-effort": (CHAT, {"n": 4, "logprobs": True, "top_logprobs": 20, "seed": 9, "max_tokens": 2}),
}

# --- sending and judging ------------------------------------------------------------

BASE = {
    CHAT: {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
    COMPLETIONS: {"prompt": "Hi", "max_tokens": 1},
}


def request_fields(path: str) -> set[str]:
    """The fields of the request model the router parses each path with."""
    from deployments.router.request_models import ChatCompletionRequest, CompletionRequest

    return set((ChatCompletionRequest if path == CHAT else CompletionRequest).model_fields)


def body_for(path: str, model_id: str, field: str, value) -> dict:
    body = {"model": model_id, **BASE[path]}
    if isinstance(value, With):
        body.update({k: v.values[path] if isinstance(v, PerPath) else v for k, v in value.others.items()})
        value = value.value
    if field == "max_completion_tokens":
        body.pop("max_tokens")  # else max_tokens would stand in for a max_completion_tokens of 0
    body[field] = value
    return body


def encode(body: dict) -> bytes:
    # allow_nan: NaN and Infinity are what a JSON body may carry past strict parsers.
    return json.dumps(body, allow_nan=True).encode()


def strict_json(body: dict) -> bool:
    try:
        json.dumps(body, allow_nan=False)
        return True
    except ValueError:
        return False


def names_field(message: str, names) -> bool:
    text = message.lower()
    return any(n.lower() in text or n.replace("_", " ").lower() in text for n in names)


def judge(response: httpx.Response | Exception, names, body_level: bool = False) -> str | None:
    """None when the answer is acceptable, else what is wrong with it.

    ``body_level``: the body is not strict JSON, so an error about the body need not name a field.
    """
    if isinstance(response, Exception):
        return f"no answer: {type(response).__name__}: {response}"
    status, text = response.status_code, response.text
    if status == 200:
        return _judge_success(response)
    if not 400 <= status < 500:
        return f"HTTP {status}: {text[:300]}"
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status} outside OpenAI's error format: {text[:300]}"
    if not {"message", "type", "param", "code"} <= set(error) or not isinstance(error["message"], str):
        return f"HTTP {status} error lacks OpenAI's keys: {text[:300]}"
    if status in (404, 413):  # unknown model, oversized body: about the request, not one field
        return None
    if body_level and "JSON" in error["message"]:  # NaN / Infinity: the body is not JSON, whatever field holds it
        return None
    if not names_field(error["message"], names):
        return f"HTTP {status} without naming {names[0]}: {error['message'][:300]}"
    return None


def _judge_success(response: httpx.Response) -> str | None:
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            return f"stream did not end with [DONE]: {response.text[-300:]}"
        for event in events[:-1]:
            error = json.loads(event).get("error")
            if error and not 400 <= int(error.get("code") or 500) < 500:
                return f"stream error event: {event[:300]}"
        return None
    body = response.json()
    if not body.get("choices"):
        return f"200 without choices: {response.text[:300]}"
    return None


async def send_all(base_url: str, requests: list[tuple[str, dict]]) -> list[httpx.Response | Exception]:
    """POST each (path, body), IN_FLIGHT at a time; a timeout is an answer (a hang), not a crash of the test."""
    gate = asyncio.Semaphore(IN_FLIGHT)
    async with httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT_S) as client:
        async def one(path, body):
            async with gate:
                try:
                    return await client.post(path, content=encode(body), headers={"content-type": "application/json"})
                except httpx.HTTPError as exc:
                    return exc
        return await asyncio.gather(*(one(path, body) for path, body in requests))


def assert_engine_serves(base_url: str, model_id: str) -> None:
    body = {"model": model_id, "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 2, "temperature": 0}
    response = httpx.post(base_url + CHAT, json=body, timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == 200, f"the engine no longer serves: {response.status_code} {response.text[:500]}"
    assert response.json()["choices"][0]["message"]["content"] is not None


def short(value) -> str:
    text = repr(value.value if isinstance(value, With) else value)
    return text if len(text) < 80 else text[:77] + "..."


# --- the tests --------------------------------------------------------------------------


def test_every_field_has_edge_values():
    fields = request_fields(CHAT) | request_fields(COMPLETIONS)
    assert not fields - EDGES.keys(), f"fields without edge values in EDGES: {sorted(fields - EDGES.keys())}"
    assert not EDGES.keys() - fields, f"EDGES rows for fields no model has: {sorted(EDGES.keys() - fields)}"


@pytest.mark.parametrize("field", sorted(EDGES))
def test_field_at_its_edges(base_url, model_id, field):
    paths = [path for path in (CHAT, COMPLETIONS) if field in request_fields(path)]
    cases = [(path, value, body_for(path, model_id, field, value)) for path in paths for value in EDGES[field]]
    answers = asyncio.run(send_all(base_url, [(path, body) for path, _, body in cases]))
    names = (field, *ALSO_NAMED.get(field, ()))
    problems = [f"{path} {field}={short(value)}: {problem}"
                for (path, value, body), answer in zip(cases, answers)
                if (problem := judge(answer, names, not strict_json(body))) is not None]
    assert not problems, "\n".join(problems)
    assert_engine_serves(base_url, model_id)


@pytest.mark.parametrize("name", sorted(COMBINATIONS))
def test_combination(base_url, model_id, name):
    path, fields = COMBINATIONS[name]
    body = {"model": model_id, **BASE[path], **fields}
    [answer] = asyncio.run(send_all(base_url, [(path, body)]))
    problem = judge(answer, tuple(fields), not strict_json(body))
    assert problem is None, f"{name}: {problem}"
    assert_engine_serves(base_url, model_id)


def test_one_request_id_on_concurrent_requests(base_url, model_id):
    # vLLM keys its requests by id; a client reusing one must not collide inside the engine.
    body = {"model": model_id, **BASE[CHAT], "max_tokens": 2, "request_id": "same-id"}
    answers = asyncio.run(send_all(base_url, [(CHAT, body)] * IN_FLIGHT))
    problems = [p for a in answers if (p := judge(a, ("request_id",))) is not None]
    assert not problems, "\n".join(problems)
    assert_engine_serves(base_url, model_id)


def test_error_messages_carry_no_traceback(base_url, model_id):
    answers = asyncio.run(send_all(base_url, [(CHAT, body_for(CHAT, model_id, "n", "x")),
                                              (COMPLETIONS, body_for(COMPLETIONS, model_id, "prompt", [VOCAB]))]))
    for answer in answers:
        assert not re.search(r"Traceback|File \"/", answer.text), answer.text[:500]
