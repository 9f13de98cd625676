"""`make serve`: run `serve run serve_config.yaml` and say once, in one line, when the app is ready.

`serve run` returns control (and prints "Deployed app") when the replicas are
RUNNING, which is before the engine has answered anything. The app's own
`/health` turns 200 only once every pool's engine has answered a real request,
so this waits for that and prints ``ready: http://HOST:PORT (<model>)``.
Ctrl-C (or SIGTERM) stops `serve run` as if Ctrl-C were typed at it, and
escalates to SIGTERM and SIGKILL of its whole process group if it does not
exit (scripts/processes.py); started in the background (`make serve &`), where
SIGINT arrives ignored, `serve run` still gets a working one.
"""

from __future__ import annotations

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


def wait_ready(url: str, proc: subprocess.Popen) -> str | None:
    """The served model once /health is 200; None if `serve run` exits first."""
    while proc.poll() is None:
        try:
            health = httpx.get(url + "/health", timeout=10)
            if health.status_code == 200:
                return ", ".join(health.json()["models"])
        except httpx.HTTPError:
            pass
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
    except KeyboardInterrupt:
        return stop(proc)


if __name__ == "__main__":
    sys.exit(main())
