"""The streaming comparison table from bench/gpu_streaming.py's results (issue 12).

    python bench/streaming_report.py docs/bench/streaming/pass2
    python bench/streaming_report.py docs/bench/streaming/pass3


Reads every ``res_*.json`` in the folder (one per target run, saved by gpu_streaming.py), takes bare
vLLM's phases as the reference and prints, per run and phase: output tok/s and its ratio to bare's
same phase, TTFT p50/p99, the inter-chunk gap p99, tokens per SSE chunk, and the CPU seconds of each
Serve hop over the phase (every Router replica summed) with the hop's share of one core over the
phase's wall time. A second table gives the streamed phases in milliseconds (TTFT p50/p99, the gap
p50/p99 and its excess over bare's same phase, chunks per request, client TPOT p50) and each 1-stream
request's TTFT, which the first table's seconds are too coarse for. A run is named by its file
(``res_ours_window.json`` -> ``ours_window``). Nothing is measured here; it only tabulates what the
device runs wrote.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PHASES = ("s1", "c64", "c64b", "c64_r2", "c64_r4", "c256", "c256b", "c256_r2", "c256_r4", "n256")


def _hops(phase: dict) -> dict[str, float]:
    """CPU seconds per hop over the phase; router replicas summed (only one carries the role label)."""
    hops = {"proxy": 0.0, "router": 0.0, "llm_replica": 0.0, "engine": 0.0}
    for proc in phase.get("cpu", {}).get("top_processes", []):
        cmd, role = proc["cmd"], proc.get("role", "")
        if role == "proxy":
            hops["proxy"] += proc["cpu_s"]
        elif ":Router" in cmd or ":OpenAiIngress" in cmd:
            hops["router"] += proc["cpu_s"]
        elif role in ("llm_replica", "api_server"):
            hops["llm_replica"] += proc["cpu_s"]
        elif role == "engine_core" or "RayWorkerProc" in cmd:
            hops["engine"] += proc["cpu_s"]
    return hops


def _runs(folder: Path) -> tuple[dict, dict]:
    """Every run's results by name, and bare's phases (the reference)."""
    runs = {p.stem[len("res_"):]: json.loads(p.read_text()) for p in sorted(folder.glob("res_*.json"))}
    return runs, runs.get("bare", {}).get("phases", {})


def _bare(bare: dict, phase: str, key: str):
    """Bare's figure for the same phase (``c64_r4`` and ``c64b`` compare with ``c64``)."""
    return bare.get(phase.split("_")[0].rstrip("b"), {}).get("client", {}).get(key)


def _phases(runs: dict):
    """(run, phase name, phase results) for every phase each run measured, in PHASES order."""
    for run, res in runs.items():
        for name in PHASES:
            phase = res.get("phases", {}).get(name)
            if phase:
                yield run, name, phase


def rows(folder: Path) -> list[str]:
    runs, bare = _runs(folder)
    out = ["| run | phase | output tok/s | ÷ bare | TTFT p50 / p99 s | gap p99 ms | tok/chunk "
           "| CPU s: proxy / routers / LLM replica / engine (cores) |",
           "|---|---|---|---|---|---|---|---|"]
    for run, name, phase in _phases(runs):
        c = phase["client"]
        ref = _bare(bare, name, "out_tok_s")
        ratio = f"{c['out_tok_s'] / ref:.2f}×" if ref else "-"
        ttft = f"{c['ttft_p50']:.2f} / {c['ttft_p99']:.2f}" if c.get("ttft_p50") is not None else "-"
        wall = c["wall_s"] or 1.0
        hops = _hops(phase)
        cpu = " / ".join(f"{v:.1f} ({v / wall:.1f})" for v in hops.values())
        out.append(f"| {run} | {name} | {c['out_tok_s']:,.0f} | {ratio} | {ttft} | {c.get('gap_ms_p99', '-')} "
                   f"| {c.get('tokens_per_chunk', '-')} | {cpu} |")
    return out


def detail_rows(folder: Path) -> list[str]:
    """The streamed phases in ms, with the gap p99 over bare's same phase (the issue's "added delay")."""
    runs, bare = _runs(folder)
    out = ["| run | phase | TTFT p50 / p99 ms | 1-stream TTFTs ms | gap p50 / p99 ms | gap p99 − bare ms "
           "| chunks/req p50 | TPOT p50 ms |",
           "|---|---|---|---|---|---|---|---|"]
    for run, name, phase in _phases(runs):
        c = phase.get("client")
        if not c or not c.get("stream"):
            continue
        ref = _bare(bare, name, "gap_ms_p99")
        extra = f"{c['gap_ms_p99'] - ref:+.1f}" if ref is not None and c.get("gap_ms_p99") is not None else "-"
        ttft = (f"{1000 * c['ttft_p50']:.1f} / {1000 * c['ttft_p99']:.1f}"
                if c.get("ttft_p50") is not None else "-")
        each = ", ".join(f"{x:.1f}" for x in c.get("ttfts_ms") or []) or "-"
        out.append(f"| {run} | {name} | {ttft} | {each} | {c.get('gap_ms_p50', '-')} / {c.get('gap_ms_p99', '-')} "
                   f"| {extra} | {c.get('chunks_per_req_p50', '-')} | {c.get('tpot_ms_p50', '-')} |")
    return out


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/bench/streaming/pass2")
    print("\n".join(rows(folder)))
    print()
    print("\n".join(detail_rows(folder)))
