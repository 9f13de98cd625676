"""Live autoscaling on the CPU: min 1, max 2 replicas of the embedded model.

Redeploys the session app with a faster policy (same code, shorter delays),
puts sustained load on it until Serve's own status shows a second RUNNING
replica, then lets it idle, but for a few long streams on both replicas,
until the policy takes one away: the streams on the replica being stopped
(shown by replica id, from Serve's access logs) run to their end under Serve's
graceful shutdown. Leaves that config deployed (marker `changes_app`).
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from deployments.config.app_args import load_serve_config
from deployments.config.names import deployment_name_prefix
from tests.cluster import redeploy, replica_states, run, running_replicas, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.changes_app]

FAST_POLICY = {"upscale_delay_s": 5, "downscale_delay_s": 20, "target_queue_per_replica": 1}
LOOK_BACK_S = 10  # Serve's look-back over the replicas' metrics


def scaling_config(tmp_path) -> str:
    config = copy.deepcopy(load_serve_config())
    app = config["applications"][0]
    app["autoscaling_policy"]["policy_kwargs"].update(FAST_POLICY)
    llm = app["args"]["profiles"][app["args"]["profile"]]["llm_config"]
    llm["deployment_config"]["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 2,
                                                      "look_back_period_s": LOOK_BACK_S}
    # Longer than any stream the test runs (Serve's default, 20 s, would cut a long one off).
    llm["deployment_config"]["graceful_shutdown_timeout_s"] = 600
    path = tmp_path / "serve_scaling.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


class Load:
    """Sustained streaming load from a background thread until stopped.

    Stopping cancels the requests in flight (the client goes away; the router aborts them in the
    engine) instead of waiting for them: queued low-class requests would otherwise hold the test
    for their whole client timeout before the idle spell could even begin.
    """

    def __init__(self, base_url: str, model_id: str, concurrency: int = 24):
        self.stop = threading.Event()
        self.completed = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._main: asyncio.Task | None = None
        body = {"model": model_id, "messages": [{"role": "user", "content": "Tell a long story."}],
                "max_tokens": 200, "ignore_eos": True}

        async def worker(client):
            while not self.stop.is_set():
                try:
                    r = await client.post("/v1/chat/completions", json=body, headers={"X-Priority": "low"})
                except httpx.HTTPError:  # a client timeout under this load is not what the test is about
                    r = None
                self.completed += r is not None and r.status_code == 200
                if r is None or r.status_code != 200:
                    await asyncio.sleep(0.5)

        async def main():
            self._loop = asyncio.get_running_loop()
            self._main = asyncio.current_task()
            async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
                await asyncio.gather(*[worker(client) for _ in range(concurrency)])

        def run():
            try:
                asyncio.run(main())
            except asyncio.CancelledError:
                pass

        self.thread = threading.Thread(target=run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self._loop is not None and self._main is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._main.cancel)
        self.thread.join(timeout=60)


MAX_STREAM_TOKENS = 2000  # the admission cap (2048) allows it
STREAMS = [f"Story {i}: write a very long story about a lighthouse keeper." for i in range(4)]
SERVE_LOGS = Path("/tmp/ray/session_latest/logs/serve")


def long_stream(base_url: str, model_id: str, text: str, tokens: int) -> dict:
    """One streamed chat of ``tokens`` tokens: its request id, first-token and end times (monotonic
    seconds), finish reason and usage."""
    body = {"model": model_id, "messages": [{"role": "user", "content": text}], "max_tokens": tokens,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    result = {"finish_reason": None, "completion_tokens": None, "first_token_at": None}
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=600) as response:
        assert response.status_code == 200, response.read()
        result["request_id"] = response.headers["x-request-id"]
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: "):])
            for choice in chunk.get("choices") or []:
                result["first_token_at"] = result["first_token_at"] or time.monotonic()
                result["finish_reason"] = choice.get("finish_reason") or result["finish_reason"]
            if chunk.get("usage"):
                result["completion_tokens"] = chunk["usage"]["completion_tokens"]
    result["finished_at"] = time.monotonic()
    return result


def stream_tokens_outlasting(seconds: float, base_url: str, model_id: str) -> int:
    """Enough tokens for each of the test's streams to last ``seconds`` at least.

    The rate is measured on the idle one-replica app with as many streams per engine as the test later
    runs on each of two engines (``len(STREAMS) // 2``): per engine the load is then the same or heavier
    (two engines share the machine's cores), so the real streams run no faster than measured."""
    per_engine = len(STREAMS) // 2
    with ThreadPoolExecutor(per_engine) as pool:
        probes = list(pool.map(lambda i: long_stream(base_url, model_id, f"Count slowly, {i}.", 128),
                               range(per_engine)))
    rate = max((p["completion_tokens"] - 1) / (p["finished_at"] - p["first_token_at"]) for p in probes)
    tokens = min(MAX_STREAM_TOKENS, int(rate * seconds) + 1)
    print(f"{per_engine} streams on one engine: up to {rate:.1f} tok/s each; streams of {tokens} tokens "
          f"to outlast {seconds:.0f}s")
    return tokens


def llm_replica_ids() -> set[str]:
    """Serve replica ids of the main pool's live LLM replicas (from their Ray actors' names)."""
    listed = json.loads(run("ray", "list", "actors", "--format", "json", "--filter", "state=ALIVE",
                            "--limit", "10000", timeout=60).stdout)
    prefix = f"SERVE_REPLICA::llm#{deployment_name_prefix('main')}"
    return {actor["name"].rsplit("#", 1)[1] for actor in listed if (actor.get("name") or "").startswith(prefix)}


def replica_serving(request_id: str) -> str | None:
    """The LLM replica whose access log has this request (Serve logs the proxy's request id on every hop)."""
    for path in SERVE_LOGS.glob(f"replica_llm_*{deployment_name_prefix('main').replace(':', '_')}*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if request_id in line and "CALL" in line:
                return line.split(" -- ")[0].split()[-2]
    return None


def starting_or_running() -> int:
    states = replica_states()  # a replica of an earlier version may still be STOPPING: not counted
    return states.get("STARTING", 0) + states.get("RUNNING", 0)


def test_load_brings_a_second_replica_and_idleness_takes_it_away(base_url, model_id, tmp_path):
    redeploy(scaling_config(tmp_path))
    assert running_replicas() == 1
    # The streams must outlast the scale-down: the policy's delay plus Serve's look-back, with half again to
    # spare, at the fastest rate a stream ran at with the same number of streams per engine.
    stream_tokens = stream_tokens_outlasting(1.5 * (FAST_POLICY["downscale_delay_s"] + LOOK_BACK_S), base_url,
                                             model_id)
    with Load(base_url, model_id) as load:
        # The policy's decision is what the load must bring; once Serve starts the replica the load
        # stops, so the new engine loads on cores the old one no longer fills (under a busy core it
        # took six minutes to start beside the load). The policy holds while a replica starts.
        decided_s = wait_for(lambda: starting_or_running() >= 2, 300, "the policy adding a second replica")
        print(f"second replica added {decided_s:.0f}s into the load; {load.completed} requests done")
    up_s = wait_for(lambda: running_replicas() == 2, 420, "a second RUNNING replica")
    print(f"second replica RUNNING {up_s:.0f}s later")
    replicas_before = llm_replica_ids()
    # Idle but for a few long streams (fewer per replica than the policy's running_low_per_replica), on
    # both replicas: the policy takes one replica away while they run; Serve's graceful shutdown lets
    # the stopping replica finish its streams before it goes.
    with ThreadPoolExecutor(len(STREAMS)) as pool:
        streams = [pool.submit(long_stream, base_url, model_id, text, stream_tokens) for text in STREAMS]
        down_s = wait_for(lambda: running_replicas() == 1, 300, "scale back to one replica")
        stopped_at = time.monotonic()
        print(f"back to one RUNNING replica {down_s:.0f}s after that")
        results = [stream.result(timeout=600) for stream in streams]
    # The stopping replica's actor exits once its graceful shutdown sees no request left (Serve polls for that).
    wait_for(lambda: replicas_before - llm_replica_ids(), 120, "the stopped replica's actor to exit")
    [stopped] = replicas_before - llm_replica_ids()
    served_by = {result["request_id"]: replica_serving(result["request_id"]) for result in results}
    print(f"stopped replica {stopped}; streams by replica: {served_by}")
    on_stopped = [r for r in results if served_by[r["request_id"]] == stopped]
    assert on_stopped, f"no stream ran on the stopped replica {stopped}: {served_by}"
    for result in on_stopped:
        assert result["finished_at"] > stopped_at  # it was still streaming when the replica was told to stop
    for result in results:  # and every stream, there or on the survivor, ran to its full length
        assert result["finish_reason"] == "length" and result["completion_tokens"] == stream_tokens, result
