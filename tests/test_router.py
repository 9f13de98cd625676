"""The router on the running app: classes, admission, queues, deadlines, aborts.

Real HTTP against the session cluster (real Ray, real vLLM CPU engine).
Nothing here asserts a timing: only order, status codes and engine state.
"""

from __future__ import annotations

import asyncio
import math
import time

import httpx
import pytest

pytestmark = pytest.mark.integration

SHORT = [{"role": "user", "content": "Say hello."}]


def chat_body(model_id, messages=SHORT, **extra):
    return {"model": model_id, "messages": messages, **extra}


def long_generation(model_id, **extra):
    # ignore_eos keeps the engine busy for the whole max_tokens.
    return chat_body(model_id, max_tokens=1500, ignore_eos=True, temperature=0, **extra)


def engine_idle(base_url, model_id, timeout=30.0) -> dict:
    """Poll the engine's own counters until nothing runs or waits; return them."""
    deadline = time.monotonic() + timeout
    load = {}
    while time.monotonic() < deadline:
        load = httpx.get(base_url + "/health", timeout=30).json()["pools"]["main"]["engine_load"]
        if load["running"] == 0 and load["waiting"] == 0 and load["unfinished"] == 0:
            return load
        time.sleep(0.5)
    raise AssertionError(f"engine still busy after {timeout}s: {load}")


def test_response_headers(base_url, model_id):
    r = httpx.post(base_url + "/v1/chat/completions", json=chat_body(model_id, max_tokens=4), timeout=60)
    assert r.status_code == 200
    assert len(r.headers.get_list("x-request-id")) == 1 and r.headers["x-request-id"]  # one, from Serve
    assert r.headers["x-priority-class"] == "high"
    assert float(r.headers["x-queue-wait-ms"]) >= 0
    assert r.headers["x-max-tokens-applied"] == "4"
    assert 0 < int(r.headers["x-prompt-tokens"]) == r.json()["usage"]["prompt_tokens"]


def test_a_completions_batch_reports_all_its_prompt_tokens_and_may_not_exceed_max_n(base_url, model_id):
    prompts = ["The capital of France is", "Once upon a time, in a small village by the sea,"]
    r = httpx.post(base_url + "/v1/completions", timeout=60,
                   json={"model": model_id, "prompt": prompts, "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 2
    assert int(r.headers["x-prompt-tokens"]) == r.json()["usage"]["prompt_tokens"]  # both prompts, as vLLM
    # A batch of many prompts would run as many sequences as many requests while holding one slot.
    r = httpx.post(base_url + "/v1/completions", timeout=60,
                   json={"model": model_id, "prompt": ["Hi"] * 64, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    assert "64 prompts" in r.json()["error"]["message"]


def test_class_by_prompt_tokens_and_header(base_url, model_id):
    medium = [{"role": "user", "content": "word " * 300}]
    r = httpx.post(base_url + "/v1/chat/completions", json=chat_body(model_id, medium, max_tokens=2), timeout=60)
    assert r.headers["x-priority-class"] == "medium"
    lowered = httpx.post(base_url + "/v1/chat/completions", json=chat_body(model_id, medium, max_tokens=2),
                         headers={"X-Priority": "low"}, timeout=60)
    assert lowered.headers["x-priority-class"] == "low"
    raised = httpx.post(base_url + "/v1/chat/completions", json=chat_body(model_id, medium, max_tokens=2),
                        headers={"X-Priority": "high"}, timeout=60)
    assert raised.status_code == 400 and raised.json()["error"]["param"] == "x-priority"


def test_max_tokens_is_clamped_and_reported(base_url, model_id):
    body = chat_body(model_id, max_tokens=5000, stream=True)
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["x-max-tokens-applied"] == "2048"
        next(r.iter_lines())  # one chunk is enough; closing aborts the rest
    engine_idle(base_url, model_id)


def test_prompt_plus_max_tokens_beyond_context_names_both(base_url, model_id):
    prompt = [{"role": "user", "content": "word " * 3000}]
    r = httpx.post(base_url + "/v1/chat/completions", json=chat_body(model_id, prompt, max_tokens=2000), timeout=60)
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    prompt_tokens = message.split("prompt (")[1].split(" tokens")[0]
    assert int(prompt_tokens) > 3000 and "2000" in message and "4096" in message


@pytest.mark.parametrize("field, value", [("temperature", -1), ("top_p", 1.5), ("top_p", 0), ("n", 9)])
def test_out_of_range_sampling_is_400(base_url, model_id, field, value):
    r = httpx.post(base_url + "/v1/chat/completions", json=chat_body(model_id, **{field: value}), timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field


def test_huge_body_is_413(base_url, model_id):
    body = chat_body(model_id, [{"role": "user", "content": "x" * (5 * 1024 * 1024)}])
    r = httpx.post(base_url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == 413


def test_one_megabyte_prompt_is_400_not_a_hang(base_url, model_id):
    body = chat_body(model_id, [{"role": "user", "content": "Paris 🗼 Париж 巴黎 " * 50_000}])
    r = httpx.post(base_url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]


def test_a_client_timeout_that_cannot_be_met_is_refused_before_any_engine_work(base_url, model_id):
    r = httpx.post(base_url + "/v1/chat/completions", json=long_generation(model_id),
                   headers={"X-Request-Timeout": "2"}, timeout=60)
    # 1500 tokens cannot be generated in 2 s here even with the engine to itself: no retry would help.
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "x-request-timeout" and "X-Request-Timeout of 2.0s" in error["message"]
    assert "retry-after" not in r.headers
    load = httpx.get(base_url + "/health", timeout=30).json()["pools"]["main"]["engine_load"]
    assert load["running"] == 0 and load["waiting"] == 0


def long_prompt(i):
    # ~3,000 tokens (class low): its prefill takes several seconds on the one CPU core.
    return [{"role": "user", "content": f"Summarise {i}: " + " ".join(["lighthouse keeper bottle"] * 1000)}]


@pytest.mark.parametrize("stream", [False, True])
def test_start_deadline_in_prefill_gives_504_and_aborts_the_engine_request(base_url, model_id, stream):
    body = chat_body(model_id, long_prompt(int(stream)), max_tokens=4, temperature=0, stream=stream)
    r = httpx.post(base_url + "/v1/chat/completions", json=body, headers={"X-Request-Timeout": "2"}, timeout=60)
    assert r.status_code == 504, r.text
    message = r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "timeout_error" and "passed before the answer" in message
    assert ("start deadline" if stream else "X-Request-Timeout") in message
    engine_idle(base_url, model_id)


def test_client_disconnect_aborts_the_engine_request(base_url, model_id):
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=long_generation(model_id, stream=True), timeout=60) as r:
        lines = r.iter_lines()
        next(lines), next(lines)
    busy = httpx.get(base_url + "/health", timeout=30).json()["pools"]["main"]["engine_load"]
    print("right after disconnect:", busy)
    engine_idle(base_url, model_id)


def flood(base_url, bodies, clients, headers=None):
    """Send ``bodies`` from ``clients`` concurrent clients, each taking the next when its last one ends."""
    async def run():
        todo, answers = list(bodies), []
        async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
            async def worker():
                while todo:
                    answers.append(await client.post("/v1/chat/completions", json=todo.pop(), headers=headers))
            await asyncio.gather(*[worker() for _ in range(clients)])
        return answers

    return asyncio.run(run())


def test_sixteen_concurrent_chats_are_served_or_refused_at_once_never_failed(base_url, model_id):
    # The new user's overload from issue 10: 32 short stories from 16 clients.
    story = [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a message in a bottle."}]
    body = chat_body(model_id, story, max_tokens=128, ignore_eos=True, temperature=0.7, top_p=0.9,
                     repetition_penalty=1.1)
    answers = flood(base_url, [body] * 32, clients=16)
    codes = [r.status_code for r in answers]
    print("statuses:", {c: codes.count(c) for c in set(codes)})
    assert set(codes) <= {200, 429} and 200 in codes, codes
    for refused in (r for r in answers if r.status_code == 429):
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert "start deadline" in refused.json()["error"]["message"]
    engine_idle(base_url, model_id)


def test_a_wait_beyond_the_start_deadline_is_refused_with_retry_after(base_url, model_id):
    # A 10 s deadline cannot cover 40 requests of 64 tokens on one CPU engine: most are refused at once.
    # (Never shorter than one request alone needs, with room: that would be a 400 for every request.)
    unloaded = httpx.get(base_url + "/health", timeout=30).json()["pools"]["main"]["unloaded_tpot_s"] or 0.0
    timeout_s = max(10, math.ceil(3 * 64 * unloaded))
    answers = flood(base_url, [chat_body(model_id, max_tokens=64, ignore_eos=True)] * 40, clients=40,
                    headers={"X-Request-Timeout": str(timeout_s)})
    codes = [r.status_code for r in answers]
    print("statuses:", {c: codes.count(c) for c in set(codes)},
          [r.json()["error"]["message"] for r in answers if r.status_code == 504][:3])
    rejected = [r for r in answers if r.status_code == 429]
    assert rejected and set(codes) <= {200, 429, 504}, codes
    assert all(int(r.headers["retry-after"]) >= 1 for r in rejected)
    # Known limit (docs/overload.md): a synchronised burst of whole (non-streamed) answers under a
    # tight client timeout can overshoot. Alone this run serves most of what it admits (18 x 200,
    # 4 x 504); late in a full suite on a busy 2-core machine one run admitted 24 and all of them
    # passed 10 s (504). Until admission forecasts that burst (issue 10), how many of the admitted
    # finish is reported, not asserted.
    engine_idle(base_url, model_id)


def test_high_request_overtakes_a_flood_of_low_ones(base_url, model_id):
    async def first_token_at(client, headers, body, start):
        """Read the whole stream (closing early would abort it); when did data start?"""
        first = None
        async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if first is None and line.startswith("data: "):
                    first = time.monotonic() - start
        return first

    async def scenario():
        async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
            # Long enough that the low ones hold their slots and the rest queue.
            # Low runs 1 at a time on the CPU profile: of 10, 9 must queue.
            low_body = chat_body(model_id, max_tokens=60, ignore_eos=True, stream=True)
            start = time.monotonic()
            lows = [asyncio.create_task(first_token_at(client, {"X-Priority": "low"}, low_body, start)) for _ in range(10)]
            await asyncio.sleep(1.0)  # the flood is in before the high request arrives
            high = await first_token_at(client, {}, chat_body(model_id, max_tokens=8, stream=True), start)
            return high, await asyncio.gather(*lows)

    high, lows = asyncio.run(scenario())
    overtaken = sum(1 for t in lows if t > high)
    print(f"high first token at {high:.2f}s; low ones: {sorted(round(t, 2) for t in lows)}")
    assert overtaken > len(lows) / 2
    engine_idle(base_url, model_id)
