"""Start and stop the real thing for tests: Ray, Serve, the vLLM CPU engine.

Both user flows are driven exactly as the README documents them, from the
repository root with the virtual environment's own ``ray`` and ``serve``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from deployments.config.names import deployment_name_prefix
from scripts.processes import spawn, stop

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BASE_URL = "http://127.0.0.1:8000"
READY_TIMEOUT_S = 420


def clean_env() -> dict:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Ray 2.60 turns token auth on for `ray start` once ~/.ray/auth_token exists
    # (a local `serve run` writes it), but the `serve deploy` CLI only sends the
    # token when the mode is explicit. Explicit token mode works in both cases.
    env["RAY_AUTH_MODE"] = "token"
    return env


def run(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        cwd=REPO_ROOT, env=clean_env(), capture_output=True, text=True, timeout=timeout,
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"`{' '.join(args)}` exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done


def port_open(url: str = BASE_URL) -> bool:
    try:
        httpx.get(url + "/-/healthz", timeout=2)
        return True
    except httpx.TransportError:
        return False


def processes(pattern: str) -> list[str]:
    """Live processes whose command line matches; zombies (``<defunct>``, exited but not yet reaped by
    their parent) are not running and are left out: a test that SIGKILLed its own Ray nodes leaves them."""
    found = subprocess.run(["pgrep", "-fa", pattern], capture_output=True, text=True)
    return [line for line in found.stdout.splitlines() if not line.endswith("<defunct>")]


def ray_running() -> bool:
    # Processes, not `ray status`: that fails on a token-auth mismatch too.
    return bool(processes("gcs_server|raylet"))


def engine_processes() -> list[str]:
    """vLLM's engine-core and worker processes (they outlive a killed replica)."""
    return processes("VLLM::")


def wait_until(condition, timeout: float = 30.0, every: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return condition()


def wait_healthy(url: str = BASE_URL, timeout: float = READY_TIMEOUT_S, proc: subprocess.Popen | None = None) -> float:
    """Wait until the app's /health says ok; returns the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"serve process exited early with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return time.monotonic() - start
        except httpx.TransportError:
            pass
        time.sleep(2)
    raise TimeoutError(f"{url}/health not ready after {timeout}s")


def assert_nothing_running() -> None:
    assert not port_open(), "something already listens on 127.0.0.1:8000; stop it before the tests"
    running = processes("gcs_server|raylet")
    assert not running, "a Ray cluster is already running; run `ray stop` before the tests:\n" + "\n".join(running)
    assert not engine_processes(), f"vLLM engine processes are still running: {engine_processes()}"


class DeployedCluster:
    """`ray start --head` then `serve deploy serve_config.yaml`: the cluster flow."""

    def __init__(self) -> None:
        self.stopped = False

    def start(self) -> float:
        assert_nothing_running()
        # 4 logical CPUs: the live autoscaling test runs two engine replicas
        # (0.5 + 2 x 1.0 CPU of bundles) on the 2-core machine.
        run("ray", "start", "--head", "--num-cpus=4", "--disable-usage-stats", timeout=180)
        start = time.monotonic()
        try:
            run("serve", "deploy", "serve_config.yaml", timeout=180)
            wait_healthy()
        except BaseException:  # a fixture that fails in setup gets no teardown: stop here
            self.stop()
            raise
        return time.monotonic() - start

    def stop(self) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
        if self.stopped:
            return None
        self.stopped = True
        shutdown = run("serve", "shutdown", "--yes", timeout=180, check=False)
        stopped = run("ray", "stop", timeout=180, check=False)
        if ray_running():  # never leave port 8000 and the engines to the next test run
            run("ray", "stop", "--force", timeout=120, check=False)
        return shutdown, stopped


class ServeRunProcess:
    """What `make serve` runs: scripts/serve.py, i.e. `serve run serve_config.yaml` plus its ready line.

    While waiting for /health, it also sends a chat request now and then and
    keeps the router's answers from before the app was ready (``early_answers``).
    """

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.log_path = REPO_ROOT / ".pytest_cache" / "serve_run.log"
        self.early_answers: list[httpx.Response] = []

    def start(self, model_id: str) -> float:
        assert_nothing_running()
        self.log_path.parent.mkdir(exist_ok=True)
        self._log = open(self.log_path, "w")
        self.proc = spawn([str(BIN / "python"), "scripts/serve.py"], cwd=REPO_ROOT, env=clean_env(),
                          stdout=self._log, stderr=subprocess.STDOUT)
        body = {"model": model_id, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        start = time.monotonic()
        while time.monotonic() - start < READY_TIMEOUT_S:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve process exited early with {self.proc.returncode}")
            try:
                if httpx.get(BASE_URL + "/health", timeout=5).status_code == 200:
                    return time.monotonic() - start
                self.early_answers.append(httpx.post(BASE_URL + "/v1/chat/completions", json=body, timeout=30))
            except httpx.TransportError:
                pass
            time.sleep(1)
        raise TimeoutError(f"{BASE_URL}/health not ready after {READY_TIMEOUT_S}s")

    def ready_lines(self) -> list[str]:
        return [line for line in self.log_path.read_text().splitlines() if line.startswith("ready: ")]

    def stop(self) -> int:
        """Ctrl-C, as a person would, escalating to SIGTERM and SIGKILL of the process group; the exit code."""
        assert self.proc is not None
        try:
            return stop(self.proc)
        finally:
            self._log.close()


# --- redeploying the session app -------------------------------------------------


def app_status() -> dict:
    return yaml.safe_load(run("serve", "status", timeout=60).stdout)["applications"]["llm"]


def running_replicas(pool: str = "main") -> int:
    """RUNNING replicas of one pool's LLM deployment per Serve; 0 while it is not listed."""
    return replica_states(pool).get("RUNNING", 0)


def replica_states(pool: str = "main") -> dict[str, int]:
    """Replicas of one pool's LLM deployment per Serve state (STARTING, RUNNING, ...); {} while not listed."""
    deployments = app_status().get("deployments") or {}
    llm = [d for name, d in deployments.items() if name.startswith(deployment_name_prefix(pool))]
    return dict(llm[0]["replica_states"]) if llm else {}


def redeploy(config_path: str, pools: tuple[str, ...] = ("main",)) -> None:
    """`serve deploy` a config to the session cluster; wait until every pool has a RUNNING replica."""
    run("serve", "deploy", config_path, timeout=180)
    time.sleep(5)  # let the controller pick the new config up before polling
    wait_for(lambda: app_status()["status"] == "RUNNING" and all(running_replicas(p) >= 1 for p in pools),
             600, "the app RUNNING")


def wait_for(condition, timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if condition():
            return time.monotonic() - start
        time.sleep(3)
    raise AssertionError(f"{what} not seen within {timeout_s}s")
