"""Live autoscaling on the CPU: min 1, max 2 replicas of the embedded model.

Redeploys the session app with a faster policy (same code, shorter delays),
puts sustained load on it until Serve's own status shows a second RUNNING
replica, then lets it idle until the policy takes it away again. Leaves that
config deployed (marker `changes_app`).
"""

from __future__ import annotations

import asyncio
import copy
import threading

import httpx
import pytest
import yaml

from deployments.config.app_args import load_serve_config
from tests.cluster import redeploy, replica_states, running_replicas, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.changes_app]

FAST_POLICY = {"upscale_delay_s": 5, "downscale_delay_s": 20, "target_queue_per_replica": 1}


def scaling_config(tmp_path) -> str:
    config = copy.deepcopy(load_serve_config())
    app = config["applications"][0]
    app["autoscaling_policy"]["policy_kwargs"].update(FAST_POLICY)
    llm = app["args"]["profiles"][app["args"]["profile"]]["llm_config"]
    llm["deployment_config"]["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 2, "look_back_period_s": 10}
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


def starting_or_running() -> int:
    states = replica_states()  # a replica of an earlier version may still be STOPPING: not counted
    return states.get("STARTING", 0) + states.get("RUNNING", 0)


def test_load_brings_a_second_replica_and_idleness_takes_it_away(base_url, model_id, tmp_path):
    redeploy(scaling_config(tmp_path))
    assert running_replicas() == 1
    with Load(base_url, model_id) as load:
        # The policy's decision is what the load must bring; once Serve starts the replica the load
        # stops, so the new engine loads on cores the old one no longer fills (under a busy core it
        # took six minutes to start beside the load). The policy holds while a replica starts.
        decided_s = wait_for(lambda: starting_or_running() >= 2, 300, "the policy adding a second replica")
        print(f"second replica added {decided_s:.0f}s into the load; {load.completed} requests done")
    up_s = wait_for(lambda: running_replicas() == 2, 420, "a second RUNNING replica")
    print(f"second replica RUNNING {up_s:.0f}s later")
    down_s = wait_for(lambda: running_replicas() == 1, 300, "scale back to one replica")
    print(f"back to one replica {down_s:.0f}s after that")
