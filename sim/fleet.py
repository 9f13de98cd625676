"""A modelled fleet of LLM replicas, stepped in small time increments.

Each ready replica runs up to ``max_batch`` requests within its KV capacity.
Per step, pending prefill goes first at ``prefill_tokens_per_s`` (as vLLM
schedules new prompts), and the rest of the step decodes every running
request at min(single-stream rate, batch ceiling / batch). New replicas are
ready after ``cold_start_s``; removed replicas drain before they stop costing.
Requests wait in one priority queue in front of the fleet, like the router's.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Optional

from pydantic import BaseModel, ConfigDict

from deployments.config.names import PRIORITY_CLASSES

CLASSES = PRIORITY_CLASSES


class ReplicaModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gpus_per_replica: int
    prefill_tokens_per_s: float
    decode_tokens_per_s_single: float
    decode_tokens_per_s_max: float
    max_batch: int
    kv_capacity_tokens: int
    cold_start_s: float


@dataclass(eq=False)
class Request:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    cls: str
    prefilled: float = 0.0
    generated: float = 0.0
    first_token_s: Optional[float] = None
    done_s: Optional[float] = None

    @property
    def kv_tokens(self) -> float:
        return self.prompt_tokens + self.generated


@dataclass(eq=False)
class Replica:
    ready_s: float
    draining: bool = False
    active: list[Request] = field(default_factory=list)
    busy_s: float = 0.0  # time with work, since the last signal read

    def ready(self, now: float) -> bool:
        return now >= self.ready_s

    def kv_usage(self, model: ReplicaModel) -> float:
        return sum(r.kv_tokens for r in self.active) / model.kv_capacity_tokens


class Fleet:
    def __init__(self, model: ReplicaModel, replicas: int):
        self.model = model
        self.replicas = [Replica(ready_s=0.0) for _ in range(replicas)]
        self.queues: dict[str, deque[Request]] = {c: deque() for c in CLASSES}
        self.gpu_seconds = 0.0
        self.scale_events: list[tuple[float, int, int]] = []

    # --- what the autoscaler sees -------------------------------------------------

    def live(self) -> list[Replica]:
        return [r for r in self.replicas if not r.draining]

    def queued(self) -> int:
        return sum(len(q) for q in self.queues.values())

    # --- time ----------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        self.queues[request.cls].append(request)

    def step(self, now: float, dt: float) -> None:
        for replica in self.replicas:
            if replica.ready(now):
                self._admit(replica)
                self._run(replica, now, dt)
        self.gpu_seconds += dt * len(self.replicas) * max(1, self.model.gpus_per_replica)
        self.replicas = [r for r in self.replicas if not (r.draining and not r.active)]

    def _admit(self, replica: Replica) -> None:
        if replica.draining:
            return
        used = sum(r.kv_tokens for r in replica.active)
        for cls in CLASSES:
            queue = self.queues[cls]
            while queue and len(replica.active) < self.model.max_batch:
                nxt = queue[0]
                if used + nxt.prompt_tokens + nxt.output_tokens > self.model.kv_capacity_tokens and replica.active:
                    return
                used += nxt.prompt_tokens + nxt.output_tokens
                replica.active.append(queue.popleft())

    def _run(self, replica: Replica, now: float, dt: float) -> None:
        if not replica.active:
            return
        replica.busy_s += dt
        time_left = dt
        # Prefill first, most urgent class first (vLLM's priority scheduling).
        for request in sorted(replica.active, key=lambda r: (CLASSES.index(r.cls), r.arrival_s)):
            need = request.prompt_tokens - request.prefilled
            if need <= 0 or time_left <= 0:
                continue
            spend = min(time_left, need / self.model.prefill_tokens_per_s)
            request.prefilled += spend * self.model.prefill_tokens_per_s
            time_left -= spend
            if request.prefilled >= request.prompt_tokens - 1e-9:
                request.first_token_s = now + (dt - time_left)
        decoding = [r for r in replica.active if r.first_token_s is not None]
        if decoding and time_left > 0:
            rate = min(self.model.decode_tokens_per_s_single, self.model.decode_tokens_per_s_max / len(decoding))
            for request in decoding:
                request.generated += rate * time_left
                if request.generated >= request.output_tokens:
                    request.done_s = now + dt
        replica.active = [r for r in replica.active if r.done_s is None]

    def scale_to(self, target: int, now: float) -> None:
        live = self.live()
        if target > len(live):
            for _ in range(target - len(live)):
                self.replicas.append(Replica(ready_s=now + self.model.cold_start_s))
        elif target < len(live):
            # Cancel replicas still starting first, then drain the least busy.
            order = sorted(live, key=lambda r: (r.ready(now), len(r.active)))
            for replica in order[: len(live) - target]:
                if not replica.ready(now):
                    self.replicas.remove(replica)
                else:
                    replica.draining = True
        if target != len(live):
            self.scale_events.append((now, len(live), target))
