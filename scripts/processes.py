"""Start child processes that can always be stopped, and stop them for sure.

Two traps this exists for:

- A background job (`make test &`, `make serve &`) inherits SIGINT *ignored*,
  and so does every process it starts: `serve run` then never stops on the
  SIGINT that is its documented way to shut down. ``spawn`` resets SIGINT to
  its default in the child, and puts the child in its own process group.
- A child that ignores or outlives one signal would keep port 8000 (and its
  Ray, and its vLLM engines) for whatever runs next. ``stop`` escalates over
  the whole process group: SIGINT, then SIGTERM, then SIGKILL.

Used by `make serve` (scripts/serve.py), the test suite (tests/cluster.py) and
the benchmarks' bare vLLM server.
"""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Sequence

# Seconds to wait after each signal before the next: SIGINT lets `serve run` shut Serve and Ray down
# (tens of seconds on a busy 2-core machine), SIGTERM is a last polite request, SIGKILL is final.
ESCALATION = ((signal.SIGINT, 90.0), (signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0))


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def spawn(cmd: Sequence[str], **popen_kwargs) -> subprocess.Popen:
    """``subprocess.Popen`` in a new process group, with SIGINT at its default (not inherited ignored)."""
    return subprocess.Popen(list(cmd), start_new_session=True, preexec_fn=_default_sigint, **popen_kwargs)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # spawn made the child its group's leader
    except (ProcessLookupError, PermissionError):
        pass


def stop(proc: subprocess.Popen, escalation=ESCALATION) -> int:
    """Stop ``proc`` and everything in its process group; returns its exit code.

    Each signal goes to the whole group; the next is sent only if the leader has not exited within
    the previous one's grace period. Whatever is left in the group once the leader exits is killed.
    """
    for sig, grace_s in escalation:
        if proc.poll() is not None:
            break
        if sig == signal.SIGINT:
            proc.send_signal(sig)  # the leader forwards it; signalling the group too would interrupt twice
        else:
            _signal_group(proc, sig)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            continue
    _signal_group(proc, signal.SIGKILL)  # stragglers the leader left behind
    return proc.wait()
