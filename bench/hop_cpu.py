"""CPU seconds of each hop of a serving path, over a stretch of a benchmark.

Why: on a small machine the router, Serve's proxy, the LLM replica's front end
and the engine share the same cores, so every CPU second a hop spends outside
the engine slows the engine's steps. Comparing targets by output tokens alone
hides where that cost sits; this reads it per process, by process title, with
psutil (user + system, all threads):

- Ray: ``ray::ProxyActor`` (proxy), ``ray::ServeReplica:APP:DEPLOYMENT`` (the LLM
  replica when the deployment's name has ``LLMServer``, the ingress when it is our
  ``Router`` or the stock ``OpenAiIngress``, several router replicas summed; any
  other deployment, such as the tenants' ledger, is ``other_replica``), ``VLLM::EngineCore`` (the engine's
  scheduler) and ``VLLM::Worker*`` (its model runner, when in a process of its own);
- bare vLLM: the API server's pid (given) and its EngineCore.

Used by bench/overload.py (CPU per output token per level) and
bench/gpu_streaming.py (on the device).
"""

from __future__ import annotations

import os
from collections import defaultdict

HOPS = ("proxy", "ingress", "llm_replica", "api_server", "engine_core", "engine_worker")


def role_of(cmdline: str, server_pid: int | None, pid: int) -> str | None:
    """The hop a process belongs to from its title (None: not part of the serving path)."""
    if server_pid is not None and pid == server_pid:
        return "api_server"
    if "EngineCore" in cmdline:
        return "engine_core"
    if "VLLM::Worker" in cmdline:  # the model runner when vLLM runs it in its own process
        return "engine_worker"
    if "RayWorkerWrapper" in cmdline:
        return "gpu_worker"
    if "ProxyActor" in cmdline:
        return "proxy"
    if "ServeController" in cmdline:
        return "controller"
    if "ServeReplica" in cmdline:
        if "LLMServer" in cmdline:
            return "llm_replica"
        # the router (ours) or OpenAiIngress (stock); other deployments (the tenants' ledger) are no hop
        return "ingress" if ("Router" in cmdline or "Ingress" in cmdline) else "other_replica"
    head = cmdline.split(" ")[0]
    if head.endswith("/raylet"):
        return "raylet"
    if "gcs_server" in head:
        return "gcs"
    return None


def find_roles(server_pid: int | None = None) -> dict[str, list[int]]:
    """The pids of each hop now running on this machine (this process excluded)."""
    import psutil

    roles: dict[str, list[int]] = defaultdict(list)
    for p in psutil.process_iter(["pid", "cmdline", "name"]):
        try:
            cmdline = " ".join(p.info["cmdline"] or []) or (p.info["name"] or "")
        except (psutil.Error, OSError):
            continue
        if p.info["pid"] == os.getpid():
            continue
        role = role_of(cmdline, server_pid, p.info["pid"])
        if role is not None:
            roles[role].append(p.info["pid"])
    return dict(roles)


def cpu_seconds(roles: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds (user + system) each hop has used since its processes started; a gone process counts 0."""
    import psutil

    out: dict[str, float] = {}
    for role, pids in roles.items():
        total = 0.0
        for pid in pids:
            try:
                times = psutil.Process(pid).cpu_times()
                total += times.user + times.system
            except (psutil.Error, OSError):
                continue
        out[role] = total
    return out


class HopCpu:
    """``with HopCpu(server_pid) as hop: ...`` then ``hop.used``: CPU seconds per hop inside the block."""

    def __init__(self, server_pid: int | None = None):
        self.server_pid = server_pid
        self.used: dict[str, float] = {}

    def __enter__(self) -> "HopCpu":
        self._roles = find_roles(self.server_pid)
        self._before = cpu_seconds(self._roles)
        return self

    def __exit__(self, *exc) -> None:
        after = cpu_seconds(self._roles)
        self.used = {role: round(after[role] - self._before.get(role, 0.0), 3) for role in after}


def per_token_us(used: dict[str, float], tokens: int) -> dict[str, float]:
    """CPU microseconds per output token of each hop (empty without tokens)."""
    if tokens <= 0:
        return {}
    return {role: round(seconds * 1e6 / tokens, 1) for role, seconds in used.items()}
