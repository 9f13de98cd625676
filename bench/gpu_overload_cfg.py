"""Helpers of bench/gpu_overload.py that are not the benchmark itself.

- ``derive_serve_config``: the GPU serve config, derived from the committed
  serve_config.yaml exactly as ../shared/gpu/example_mkcfg.py does (profile
  ``qwen2.5-7b-4090d-tp1-fp16``, the dummy model folder, ``load_format: dummy``,
  ``max_model_len: 8192``, ``gpu_memory_utilization: 0.9``, one replica). No
  router setting is touched: the point is that the same config adapts.
- ``register_stat_loggers``: a ``*.dist-info/entry_points.txt`` for vLLM's
  ``vllm.stat_logger_plugins`` group (what ``pip install -e .`` writes), in a
  folder put on ``PYTHONPATH`` before Ray starts, so every replica's engine
  loads the plugins named.
- ``GeneratedTokenTally``: a measuring stat logger. It adds up
  ``IterationStats.num_generation_tokens`` (the figure vLLM's own
  ``vllm:generation_tokens_total`` Prometheus counter adds up) and writes the
  running total to a small file the benchmark reads, so both targets (ours and
  the stock ``build_openai_app``) are counted the same way, exactly and without
  Prometheus' export delay. It does no other work.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import yaml

PROFILE = "qwen2.5-7b-4090d-tp1-fp16"
TALLY_ENV = "GPU_OVERLOAD_TALLY_DIR"


def derive_serve_config(serve_config: Path, model_dir: str, profile: str = PROFILE) -> dict:
    """``profile``: which of the config's profiles to serve (default TP1 FP16; bench/gpu_two_replicas.py and
    bench/gpu_profiles.py pass others)."""
    cfg = copy.deepcopy(yaml.safe_load(Path(serve_config).read_text()))
    args = cfg["applications"][0]["args"]
    args["profile"] = profile
    args.pop("layout", None)
    lc = args["profiles"][profile]["llm_config"]
    lc["model_loading_config"]["model_source"] = model_dir  # dummy Qwen2.5-7B-shaped folder
    ek = lc["engine_kwargs"]
    ek["load_format"] = "dummy"
    ek["max_model_len"] = 8192
    ek["gpu_memory_utilization"] = 0.9
    lc["deployment_config"]["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 1}
    return cfg


def stock_llm_config(cfg: dict, profile: str = PROFILE) -> dict:
    """The same profile's LLMConfig for the stock app, ``scheduling_policy`` dropped (stock sends no priority)
    and ``log_engine_metrics`` left at Ray's default, as bench/priority_flood.py does."""
    lc = copy.deepcopy(cfg["applications"][0]["args"]["profiles"][profile]["llm_config"])
    lc["engine_kwargs"].pop("scheduling_policy", None)
    lc.pop("log_engine_metrics", None)  # stock as Ray ships it: vLLM's Ray stat logger on
    return lc


def register_stat_loggers(folder: str, plugins: dict[str, str]) -> str:
    """Write ``folder/<dist>.dist-info`` declaring ``plugins`` (name -> "module:Class") in the
    ``vllm.stat_logger_plugins`` group; returns ``folder`` (put it on PYTHONPATH)."""
    dist = Path(folder) / "gpu_overload_plugins-0.0.0.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: gpu-overload-plugins\nVersion: 0.0.0\n")
    (dist / "entry_points.txt").write_text(
        "[vllm.stat_logger_plugins]\n" + "".join(f"{name} = {target}\n" for name, target in plugins.items()))
    return folder


def read_tally(folder: str) -> dict:
    """Sum of the totals every ``GeneratedTokenTally`` in ``folder`` wrote: generated and prompt tokens."""
    generated = prompt = 0
    files = 0
    for path in Path(folder).glob("*.txt"):
        try:
            fields = path.read_text().split()
            generated += int(fields[0])
            prompt += int(fields[1])
            files += 1
        except (OSError, ValueError, IndexError):
            continue
    return {"generated": generated, "prompt": prompt, "engines": files}


try:  # the benchmark driver imports this module without vLLM; the replicas have it
    from vllm.v1.metrics.loggers import StatLoggerBase as _Base
except Exception:  # pragma: no cover - only where vLLM is absent
    _Base = object


class GeneratedTokenTally(_Base):
    """Running totals of generated and prompt tokens, per engine, in ``$GPU_OVERLOAD_TALLY_DIR``."""

    def __init__(self, vllm_config=None, engine_index: int = 0):
        folder = os.environ.get(TALLY_ENV, "/tmp/gpu_overload_tally")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{os.getpid()}-{engine_index}.txt")
        self._fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        self._generated = self._prompt = 0
        self._write()

    def _write(self) -> None:
        os.pwrite(self._fd, f"{self._generated:>18} {self._prompt:>18}\n".encode(), 0)

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        if iteration_stats is None:
            return
        generated = int(getattr(iteration_stats, "num_generation_tokens", 0) or 0)
        prompt = int(getattr(iteration_stats, "num_prompt_tokens", 0) or 0)
        if generated or prompt:
            self._generated += generated
            self._prompt += prompt
            self._write()

    def log_engine_initialized(self):
        pass
