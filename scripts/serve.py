"""`make serve`: run `serve run serve_config.yaml` and say once, in one line, when the app is ready.

`serve run` returns control (and prints "Deployed app") when the replicas are
RUNNING, which is before the engine has answered anything. The app's own
`/health` turns 200 only once every pool's engine has answered a real request,
so this waits for that and prints ``ready: http://HOST:PORT (<model>)``. If the
app fails to deploy instead (Serve's DEPLOY_FAILED, e.g. the embedded model was
never prepared), it prints ``failed:`` with Serve's message, stops `serve run`
(which would otherwise keep running, serving nothing) and exits 1.
Ctrl-C (or SIGTERM) stops `serve run` as if Ctrl-C were typed at it, and
escalates to SIGTERM and SIGKILL of its whole process group if it does not
exit (scripts/processes.py); started in the background (`make serve &`), where
SIGINT arrives ignored, `serve run` still gets a working one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from processes import spawn, stop  # scripts/processes.py, beside this file

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG = REPO_ROOT / "serve_config.yaml"


def base_url(config: dict) -> str:
    http = config.get("http_options", {})
    return f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}"


# How often the apps' status is read while waiting (`serve status`: the CLI handles Ray's auth token).
STATUS_EVERY_S = 5.0


class DeployFailed(Exception):
    """The app failed to deploy (Serve's DEPLOY_FAILED): `serve run` would keep running, serving nothing."""


def deploy_failure() -> str | None:
    """Serve's message for an application that failed to deploy; None while none has."""
    env = dict(os.environ)
    if (Path.home() / ".ray" / "auth_token").exists():
        # `serve run` turns Ray's token auth on when this file exists; the CLI sends it only when told to.
        env.setdefault("RAY_AUTH_MODE", "token")
    try:
        status = subprocess.run([str(Path(sys.executable).parent / "serve"), "status"], capture_output=True,
                                text=True, timeout=30, cwd=REPO_ROOT, env=env)
        apps = (yaml.safe_load(status.stdout) or {}).get("applications") or {}
    except (subprocess.SubprocessError, yaml.YAMLError, AttributeError):
        return None  # Ray or Serve not up yet
    failed = [app.get("message") or "no message" for app in apps.values()
              if isinstance(app, dict) and app.get("status") == "DEPLOY_FAILED"]
    return "\n".join(failed) or None


def wait_ready(url: str, proc: subprocess.Popen) -> str | None:
    """The served model once /health is 200; None if `serve run` exits first.

    Raises DeployFailed with Serve's message when the app fails to deploy (e.g. the model is missing)."""
    status_at = time.monotonic() + STATUS_EVERY_S
    while proc.poll() is None:
        try:
            health = httpx.get(url + "/health", timeout=10)
            if health.status_code == 200:
                return ", ".join(health.json()["models"])
        except httpx.HTTPError:
            pass
        if time.monotonic() >= status_at:
            failure = deploy_failure()
            if failure is not None:
                raise DeployFailed(failure)
            status_at = time.monotonic() + STATUS_EVERY_S
        time.sleep(1)
    return None


def port_taken(url: str) -> bool:
    try:
        httpx.get(url + "/-/healthz", timeout=2)
        return True
    except httpx.TransportError:
        return False


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main() -> int:
    url = base_url(yaml.safe_load(CONFIG.read_text()))
    if port_taken(url):  # else "ready" would describe someone else's app
        print(f"{url} already answers: stop the app running there first (Ctrl-C it, or `serve shutdown`)",
              file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops it as cleanly as Ctrl-C
    signal.signal(signal.SIGINT, _interrupt)  # also when started in the background, where it arrives ignored
    proc = spawn([str(Path(sys.executable).parent / "serve"), "run", str(CONFIG)], cwd=REPO_ROOT)
    try:
        model = wait_ready(url, proc)
        if model is not None:
            print(f"ready: {url} ({model})", flush=True)
        return proc.wait()
    except DeployFailed as failed:
        print(f"failed: the app did not deploy; stopping.\n{failed}", file=sys.stderr, flush=True)
        stop(proc)
        return 1
    except KeyboardInterrupt:
        return stop(proc)


if __name__ == "__main__":
    sys.exit(main())
