"""Shared parts of the two-GPU runs of issue 13 (bench/gpu_two_replicas.py, bench/gpu_profiles.py).

Kept importable without Ray or vLLM (the pure parts are checked on the CPU machine):

- ``log`` / ``sh`` / ``nvidia_smi``: what every device script prints and reads;
- ``write_dummy_model``: the dummy Qwen2.5-7B folder of ../shared/gpu/make_dummy_qwen.py, optionally
  in AWQ format (``quantization_config`` in config.json, so ``load_format: dummy`` allocates packed int4
  tensors and vLLM repacks them for its int4 kernel as for a real AWQ checkpoint: Marlin on Ada, Machete on
  Hopper);
- ``util_for_gib``: the ``gpu_memory_utilization`` that gives vLLM a 4090D's 0.9 x 24 GiB on a larger card;
- ``planner_prediction``: deployments/capacity/planner.py's figures for a profile on a 4090D;
- ``parse_vllm_memory``: the weights / KV-cache figures out of vLLM's own log lines;
- ``Load``: an asyncio + httpx load generator (chat completions, streamed or not) in one process;
- ``pct``: nearest-rank percentiles.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import subprocess
import threading
import time
from pathlib import Path

T0 = time.time()
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MODEL = "Qwen/Qwen2.5-7B-Instruct"
GIB = 1024 ** 3
CARD_GIB = 24.0          # RTX 4090D
CARD_UTIL = 0.90         # the profiles' gpu_memory_utilization: 21.6 GiB for vLLM on a 4090D

# Qwen2.5-7B-Instruct-AWQ's own quantization_config (its config.json on the hub).
AWQ_QUANT_CONFIG = {"bits": 4, "group_size": 128, "modules_to_not_convert": None, "quant_method": "awq",
                    "version": "gemm", "zero_point": True}


def log(*a, tag: str = "") -> None:
    print(f"[{time.time() - T0:6.1f}s]{(' [' + tag + ']') if tag else ''}", *a, flush=True)


def sh(cmd: str, timeout: float = 30) -> str:
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=timeout).stdout.strip()
    except Exception as e:  # noqa: BLE001
        return repr(e)


def nvidia_smi() -> list[dict]:
    """Per GPU: utilisation % and memory used / total MiB (nvidia-smi, one call)."""
    out = sh("nvidia-smi --query-gpu=index,utilization.gpu,memory.used,memory.total --format=csv,noheader,nounits", 10)
    rows = []
    for line in out.splitlines():
        try:
            i, u, m, t = (int(x.strip()) for x in line.split(","))
            rows.append({"gpu": i, "util": u, "mem_mib": m, "total_mib": t})
        except ValueError:
            continue
    return rows


def pct(xs, q):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    return round(xs[min(len(xs) - 1, max(0, int(-(-q / 100 * len(xs) // 1)) - 1))], 5)


def words(seed: int, n_chars: int) -> str:
    """~n_chars characters of random 4-letter words: with the byte-level dummy tokenizer one char is one token."""
    rng = random.Random(seed)
    out, size = [], 0
    while size < n_chars:
        w = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(4))
        out.append(w)
        size += 5
    return " ".join(out)[:n_chars]


# ------------------------------------------------------------------------------------- model folder
def write_dummy_model(out: str, config_json: str, awq: bool = False) -> str:
    """Run ../shared/gpu/make_dummy_qwen.py's recipe (copied to ``.gpu/w``) into ``out``; with ``awq`` add
    the AWQ ``quantization_config`` (and fp16 dtype) to its config.json."""
    maker = Path(config_json).with_name("make_dummy_qwen.py")
    if not Path(out, "tokenizer.json").exists():
        subprocess.run(["python3", str(maker), out, config_json], check=True, capture_output=True, text=True)
    if awq:
        cfg_path = Path(out, "config.json")
        cfg = json.loads(cfg_path.read_text())
        cfg["quantization_config"] = dict(AWQ_QUANT_CONFIG)
        cfg["torch_dtype"] = "float16"
        cfg_path.write_text(json.dumps(cfg, indent=1))
    return out


# ------------------------------------------------------------------------------------- memory
def util_for_gib(total_bytes: float, gib: float = CARD_GIB * CARD_UTIL) -> float:
    """gpu_memory_utilization that gives vLLM ``gib`` GiB of a card of ``total_bytes`` (vLLM 0.26's budget is
    utilisation x total memory)."""
    return round(gib * GIB / total_bytes, 5)


PROFILE_PRECISION = {"qwen2.5-7b-4090d-tp1-fp16": ("fp16", 1), "qwen2.5-7b-4090d-tp2-fp16": ("fp16", 2),
                     "qwen2.5-7b-4090d-tp1-awq": ("awq-int4", 1), "qwen2.5-7b-4090d-tp1-nf4": ("bnb-nf4", 1),
                     "qwen2.5-7b-4090d-tp4-fp16": ("fp16", 4)}


def planner_prediction(profile: str, max_model_len: int) -> dict:
    """deployments/capacity/planner.py for ``profile`` on a 4090D (24 GiB, 0.90), per GPU."""
    from deployments.capacity.planner import QWEN25_7B, GroupSettings, decode_bytes_per_step, plan
    precision, tp = PROFILE_PRECISION[profile]
    p = plan(QWEN25_7B, GroupSettings(tensor_parallel=tp, weight_precision=precision, max_model_len=max_model_len))
    return {"weights_gib_per_gpu": round(p.weight_bytes_per_gpu / GIB, 3),
            "kv_bytes_per_token_per_gpu": p.kv_bytes_per_token_per_gpu,
            "kv_budget_gib_per_gpu": round(p.kv_budget_bytes_per_gpu / GIB, 3),
            "kv_tokens": p.kv_tokens, "concurrent_at_max_len": p.concurrent_sequences,
            "decode_gb_per_step_per_gpu": round(decode_bytes_per_step(QWEN25_7B, precision, tp) / 1e9, 3)}


MEM_PATTERNS = {
    "weights_gib": r"Model loading took ([\d.]+) GiB",
    "kv_available_gib": r"Available KV cache memory: ([\d.]+) GiB",
    "kv_tokens": r"GPU KV cache size: ([\d,]+) tokens",
    "max_concurrency": r"Maximum concurrency for [\d,]+ tokens per request: ([\d.]+)x",
    "actual_weight_gib": r"Actual usage is ([\d.]+) GiB for weight",
    "peak_activation_gib": r"([\d.]+) GiB for peak activation",
    "non_torch_gib": r"([\d.]+) GiB for non-torch memory",
    "cudagraph_gib": r"([\d.]+) GiB for CUDAGraph memory",
    "desired_gib": r"Desired GPU memory utilization is \([\d.]+, ([\d.]+) GiB\)",
}
KEEP_LINES = re.compile(r"Model loading took|Available KV cache memory|GPU KV cache size|Maximum concurrency|"
                        r"Actual usage is|Desired GPU memory|attention backend|FlashAttention version|Marlin|"
                        r"AWQ|quantization|Traceback|Error|custom all-reduce|NCCL|non-default args|"
                        r"Loading weights took|graph capturing finished|init engine")


def parse_vllm_memory(text: str) -> dict:
    """The first match of each of vLLM's start-up memory lines (per worker: TP ranks print alike)."""
    out = {}
    for key, pat in MEM_PATTERNS.items():
        m = re.search(pat, text)
        if m:
            v = m.group(1).replace(",", "")
            out[key] = int(v) if key == "kv_tokens" else float(v)
    if out.get("kv_available_gib") and out.get("kv_tokens"):
        out["kv_bytes_per_token"] = round(out["kv_available_gib"] * GIB / out["kv_tokens"], 1)
    return out


def keep_lines(text: str, limit: int = 80) -> list[str]:
    seen, out = set(), []
    for line in text.splitlines():
        if KEEP_LINES.search(line):
            key = re.sub(r"^.*?\] ", "", line)[:200]
            if key not in seen:
                seen.add(key)
                out.append(line[:400])
    return out[:limit]


# ------------------------------------------------------------------------------------- load
def chat_body(messages: list[dict], max_tokens: int, stream: bool) -> dict:
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "top_p": 1.0,
            "repetition_penalty": 1.0, "ignore_eos": True}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


async def one_request(c, body: dict) -> dict:
    """POST /v1/chat/completions; TTFT = first content chunk (streamed) or the whole answer (not)."""
    r = {"status": 0, "ttft": None, "tokens": 0, "ptok": None, "t_start": time.time()}
    t0 = time.perf_counter()
    try:
        if body.get("stream"):
            async with c.stream("POST", "/v1/chat/completions", json=body) as resp:
                r["status"] = resp.status_code
                if resp.status_code != 200:
                    r["err"] = (await resp.aread()).decode(errors="replace")[:200]
                else:
                    t_last = None
                    async for line in resp.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        ch = json.loads(line[6:])
                        if "error" in ch:
                            r["status"], r["err"] = ch["error"].get("code", 500), str(ch["error"])[:200]
                            continue
                        chs = ch.get("choices")
                        if chs and (chs[0].get("delta") or {}).get("content"):
                            now = time.perf_counter() - t0
                            if r["ttft"] is None:
                                r["ttft"] = now
                            t_last = now
                        u = ch.get("usage")
                        if u:
                            r["tokens"], r["ptok"] = u["completion_tokens"], u.get("prompt_tokens")
                    r["t_last"] = t_last
        else:
            resp = await c.post("/v1/chat/completions", json=body)
            r["status"] = resp.status_code
            if resp.status_code == 200:
                u = resp.json()["usage"]
                r["tokens"], r["ptok"] = u["completion_tokens"], u.get("prompt_tokens")
            else:
                r["err"] = resp.text[:200]
    except Exception as e:  # noqa: BLE001
        r["status"], r["err"] = 599, repr(e)[:200]
    r["lat"] = time.perf_counter() - t0
    r["t_end"] = time.time()
    return r


async def run_list(base: str, bodies: list[dict], concurrency: int, timeout: float = 300.0) -> list[dict]:
    """Every body once, at most ``concurrency`` in flight (closed loop), in list order; results in list order."""
    import httpx
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 16, max_keepalive_connections=concurrency + 16)
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(timeout), limits=limits) as c:
        async def go(i, b):
            async with sem:
                r = await one_request(c, b)
                r["i"] = i
                return r
        return list(await asyncio.gather(*[go(i, b) for i, b in enumerate(bodies)]))


def run_list_sync(base: str, bodies: list[dict], concurrency: int, timeout: float = 300.0,
                  total_timeout: float | None = None) -> tuple[list[dict], float]:
    """``timeout``: per request; ``total_timeout``: for the whole list (TimeoutError when it passes)."""
    t = time.time()
    coro = run_list(base, bodies, concurrency, timeout)
    rs = asyncio.run(coro if total_timeout is None else asyncio.wait_for(coro, total_timeout))
    return rs, time.time() - t


class Load(threading.Thread):
    """Closed-loop load until ``stop()``: ``concurrency`` workers, each sending ``make_body(k)`` again and again
    (after a refusal, ``backoff_s`` later). Keeps every finished request's summary."""

    def __init__(self, base: str, make_body, concurrency: int, timeout: float = 300.0, backoff_s: float = 1.0):
        super().__init__(daemon=True)
        self.backoff_s = backoff_s
        self.base, self.make_body, self.concurrency, self.timeout = base, make_body, concurrency, timeout
        self.done: list[dict] = []
        self._stop_ev = threading.Event()
        self.t_start = self.t_stop = None

    def stop(self) -> None:
        self.t_stop = time.time()
        self._stop_ev.set()

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        import httpx
        limits = httpx.Limits(max_connections=self.concurrency + 16, max_keepalive_connections=self.concurrency + 16)
        counter = iter(range(10 ** 9))
        self.t_start = time.time()
        async with httpx.AsyncClient(base_url=self.base, timeout=httpx.Timeout(self.timeout), limits=limits) as c:
            async def worker():
                while not self._stop_ev.is_set():
                    r = await one_request(c, self.make_body(next(counter)))
                    self.done.append({k: r.get(k) for k in ("status", "tokens", "ptok", "t_start", "t_end", "lat")})
                    if r["status"] != 200:
                        await asyncio.sleep(self.backoff_s)
            await asyncio.gather(*[worker() for _ in range(self.concurrency)])


def summarise(rs: list[dict], wall: float | None = None) -> dict:
    ok = [r for r in rs if r["status"] == 200]
    st: dict[str, int] = {}
    for r in rs:
        st[str(r["status"])] = st.get(str(r["status"]), 0) + 1
    if wall is None and rs:
        wall = max(r["t_end"] for r in rs) - min(r["t_start"] for r in rs)
    out_tokens = sum(r["tokens"] for r in ok)
    s = {"n": len(rs), "status": st, "out_tokens": out_tokens, "wall_s": round(wall or 0, 2),
         "out_tok_s": round(out_tokens / wall, 1) if wall else None,
         "prompt_tokens_p50": pct([r.get("ptok") for r in ok], 50),
         "ttft_ms_p50": _ms(pct([r.get("ttft") for r in ok], 50)),
         "ttft_ms_p90": _ms(pct([r.get("ttft") for r in ok], 90)),
         "ttft_ms_p99": _ms(pct([r.get("ttft") for r in ok], 99)),
         "lat_s_p50": pct([r["lat"] for r in ok], 50), "lat_s_p99": pct([r["lat"] for r in ok], 99)}
    errs = [r.get("err") for r in rs if r["status"] != 200]
    if errs:
        s["first_err"] = errs[0]
    return s


def _ms(x):
    return None if x is None else round(x * 1000, 1)


def wait_http_ready(base: str, limit_s: float, alive=lambda: True, health: bool = False) -> float:
    import httpx
    t0 = time.time()
    while True:
        if not alive():
            raise RuntimeError("server process exited")
        try:
            r = httpx.post(base + "/v1/chat/completions", timeout=60, json=chat_body(
                [{"role": "user", "content": "abcd efgh"}], 2, False))
            if r.status_code == 200 and (not health or httpx.get(base + "/health", timeout=30).status_code == 200):
                return time.time() - t0
        except Exception:  # noqa: BLE001
            pass
        if time.time() - t0 > limit_s:
            raise TimeoutError(f"not ready after {limit_s} s")
        time.sleep(1)
