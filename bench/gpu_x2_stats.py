"""A measuring vLLM stat logger for the two-GPU runs (bench/gpu_two_replicas.py): prefix-cache hits per engine.

``PrefixTally`` adds up what vLLM's own ``vllm:prefix_cache_queries`` / ``vllm:prefix_cache_hits`` counters add
up (``SchedulerStats.prefix_cache_stats``: prompt tokens looked up in the prefix cache, and those found),
plus finished-request counts (``IterationStats.finished_requests``), prompt and generated tokens, and writes
the running totals of its engine to ``$GPU_X2_TALLY_DIR/<pid>-<engine>.txt`` (one line, overwritten in
place). The driver reads the files before and after a phase; one file is one replica's engine. It is
registered as a ``vllm.stat_logger_plugins`` entry point (bench/gpu_overload_cfg.register_stat_loggers).
"""

from __future__ import annotations

import os
from pathlib import Path

TALLY_ENV = "GPU_X2_TALLY_DIR"
FIELDS = ("queries", "hits", "requests", "prompt", "generated", "finished")

try:  # the driver imports this module without vLLM; the replicas have it
    from vllm.v1.metrics.loggers import StatLoggerBase as _Base
except Exception:  # pragma: no cover - only where vLLM is absent
    _Base = object


class PrefixTally(_Base):
    def __init__(self, vllm_config=None, engine_index: int = 0):
        folder = os.environ.get(TALLY_ENV, "/tmp/gpu_x2_tally")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{os.getpid()}-{engine_index}.txt")
        self._fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        self._t = dict.fromkeys(FIELDS, 0)
        self._write()

    def _write(self) -> None:
        os.pwrite(self._fd, (" ".join(f"{self._t[k]:>16}" for k in FIELDS) + "\n").encode(), 0)

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        changed = False
        pcs = getattr(scheduler_stats, "prefix_cache_stats", None) if scheduler_stats is not None else None
        if pcs is not None and (pcs.queries or pcs.hits):
            self._t["queries"] += int(pcs.queries)
            self._t["hits"] += int(pcs.hits)
            self._t["requests"] += int(pcs.requests)
            changed = True
        if iteration_stats is not None:
            gen = int(getattr(iteration_stats, "num_generation_tokens", 0) or 0)
            prompt = int(getattr(iteration_stats, "num_prompt_tokens", 0) or 0)
            fin = len(getattr(iteration_stats, "finished_requests", None) or [])
            if gen or prompt or fin:
                self._t["generated"] += gen
                self._t["prompt"] += prompt
                self._t["finished"] += fin
                changed = True
        if changed:
            self._write()

    def log_engine_initialized(self):
        pass


def read_tallies(folder: str) -> dict[str, dict[str, int]]:
    """Per engine file: its running totals."""
    out = {}
    for path in sorted(Path(folder).glob("*.txt")):
        try:
            vals = [int(x) for x in path.read_text().split()]
            out[path.stem] = dict(zip(FIELDS, vals))
        except (OSError, ValueError):
            continue
    return out


def tally_delta(before: dict, after: dict) -> dict:
    """Per engine, what happened between two ``read_tallies``, and the totals with the token hit rate."""
    per = {}
    for eng, a in after.items():
        b = before.get(eng, dict.fromkeys(FIELDS, 0))
        d = {k: a[k] - b.get(k, 0) for k in FIELDS}
        if any(d.values()):
            d["hit_rate"] = round(d["hits"] / d["queries"], 4) if d["queries"] else None
            per[eng] = d
    tot = {k: sum(d[k] for d in per.values()) for k in FIELDS}
    tot["hit_rate"] = round(tot["hits"] / tot["queries"], 4) if tot["queries"] else None
    return {"engines": per, "total": tot}
