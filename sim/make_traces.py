"""Write the example traces (deterministic): diurnal, burst, step.

    python -m sim.make_traces sim/traces
Rates are sized for 1-4 replicas of the 4090D TP1 Qwen2.5-7B profile.
"""

from __future__ import annotations

import csv
import math
import random
import sys
from pathlib import Path

from deployments.config.names import HIGH, HIGH_BELOW_TOKENS, LOW, MEDIUM, MEDIUM_BELOW_TOKENS


def request_shape(rng: random.Random) -> tuple[int, int, str]:
    """60% short chat (high), 30% medium context, 10% long documents (low)."""
    roll = rng.random()
    if roll < 0.6:
        prompt, cls = rng.randint(20, HIGH_BELOW_TOKENS - 1), HIGH
    elif roll < 0.9:
        prompt, cls = rng.randint(HIGH_BELOW_TOKENS, MEDIUM_BELOW_TOKENS - 1), MEDIUM
    else:
        prompt, cls = rng.randint(MEDIUM_BELOW_TOKENS, 6000), LOW
    output = max(8, min(1024, int(rng.lognormvariate(math.log(120), 0.6))))
    return prompt, output, cls


def poisson_arrivals(rate_at, duration_s: float, rng: random.Random, peak: float):
    """Non-homogeneous Poisson by thinning."""
    t = 0.0
    while True:
        t += rng.expovariate(peak)
        if t >= duration_s:
            return
        if rng.random() < rate_at(t) / peak:
            yield t


TRACES = {
    # One compressed "day" in an hour: night trough 0.5/s, afternoon peak 9/s.
    "diurnal": (3600, lambda t: 0.5 + 8.5 * (0.5 - 0.5 * math.cos(2 * math.pi * t / 3600)) ** 2, 9.0),
    # Steady 2/s with a 4-minute spike to 10/s.
    "burst": (1800, lambda t: 10.0 if 600 <= t < 840 else 2.0, 10.0),
    # 1.5/s, then a lasting step to 7/s.
    "step": (1800, lambda t: 7.0 if t >= 600 else 1.5, 7.0),
}


def main(folder: str) -> None:
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for name, (duration, rate, peak) in TRACES.items():
        rng = random.Random(name)
        with open(out / f"{name}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["arrival_s", "prompt_tokens", "output_tokens", "class"])
            for t in poisson_arrivals(rate, duration, rng, peak):
                writer.writerow([f"{t:.3f}", *request_shape(rng)])


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "sim/traces")
