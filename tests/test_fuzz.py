"""Property-based fuzzing of the live router: nothing a client sends gets a 5xx
or an error outside OpenAI's format, and the engine still serves afterwards.

Two generators, both against the session cluster (real Ray, real vLLM CPU engine):

- schemathesis reads the app's own ``/openapi.json`` and generates valid and
  invalid requests for every route (chat, completions, models, health); each
  response must not be a 5xx, must have a status, content type and body the
  document declares, and every error must be OpenAI's ``{"error": {...}}``;
- hypothesis builds chat messages the way clients get them wrong or exotic:
  every role, content as strings or part lists of every type, and arbitrary
  Unicode (lone surrogates as JSON escapes or raw bytes, NUL, RTL marks, emoji,
  combining marks, text beyond the context), sent as raw JSON bytes in UTF-8,
  UTF-16 or UTF-32. Each answer is checked against what OpenAI would say.

``max_tokens`` is kept small (a map_body hook for schemathesis), so the CPU
engine is never swamped. The default run (``make test``) is short and seeded;
``FUZZ_DEEP=1`` (``make fuzz``) runs many more examples and schemathesis'
coverage phase; ``FUZZ_EXAMPLES`` / ``FUZZ_SEED`` override either.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, example, given, seed, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import (
    content_type_conformance, response_schema_conformance, status_code_conformance,
)
from schemathesis.checks import not_a_server_error

pytestmark = [pytest.mark.integration]

DEEP = os.environ.get("FUZZ_DEEP", "") not in ("", "0")
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES") or (300 if DEEP else 40))
SEED = int(os.environ.get("FUZZ_SEED") or 1111)
SMALL_MAX_TOKENS = 2
REQUEST_TIMEOUT_S = 120
CONTEXT_TOKENS = 4096  # the embedded profile's max_model_len
# What OpenAI accepts (roles and user content part types); anything else is a 400.
OPENAI_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
OPENAI_PART_TYPES = ("text", "image_url", "input_audio", "file")


# --- OpenAI's error format -----------------------------------------------------


def openai_error_problem(status: int, body: Any) -> str | None:
    """Why ``body`` is not an OpenAI error body, or None when it is."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return f"{status} body has no 'error' object: {str(body)[:300]}"
    missing = {"message", "type", "param", "code"} - error.keys()
    if missing:
        return f"{status} error lacks {sorted(missing)}: {error}"
    if not isinstance(error["message"], str) or not error["message"] or "Traceback" in error["message"]:
        return f"{status} error message is not a plain message: {error['message']!r:.300}"
    if not isinstance(error["type"], str) or not (error["param"] is None or isinstance(error["param"], str)):
        return f"{status} error type/param have the wrong types: {error}"
    if not (error["code"] is None or isinstance(error["code"], (int, str))):
        return f"{status} error code has the wrong type: {error}"
    return None


@schemathesis.check
def openai_error_format(ctx, response, case):
    """Every 4xx/5xx answer is {"error": {"message", "type", "param", "code"}}."""
    if response.status_code < 400:
        return None
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError(f"{response.status_code} answer is not JSON: {response.content[:300]!r}")
    problem = openai_error_problem(response.status_code, body)
    if problem:
        raise AssertionError(problem)
    return True


# --- schemathesis over /openapi.json --------------------------------------------

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          openai_error_format]


def keep_it_small(body: Any, model_id: str) -> Any:
    """The served model (else every case is a cheap 404) and a tiny generation."""
    if not isinstance(body, dict):
        return body
    if isinstance(body.get("model"), str):
        body["model"] = model_id
    for field, most in (("max_tokens", SMALL_MAX_TOKENS), ("max_completion_tokens", SMALL_MAX_TOKENS),
                        ("min_tokens", SMALL_MAX_TOKENS), ("n", 2), ("best_of", 2)):
        value = body.get(field)
        # Keep ints at their low edge (0, negatives: a cheap 400); cap the rest.
        if isinstance(value, int) and not isinstance(value, bool) and value > most:
            body[field] = most
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = SMALL_MAX_TOKENS
    return body


@pytest.fixture(scope="module")
def api_schema(base_url, model_id):
    config = schemathesis.Config.from_dict({
        "seed": SEED,
        "phases": {"coverage": {"enabled": DEEP}, "stateful": {"enabled": False}},
        "generation": {"max-examples": EXAMPLES, "mode": "all", "database": "none", "no-shrink": not DEEP},
    })
    schema = schemathesis.openapi.from_url(base_url + "/openapi.json", config=config)

    @schema.hook
    def map_body(context, body):
        return keep_it_small(body, model_id)

    return schema


api = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(autouse=True)
def _nodeid_for_schemathesis(request):
    # schemathesis 4's lazy schemas rename the test node through `_nodeid`, which pytest 9 no longer has.
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


def test_openapi_document_declares_openai_errors(base_url):
    document = httpx.get(base_url + "/openapi.json", timeout=30).json()
    chat = document["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "422" not in chat and {"200", "400", "404", "413", "429", "503", "504"} <= chat.keys()
    assert "text/event-stream" in chat["200"]["content"]
    assert set(document["paths"]) == {"/v1/models", "/v1/models/{model}", "/v1/completions",
                                      "/v1/chat/completions", "/health"}


@api.parametrize()
def test_openapi_fuzz(case, model_id):
    # The map_body hook only sees fuzzed bodies; explicit and coverage cases are kept small here.
    case.body = keep_it_small(case.body, model_id)
    timed(f"{case.method} {case.path}", case.body,
          lambda: case.call_and_validate(checks=CHECKS, timeout=REQUEST_TIMEOUT_S))


# --- hypothesis over message content -------------------------------------------

EXOTIC = ["\x00", "a\x00b", "\u202eevil\u202c", "\u200f\u05e9\u05dc\u05d5\u05dd", "\u0645\u0631\u062d\u0628\u0627",
          "\U0001f600", "\U0001f468\u200d\U0001f469\u200d\U0001f467", "\U0001f1eb\U0001f1f7", "e\u0301\u0302\u0323",
          "Z\u0351\u036b\u0343\u036a\u0302\u036b", "\ufeff", "\uffff", "\U0010ffff", "\u2028\u2029", "\t\r\n",
          "\\u0000", '"}]', "\x7f\x1b[31m", "\u00a0\u3000", "\U0001d54f\U0001d560"]
LONE_SURROGATES = st.integers(0xD800, 0xDFFF).map(chr)


def texts(surrogates: bool = True) -> st.SearchStrategy[str]:
    parts = [st.text(max_size=40), st.sampled_from(EXOTIC),
             st.text(st.characters(categories=["Mn", "Me", "Cf", "Co", "Zs", "So"]), max_size=20)]
    if surrogates:
        parts.append(LONE_SURROGATES)
    short = st.lists(st.one_of(parts), max_size=4).map("".join)
    # Beyond the context whatever the tokenizer merges: every " unit" is at least one token.
    beyond = st.text(st.characters(blacklist_categories=["Z", "Cc", "Cs"]), min_size=1, max_size=3).map(
        lambda unit: (" " + unit) * (CONTEXT_TOKENS + 500))
    return st.one_of(short, short, short, beyond)


def content_parts(surrogates: bool) -> st.SearchStrategy[dict]:
    text = st.fixed_dictionaries({"type": st.just("text"), "text": texts(surrogates)})
    image = st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries(
        {"url": st.sampled_from(["data:image/png;base64,iVBORw0KGgo=", "data:,", "not a url"])})})
    audio = st.fixed_dictionaries({"type": st.just("input_audio"), "input_audio": st.fixed_dictionaries(
        {"data": st.just("AAAA"), "format": st.sampled_from(["wav", "mp3", "flac"])})})
    unknown = st.fixed_dictionaries({"type": st.text(max_size=12).filter(lambda t: t not in OPENAI_PART_TYPES),
                                     "text": texts(False)})
    return st.one_of(text, text, text, image, audio, unknown)


def contents(surrogates: bool) -> st.SearchStrategy[Any]:
    return st.one_of(texts(surrogates), texts(surrogates),
                     st.lists(st.one_of(content_parts(surrogates), texts(surrogates)), min_size=1, max_size=3))


def messages() -> st.SearchStrategy[list[dict]]:
    role = st.one_of(st.sampled_from(["system", "developer", "user", "assistant"]),
                     st.sampled_from(["USER", "user ", "", "bot", "human", "tool", "function"]), st.text(max_size=8))
    message = st.fixed_dictionaries({"role": role, "content": contents(True)},
                                    optional={"name": texts(True)})
    last = st.fixed_dictionaries({"role": st.just("user"), "content": contents(True)})
    return st.tuples(st.lists(message, max_size=3), last).map(lambda t: [*t[0], t[1]])


ENCODINGS = ("json-escapes", "utf-8", "utf-8-sig", "utf-16", "utf-16-be", "utf-32")


def encode(body: dict, encoding: str) -> bytes:
    """Raw JSON bytes; a lone surrogate stays an escape in ASCII, else its raw code units."""
    if encoding == "json-escapes":
        return json.dumps(body, ensure_ascii=True).encode("ascii")
    return json.dumps(body, ensure_ascii=False).encode(encoding, "surrogatepass")


def has_lone_surrogate(value: Any) -> bool:
    text = json.dumps(value, ensure_ascii=False)
    return any(0xD800 <= ord(c) <= 0xDFFF for c in text)


def expected_problem(msgs: list[dict]) -> str | None:
    """The param OpenAI would name in a 400 for these messages, or None when it would serve them."""
    for i, message in enumerate(msgs):
        if message["role"] not in OPENAI_ROLES:
            return f"messages[{i}].role"
        if message["role"] == "tool":
            return f"messages[{i}].tool_call_id"  # never generated
        if message["role"] == "function" and not message.get("name"):
            return f"messages[{i}].name"
        content = message["content"]
        if isinstance(content, list):
            for j, part in enumerate(content):
                if isinstance(part, str) or part.get("type") not in OPENAI_PART_TYPES:
                    return f"messages[{i}].content[{j}]"
    return None


# Every fuzzed request's time, so the slow ones are named at the end of the run (conftest.py's
# terminal summary): one example once took 70 s on the engine and nothing said which.
TIMINGS: list[tuple[float, str, str]] = []  # (seconds, path, what was sent, shortened)


def timed(path: str, sent: Any, call):
    started = time.monotonic()
    try:
        return call()
    finally:
        TIMINGS.append((time.monotonic() - started, path, repr(sent)[:300]))


def slowest(n: int = 5) -> list[tuple[float, str, str]]:
    """The ``n`` slowest fuzzed requests that took over 3x the median, slowest first."""
    if len(TIMINGS) < 10:
        return []
    median = sorted(t for t, _, _ in TIMINGS)[len(TIMINGS) // 2]
    return sorted((c for c in TIMINGS if c[0] > 3 * median), reverse=True)[:n]


def post_raw(base_url: str, path: str, raw: bytes) -> httpx.Response:
    return timed(path, raw, lambda: httpx.post(base_url + path, content=raw,
                                               headers={"content-type": "application/json"},
                                               timeout=REQUEST_TIMEOUT_S))


def assert_openai_error(response: httpx.Response) -> dict:
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    problem = openai_error_problem(response.status_code, response.json())
    assert problem is None, problem
    return response.json()["error"]


def check_answer(response: httpx.Response, msgs: list[dict]) -> None:
    status = response.status_code
    assert status < 500, f"{status}: {response.text[:500]}"
    if status != 200:
        assert_openai_error(response)
    if has_lone_surrogate(msgs):
        assert status == 400, response.text[:300]
        return
    if status == 400 and "context" in response.text:
        return  # beyond the model's context: OpenAI says the same
    problem = expected_problem(msgs)
    if problem is None:
        # Multimodal parts OpenAI accepts; a text-only model refuses them with a 400.
        multimodal = any(isinstance(m["content"], list) and any(isinstance(p, dict) and p["type"] != "text"
                                                                for p in m["content"]) for m in msgs)
        assert status == 200 or (multimodal and status == 400), f"{status}: {response.text[:500]}"
        if status == 200:
            assert response.json()["choices"], response.text[:300]
    else:
        assert status == 400, f"OpenAI refuses {problem}; got {status}: {response.text[:300]}"


# No shrinking in the short run: a failure is reported as found, within the time budget.
FUZZ_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
                         suppress_health_check=list(HealthCheck), print_blob=True,
                         phases=list(Phase) if DEEP else [Phase.explicit, Phase.generate])


@seed(SEED)
@FUZZ_SETTINGS
@given(msgs=messages(), encoding=st.sampled_from(ENCODINGS))
# One of each kind whatever the generator draws: OpenAI serves the first three and the
# function turn, and refuses the rest.
@example(msgs=[{"role": "system", "content": "\u202e\u05e9\u05dc\u05d5\u05dd e\u0301"},
               {"role": "user", "content": [{"type": "text", "text": "\U0001f468\u200d\U0001f469 \x00"},
                                            {"type": "text", "text": "hi"}]}], encoding="utf-16")
@example(msgs=[{"role": "developer", "content": "Be brief."}, {"role": "assistant", "content": "ok"},
               {"role": "user", "content": "\U0001f600"}], encoding="json-escapes")
@example(msgs=[{"role": "user", "content": "\ufeff\uffff\U0010ffff"}], encoding="utf-32")
@example(msgs=[{"role": "bot", "content": "hi"}, {"role": "user", "content": "hi"}], encoding="utf-8")
@example(msgs=[{"role": "user", "content": [{"type": "bogus", "text": "hi"}]}], encoding="utf-8")
@example(msgs=[{"role": "user", "content": ["a bare string part"]}], encoding="utf-8")
@example(msgs=[{"role": "tool", "content": "42"}, {"role": "user", "content": "hi"}], encoding="utf-8")
@example(msgs=[{"role": "function", "name": "f", "content": "42"}, {"role": "user", "content": "hi"}],
         encoding="utf-8")
@example(msgs=[{"role": "user", "content": "a\ud800"}], encoding="utf-8")
def test_chat_message_content_fuzz(base_url, model_id, msgs, encoding):
    body = {"model": model_id, "messages": msgs, "max_tokens": SMALL_MAX_TOKENS, "temperature": 0}
    check_answer(post_raw(base_url, "/v1/chat/completions", encode(body, encoding)), msgs)


@seed(SEED)
@FUZZ_SETTINGS
@given(prompt=st.one_of(texts(True), st.lists(texts(True), min_size=1, max_size=2)),
       encoding=st.sampled_from(ENCODINGS))
def test_completion_prompt_fuzz(base_url, model_id, prompt, encoding):
    body = {"model": model_id, "prompt": prompt, "max_tokens": SMALL_MAX_TOKENS, "temperature": 0}
    response = post_raw(base_url, "/v1/completions", encode(body, encoding))
    assert response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
    if response.status_code != 200:
        assert_openai_error(response)
    if has_lone_surrogate(prompt):
        assert response.status_code == 400 and assert_openai_error(response)["param"].startswith("prompt")


@pytest.mark.parametrize("raw, param", [
    (b'{"model": "M", "messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages[0].content"),
    (b'{"model": "M", "messages": [{"role": "user", "content": "\\udfff"}]}', "messages[0].content"),
    (b'{"model": "M", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud83d"}]}]}',
     "messages[0].content[0].text"),
    (b'{"model": "M", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', None),
    (b'{"model": "M", "messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}', None),
], ids=["surrogate", "low-surrogate", "surrogate-in-part", "nan", "infinity"])
def test_what_strict_json_refuses_is_400(base_url, model_id, raw, param):
    response = post_raw(base_url, "/v1/chat/completions", raw.replace(b'"M"', json.dumps(model_id).encode()))
    assert response.status_code == 400, response.text
    assert assert_openai_error(response)["param"] == param


def test_a_paired_surrogate_escape_is_an_ordinary_emoji(base_url, model_id):
    raw = json.dumps({"model": model_id, "messages": [{"role": "user", "content": "\U0001f600"}],
                      "max_tokens": SMALL_MAX_TOKENS}).encode()  # ensure_ascii: "\ud83d\ude00"
    assert b"\\ud83d\\ude00" in raw
    assert post_raw(base_url, "/v1/chat/completions", raw).status_code == 200


def test_engine_alive_after_fuzzing(base_url, model_id):
    # Runs after the fuzz tests above (file order): the engine still answers and /health is ok.
    body = {"model": model_id, "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 8, "temperature": 0}
    response = httpx.post(base_url + "/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == 200, response.text
    assert httpx.get(base_url + "/health", timeout=30).status_code == 200
