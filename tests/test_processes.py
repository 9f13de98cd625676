"""scripts/processes.py on real processes: SIGINT works in children of a background job; stop escalates."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from scripts.processes import spawn, stop

FAST = ((signal.SIGINT, 2.0), (signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0))


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_child_gets_a_working_sigint_even_when_its_parent_ignores_it():
    # As in `make test &`: the parent ignores SIGINT, and children would inherit that.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        child = spawn(python("import time; print('up', flush=True); time.sleep(60)"), stdout=subprocess.PIPE)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert child.stdout.readline() == b"up\n"
    child.send_signal(signal.SIGINT)
    assert child.wait(10) != 0  # KeyboardInterrupt ended it


def test_stop_escalates_to_sigkill_for_a_child_that_ignores_sigint_and_sigterm():
    stubborn = spawn(python("import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                            "signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"),
                     stdout=subprocess.PIPE)
    assert stubborn.stdout.readline() == b"up\n"
    assert stop(stubborn, FAST) == -signal.SIGKILL  # neither SIGINT nor SIGTERM ended it; SIGKILL did


def test_stop_also_ends_the_grandchildren_left_in_the_group():
    # The leader exits on SIGINT at once and leaves a grandchild that ignores it (like a stray engine).
    leader = spawn(python("import subprocess, sys, time; "
                          "g = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
                          "signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)']); "
                          "print(g.pid, flush=True); time.sleep(60)"), stdout=subprocess.PIPE)
    grandchild = int(leader.stdout.readline())
    stop(leader, FAST)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(grandchild):
        time.sleep(0.1)
    assert not _alive(grandchild)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False
