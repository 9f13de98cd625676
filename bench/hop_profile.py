"""Where the CPU goes at a steady load: this app vs the stock `build_openai_app`, per hop.

Issue 12 asks for the cost of each hop of the serving path on the CPU profile at
its saturation, as docs/streaming.md has it for the H200. Each target (run one
after the other, same engine settings) gets ``--clients`` closed-loop streamed
short chats for ``--seconds`` after a 10 s warm-up, and the run reports output
tok/s, TTFT and TPOT p50 and, from bench/hop_cpu.py, each hop's CPU seconds and
CPU microseconds per output token: Serve's proxy, the ingress (our router or
the stock ``OpenAiIngress``), the LLM replica (vLLM's front end), vLLM's
EngineCore and its model-runner process. With ``--py-spy PATH`` it also samples
each hop's process with py-spy (raw stacks into ``--out``).

Every request sends the same sampling parameters, so no router default changes
what the engine does (the router fills in ``top_p``/``repetition_penalty`` when
a request leaves them out; on this engine that alone costs a fifth of its speed).

    .venv/bin/python bench/hop_profile.py --targets stock,ours --clients 8 --seconds 40 --out /tmp/hops
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.hop_cpu import HOPS, HopCpu, find_roles, per_token_us  # noqa: E402
from bench.priority_flood import deploy, percentile, short_chat  # noqa: E402

BASE_URL = "http://127.0.0.1:8000"
SAMPLING = {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1}


async def closed_loop(model: str, clients: int, seconds: float, max_tokens: int) -> dict:
    """``clients`` streams back to back for ``seconds``: tokens, requests, per-request TTFT and TPOT (s)."""
    got = {"tokens": 0, "requests": 0, "ttft_s": [], "tpot_s": []}
    end = time.monotonic() + seconds

    async def client(c: httpx.AsyncClient, i: int):
        while time.monotonic() < end:
            body = {"model": model, "messages": short_chat(i), "max_tokens": max_tokens, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}, **SAMPLING}
            sent, first, last, tokens = time.monotonic(), None, None, 0
            async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[len("data: "):])
                    if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                        last = time.monotonic()
                        first = first or last
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
            got["tokens"] += tokens
            got["requests"] += 1
            if first is not None and tokens > 1:
                got["ttft_s"].append(first - sent)
                got["tpot_s"].append((last - first) / (tokens - 1))
            i += clients

    async with httpx.AsyncClient(base_url=BASE_URL, timeout=300) as c:
        await asyncio.gather(*(client(c, i) for i in range(clients)))
    return got


def sample_stacks(py_spy: str, seconds: float, out: Path, target: str) -> list[subprocess.Popen]:
    """One py-spy per hop (its first process), raw stacks at 50 Hz into ``out``."""
    spies = []
    for hop, pids in find_roles().items():
        if hop in HOPS:
            spies.append(subprocess.Popen(
                [py_spy, "record", "--nonblocking", "-r", "50", "-d", str(int(seconds)), "-f", "raw",
                 "-o", str(out / f"{target}_{hop}.txt"), "--pid", str(pids[0])],
                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
    return spies


def measure(target: str, args) -> dict:
    model = deploy(target, args.profile)
    asyncio.run(closed_loop(model, args.clients, 10, args.max_tokens))  # warm-up: the window opens
    spies = sample_stacks(args.py_spy, args.seconds - 5, args.out, target) if args.py_spy else []
    with HopCpu() as hop:
        got = asyncio.run(closed_loop(model, args.clients, args.seconds, args.max_tokens))
    for spy in spies:
        spy.wait()
    return {"target": target, "tok_s": got["tokens"] / args.seconds, "requests": got["requests"],
            "ttft_p50_s": percentile(got["ttft_s"], 50), "tpot_p50_s": percentile(got["tpot_s"], 50),
            "cpu_s": hop.used, "cpu_us_per_token": per_token_us(hop.used, got["tokens"])}


def table(rows: list[dict]) -> str:
    head = "| target | out tok/s | TTFT p50 s | TPOT p50 s | " + " | ".join(f"{h} µs/tok" for h in HOPS) + " |"
    lines = [head, "|" + "---|" * (4 + len(HOPS))]
    for r in rows:
        us = r["cpu_us_per_token"]
        lines.append(f"| {r['target']} | {r['tok_s']:.1f} | {r['ttft_p50_s']:.3f} | {r['tpot_p50_s']:.3f} | "
                     + " | ".join(f"{us[h]:.0f}" if h in us else "-" for h in HOPS) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="embedded-cpu")
    parser.add_argument("--targets", default="stock,ours")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--py-spy", help="path of a py-spy binary: also sample each hop's stacks")
    parser.add_argument("--out", type=Path, default=Path("/tmp/hops"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import ray
    from ray import serve

    ray.init(include_dashboard=False, num_cpus=4)
    rows = []
    try:
        for target in args.targets.split(","):
            rows.append(measure(target, args))
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()
    print(table(rows))
    (args.out / "hops.md").write_text(table(rows) + "\n")
    (args.out / "hops.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
