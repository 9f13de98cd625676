"""Live: the `embedded-cpu-split` layout, two pools of the embedded model on the CPU.

Redeploys the session app with `layout: embedded-cpu-split` and shows the
router sending each class to its own pool's engine: while a low request
generates on the `bulk` engine, the `interactive` engine is idle and still
answers a chat. Leaves the layout deployed (marker `changes_app`).
"""

from __future__ import annotations

import copy
import time

import httpx
import pytest
import yaml

from deployments.config.app_args import load_serve_config
from tests.cluster import redeploy, wait_healthy

pytestmark = [pytest.mark.integration, pytest.mark.changes_app]

POOLS = ("interactive", "bulk")


@pytest.fixture(scope="module")
def split_layout(base_url, tmp_path_factory):
    config = copy.deepcopy(load_serve_config())
    args = config["applications"][0]["args"]
    args.pop("profile")
    args["layout"] = "embedded-cpu-split"
    path = tmp_path_factory.mktemp("layout") / "serve_split.yaml"
    path.write_text(yaml.safe_dump(config))
    redeploy(str(path), pools=POOLS)
    wait_healthy(base_url)


def health(base_url) -> dict:
    return httpx.get(base_url + "/health", timeout=30).json()


def chat(model_id, text, **extra) -> dict:
    return {"model": model_id, "messages": [{"role": "user", "content": text}], **extra}


def test_health_lists_both_pools(split_layout, base_url):
    pools = health(base_url)["pools"]
    assert pools["interactive"]["classes"] == ["high", "medium"]
    assert pools["bulk"]["classes"] == ["low"]
    assert all(p["circuit"] == "closed" for p in pools.values())


def test_each_class_runs_on_its_own_pools_engine(split_layout, base_url, model_id):
    low = chat(model_id, "Tell a long story.", max_tokens=400, ignore_eos=True, stream=True)
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=low,
                      headers={"X-Priority": "low"}, timeout=120) as streaming:
        assert streaming.headers["x-llm-pool"] == "bulk" and streaming.headers["x-priority-class"] == "low"
        lines = streaming.iter_lines()
        next(line for line in lines if line.startswith("data: "))  # generating now
        engines = {name: pool["engine_load"] for name, pool in health(base_url)["pools"].items()}
        assert engines["bulk"]["running"] == 1 and engines["interactive"]["running"] == 0, engines

        # The interactive engine is free: a chat does not wait behind the story.
        started = time.monotonic()
        answer = httpx.post(base_url + "/v1/chat/completions", timeout=60,
                            json=chat(model_id, "What is the capital of France?", max_tokens=16, temperature=0))
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-llm-pool"] == "interactive" and answer.headers["x-priority-class"] == "high"
        assert "Paris" in answer.json()["choices"][0]["message"]["content"]
        print(f"chat answered in {time.monotonic() - started:.2f}s while the bulk engine generated")
        assert health(base_url)["pools"]["bulk"]["engine_load"]["running"] == 1  # the story still going


def test_context_checks_use_the_chosen_pools_limit(split_layout, base_url, model_id):
    too_long = chat(model_id, "word " * 5000, max_tokens=16)
    r = httpx.post(base_url + "/v1/chat/completions", json=too_long, timeout=60)
    assert r.status_code == 400 and "4096" in r.json()["error"]["message"], r.text
