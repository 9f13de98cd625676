"""Replay a request trace against a modelled fleet under several autoscaling policies.

    python -m sim.run sim/traces/diurnal.csv --out docs/autoscaling

Trace CSV columns: arrival_s, prompt_tokens, output_tokens, class (high|medium|low).
Policy knobs for "ours" come from serve_config.yaml's autoscaling_policy (the
production numbers); ``--policy-kwargs '{"upscale_delay_s": 5}'`` tries a
change. Prints per-class TTFT SLO attainment, GPU-hours and scale events per
policy, and writes a PNG of load, queue and replicas over time.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import deque
from pathlib import Path

import yaml

from deployments.autoscaling.decision import AutoscalingConfig, FleetSignals, mean_of_reported
from deployments.config.app_args import load_serve_config
from deployments.config.names import HIGH, LOW, MEDIUM
from sim.fleet import CLASSES, Fleet, ReplicaModel, Request
from sim.policies import OursPolicy, Policy, RayDefaultPolicy, StaticPolicy

PROFILES_PATH = Path(__file__).with_name("profiles.yaml")
DEFAULT_SLO_S = {HIGH: 2.0, MEDIUM: 5.0, LOW: 20.0}


def load_trace(path: Path) -> list[Request]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    requests = [Request(float(r["arrival_s"]), int(r["prompt_tokens"]), int(r["output_tokens"]), r["class"]) for r in rows]
    bad = [r.cls for r in requests if r.cls not in CLASSES]
    if bad:
        raise ValueError(f"{path}: unknown class {bad[0]!r}; expected one of {CLASSES}")
    return sorted(requests, key=lambda r: r.arrival_s)


def load_profile(name: str) -> ReplicaModel:
    profiles = yaml.safe_load(PROFILES_PATH.read_text())
    if name not in profiles:
        raise SystemExit(f"unknown profile {name!r}; choose one of {sorted(profiles)}")
    return ReplicaModel.model_validate(profiles[name])


def production_policy_kwargs() -> dict:
    return dict(load_serve_config()["applications"][0]["autoscaling_policy"]["policy_kwargs"])


def simulate(trace: list[Request], model: ReplicaModel, policy: Policy, start_replicas: int,
             dt: float = 0.1, control_s: float = 1.0, tail_s: float = 120.0, look_back_s: float = 30.0) -> dict:
    """Run one policy over the trace; returns the timeline and the finished requests."""
    requests = [Request(r.arrival_s, r.prompt_tokens, r.output_tokens, r.cls) for r in trace]
    fleet = Fleet(model, start_replicas)
    end = (requests[-1].arrival_s if requests else 0) + tail_s
    timeline, now, i, next_control = [], 0.0, 0, 0.0
    arrivals_since = 0
    window = LookBack(look_back_s / control_s)
    while now < end:
        while i < len(requests) and requests[i].arrival_s <= now:
            fleet.submit(requests[i])
            i, arrivals_since = i + 1, arrivals_since + 1
        if now >= next_control:
            signals = window.add(read_signals(fleet, now, control_s))
            fleet.scale_to(policy(signals, now), now)
            timeline.append((now, arrivals_since / control_s, fleet.queued(), len(fleet.live())))
            arrivals_since, next_control = 0, next_control + control_s
        fleet.step(now, dt)
        now += dt
    return {"requests": requests, "timeline": timeline, "gpu_hours": fleet.gpu_seconds / 3600,
            "scale_events": fleet.scale_events}


class LookBack:
    """Serve averages replica metrics over look_back_period_s (30 s); so does the simulator."""

    def __init__(self, samples: float):
        self.samples: deque[FleetSignals] = deque(maxlen=max(1, int(samples)))

    def add(self, now: FleetSignals) -> FleetSignals:
        self.samples.append(now)
        avg = lambda name: mean_of_reported([getattr(s, name) for s in self.samples])
        return FleetSignals(replicas=now.replicas, starting=now.starting,
                            engine_running=avg("engine_running"), router_queued=avg("router_queued"),
                            kv_cache_usage=avg("kv_cache_usage"), gpu_utilization=avg("gpu_utilization"))


def read_signals(fleet: Fleet, now: float, interval_s: float) -> FleetSignals:
    ready = [r for r in fleet.live() if r.ready(now)]
    busy = [min(1.0, r.busy_s / interval_s) for r in ready]
    for r in ready:
        r.busy_s = 0.0
    has_gpu = fleet.model.gpus_per_replica > 0
    return FleetSignals(
        replicas=len(fleet.live()),
        starting=sum(1 for r in fleet.live() if not r.ready(now)),
        engine_running=sum(len(r.active) for r in fleet.replicas),
        router_queued=fleet.queued(),
        kv_cache_usage=sum(r.kv_usage(fleet.model) for r in ready) / len(ready) if ready else None,
        gpu_utilization=(sum(busy) / len(busy) if busy else None) if has_gpu else None,
    )


def slo_attainment(requests: list[Request], slo_s: dict[str, float]) -> dict[str, float]:
    out = {}
    for cls in CLASSES:
        rs = [r for r in requests if r.cls == cls]
        if rs:
            met = sum(1 for r in rs if r.first_token_s is not None and r.first_token_s - r.arrival_s <= slo_s[cls])
            out[cls] = met / len(rs)
    return out


def build_policies(names: list[str], kwargs: dict, min_r: int, max_r: int, target_ongoing: float) -> list[Policy]:
    config = AutoscalingConfig.model_validate({**kwargs, "min_replicas": min_r, "max_replicas": max_r})
    makers = {
        "ours": lambda: OursPolicy(config),
        "ray-default": lambda: RayDefaultPolicy(min_r, max_r, target_ongoing),
        "static-peak": lambda: StaticPolicy(max_r),
    }
    return [makers[n]() for n in names]


def plot(trace_name: str, results: dict[str, dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(11, 8), sharex=True)
    first = next(iter(results.values()))["timeline"]
    axes[0].plot([t[0] / 60 for t in first], [t[1] for t in first], color="grey", lw=0.8)
    axes[0].set_ylabel("arrivals / s")
    for name, res in results.items():
        tl = res["timeline"]
        axes[1].plot([t[0] / 60 for t in tl], [t[2] for t in tl], lw=1, label=name)
        axes[2].step([t[0] / 60 for t in tl], [t[3] for t in tl], where="post", lw=1.2, label=name)
    axes[1].set_ylabel("router queue")
    axes[2].set_ylabel("replicas")
    axes[2].set_xlabel("minutes")
    axes[2].legend()
    axes[0].set_title(f"trace: {trace_name}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace", type=Path)
    parser.add_argument("--profile", default="4090d-tp1-qwen2.5-7b-fp16")
    parser.add_argument("--policies", default="ours,ray-default,static-peak")
    parser.add_argument("--min-replicas", type=int, default=1)
    parser.add_argument("--max-replicas", type=int, default=4)
    parser.add_argument("--policy-kwargs", default="{}", help="JSON overrides of serve_config.yaml's policy_kwargs")
    parser.add_argument("--ray-target-ongoing", type=float, default=16.0, help="target_ongoing_requests for ray-default")
    parser.add_argument("--slo", default=json.dumps(DEFAULT_SLO_S), help="TTFT SLO seconds per class, JSON")
    parser.add_argument("--out", type=Path, default=None, help="folder for the PNG and JSON summary")
    args = parser.parse_args(argv)

    trace, model = load_trace(args.trace), load_profile(args.profile)
    slo = {**DEFAULT_SLO_S, **json.loads(args.slo)}
    kwargs = {**production_policy_kwargs(), **json.loads(args.policy_kwargs)}
    policies = build_policies(args.policies.split(","), kwargs, args.min_replicas, args.max_replicas,
                              args.ray_target_ongoing)
    results, summary = {}, {}
    print(f"trace {args.trace.name}: {len(trace)} requests; profile {args.profile}; TTFT SLO {slo}")
    print(f"| policy | high SLO | medium SLO | low SLO | GPU-hours | scale events | max replicas |")
    print("|---|---|---|---|---|---|---|")
    for policy in policies:
        start = args.max_replicas if policy.name == "static-peak" else args.min_replicas
        res = simulate(trace, model, policy, start)
        results[policy.name] = res
        att = slo_attainment(res["requests"], slo)
        summary[policy.name] = {"slo_attainment": att, "gpu_hours": res["gpu_hours"],
                                "scale_events": len(res["scale_events"]),
                                "max_replicas": max(t[3] for t in res["timeline"])}
        cells = " | ".join(f"{100 * att[c]:.1f}%" if c in att else "-" for c in CLASSES)
        print(f"| {policy.name} | {cells} | {res['gpu_hours']:.2f} | {len(res['scale_events'])} | "
              f"{summary[policy.name]['max_replicas']} |")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.trace.stem
        plot(stem, results, args.out / f"{stem}.png")
        (args.out / f"{stem}.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
