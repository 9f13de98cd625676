"""The two documented ways to run the app, each answering, then shutting down.

`serve run` goes first (it starts its own Ray and needs the machine alone);
the `serve deploy` cluster is the session's, and its shutdown is checked last.
"""

from __future__ import annotations

import subprocess

import openai
import pytest

from tests.cluster import (BASE_URL, BIN, REPO_ROOT, ServeRunProcess, clean_env, engine_processes, port_open,
                           ray_running, spawn, stop, wait_until)

pytestmark = pytest.mark.integration  # each starts its own Ray and app: needs the machine and port 8000

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def ask(model_id: str) -> str:
    client = openai.OpenAI(base_url=BASE_URL + "/v1", api_key="unused", max_retries=0, timeout=120)
    reply = client.chat.completions.create(model=model_id, messages=QUESTION, max_tokens=20, temperature=0)
    return reply.choices[0].message.content


@pytest.mark.runs_first
def test_serve_run_answers_then_shuts_down(model_id):
    serve_run = ServeRunProcess()
    try:
        ready_s = serve_run.start(model_id)
        print(f"serve run ready in {ready_s:.0f}s")
        assert "Paris" in ask(model_id)
        # While the engine loaded, the router answered at once: 503, Retry-After, "loading".
        loading = [r for r in serve_run.early_answers if "x-priority-class" in r.headers]  # the router, not the proxy
        assert loading, "the router never answered before the app was ready"
        statuses = [r.status_code for r in loading]
        # 503 while loading; a 200 only in the instant between the engine's warm-up and /health's 200
        assert statuses[0] == 503 and set(statuses) <= {503, 200}, statuses
        assert all(int(r.headers["retry-after"]) >= 1 and "loading" in r.json()["error"]["message"]
                   for r in loading if r.status_code == 503)
        assert wait_until(lambda: serve_run.ready_lines(), 10)
        assert serve_run.ready_lines() == [f"ready: {BASE_URL} ({model_id})"]
    finally:
        exit_code = serve_run.stop()
    assert exit_code == 0, serve_run.log_path.read_text()[-3000:]
    assert not port_open(), "port 8000 still open after serve run exited"
    assert not ray_running(), "serve run left its Ray instance behind"
    assert wait_until(lambda: not engine_processes()), f"vLLM processes left: {engine_processes()}"


@pytest.mark.runs_first
def test_make_serve_without_the_model_says_how_to_prepare_it_and_exits(tmp_path):
    """`serve run` keeps running after its app failed to deploy; `make serve` stops it and exits 1."""
    env = clean_env() | {"LLM_SERVE_MODEL_CACHE": str(tmp_path / "empty-cache")}
    proc = spawn([str(BIN / "python"), "scripts/serve.py"], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                 stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=300)
    finally:
        stop(proc)
    assert proc.returncode == 1, output[-3000:]
    assert "failed: the app did not deploy" in output and "deployments.models.embedded prepare" in output
    assert not port_open(), "port 8000 still open after the failed start"
    assert wait_until(lambda: not ray_running(), 30), "the failed start left its Ray instance behind"


def test_serve_deploy_answers(deployed_cluster, model_id):
    print(f"serve deploy ready in {deployed_cluster.ready_s:.0f}s")
    assert "Paris" in ask(model_id)


@pytest.mark.runs_last
def test_serve_deploy_shuts_down_cleanly(deployed_cluster):
    shutdown, stop = deployed_cluster.stop()
    assert shutdown.returncode == 0, shutdown.stderr[-2000:]
    assert stop.returncode == 0, stop.stderr[-2000:]
    assert not port_open(), "port 8000 still open after serve shutdown"
    assert not ray_running(), "Ray still running after ray stop"
    assert wait_until(lambda: not engine_processes()), f"vLLM processes left: {engine_processes()}"
