"""Every number the router decides with: the Router deployment's ``user_config`` in serve_config.yaml.

Serve hands a changed ``user_config`` to the running router replicas
(``Router.reconfigure``) without restarting anything; the LLM engines, whose
code version hashes the application's ``args``, are not touched. A profile may
override the queue settings for its pools (``router_queues`` in ``args``);
``queue_settings_for`` merges the two.

Defaults follow the seed and web chat: SLO first token under 1 s for high
(3 s medium, 60 s low) and at least 20 tokens/s (50 ms per token) for all;
30 s start deadlines for high and medium, 10 minutes for low (the seed's
asynchronous class); max_tokens capped at 2048; sampling temperature 0.7 /
top_p 0.9 / repetition_penalty 1.1.
"""

from __future__ import annotations

import hashlib
from enum import IntEnum
from typing import Annotated, Dict, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments.config.names import HIGH, HIGH_BELOW_TOKENS, LOW, MEDIUM, MEDIUM_BELOW_TOKENS, PRIORITY_CLASSES


class PriorityClass(IntEnum):
    """Lower value = more urgent; the value is also vLLM's request `priority`."""

    HIGH = 0
    MEDIUM = 1
    LOW = 2

    @property
    def label(self) -> str:
        return PRIORITY_CLASSES[self.value]

    @classmethod
    def parse(cls, text: str) -> "PriorityClass":
        """The class a label names; KeyError if none."""
        label = text.strip().lower()
        if label not in PRIORITY_CLASSES:
            raise KeyError(text)
        return cls(PRIORITY_CLASSES.index(label))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _per_class(high, medium, low):
    return Field(default_factory=lambda: {HIGH: high, MEDIUM: medium, LOW: low})


class ClassificationSettings(_Strict):
    high_below_tokens: int = Field(HIGH_BELOW_TOKENS, gt=0, description="prompts shorter than this are high")
    medium_below_tokens: int = Field(MEDIUM_BELOW_TOKENS, gt=0, description="else shorter than this are medium; rest low")
    allow_priority_upgrade: bool = Field(
        False, description="may X-Priority ask for a higher class than the prompt length gives"
    )

    @model_validator(mode="after")
    def _ordered(self):
        if self.high_below_tokens >= self.medium_below_tokens:
            raise ValueError("high_below_tokens must be below medium_below_tokens")
        return self


class AdmissionSettings(_Strict):
    max_tokens_cap: int = Field(2048, gt=0)
    over_cap: Literal["clamp", "reject"] = "clamp"
    default_max_tokens: int | None = Field(
        None, description="applied when the client sends none; None = up to the cap and context"
    )
    max_n: int = Field(4, ge=1)
    max_request_bytes: int = Field(4 * 1024 * 1024, gt=0, description="larger bodies get 413")
    body_read_timeout_s: float = Field(
        60.0, gt=0, description="longest wait between two parts of a request body before 408 (nginx's "
                                "client_body_timeout, same default): a stalled upload holds no router task")
    sampling_defaults: Dict[str, float] = Field(
        default_factory=lambda: {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1}
    )


class ClassTargets(_Strict):
    """One priority class's service-level objective and its start deadline: two different things.

    The SLO scores goodput (a request counts when its TTFT and its time per
    output token both meet it); the start deadline is the longest a request may
    wait for its first token before it is refused or ended.
    """

    ttft_s: float = Field(gt=0, description="SLO: time to first token, seconds")
    tpot_s: float = Field(gt=0, description="SLO: time per output token after the first, seconds")
    start_deadline_s: float = Field(gt=0, description="queue wait + first token may not exceed this, seconds")


def _targets(ttft_s, tpot_s, start_deadline_s):
    return {"ttft_s": ttft_s, "tpot_s": tpot_s, "start_deadline_s": start_deadline_s}


class WindowSettings(_Strict):
    """The adaptive concurrency window toward a pool, per running LLM replica (router/window.py).

    It grows while the engine's measured time per output token stays below
    ``grow_below`` x the tightest class TPOT SLO and the window is in use, and
    shrinks as soon as it is above the SLO or the KV cache is nearly full.
    """

    initial: int = Field(4, ge=1, description="requests per replica before anything is measured")
    min: int = Field(2, ge=1, description="2: one slot stays for high beside a running low-class request")
    max: int = Field(512, ge=1, description="sanity bound, above vLLM's default max_num_seqs of 256 so that "
                                            "one class can fill the engine beside the high reserve")
    grow_below: float = Field(0.8, gt=0, lt=1, description="grow while TPOT < this share of the SLO")
    slow_start_increase: float = Field(2.0, gt=1, description="least growth per measurement until the first cut")
    max_increase: float = Field(8.0, gt=1, description="most growth per measurement in slow start, where the "
                                                       "measured headroom (grow_below x SLO / TPOT) sets it")
    increase: float = Field(1.25, gt=1, description="growth per measurement with room, after the first cut")
    decrease: float = Field(0.8, gt=0, lt=1, description="multiplicative cut per measurement over the SLO")
    kv_cache_high: float = Field(0.95, gt=0, le=1, description="KV-cache usage at which the window stops growing")

    @model_validator(mode="after")
    def _ordered(self):
        if not self.min <= self.initial <= self.max:
            raise ValueError("window: need min <= initial <= max")
        if self.max_increase < self.slow_start_increase:
            raise ValueError("window: need slow_start_increase <= max_increase")
        return self


class QueueSettings(_Strict):
    classes: Dict[str, ClassTargets] = Field(
        default_factory=lambda: {HIGH: _targets(1.0, 0.05, 30.0), MEDIUM: _targets(3.0, 0.05, 30.0),
                                 LOW: _targets(60.0, 0.05, 600.0)},
        description="per class: SLO (ttft_s, tpot_s) and start deadline",
        validate_default=True,
    )
    capacity: Dict[str, Annotated[int, Field(ge=0)]] = _per_class(256, 256, 256)
    max_queued_total: int = Field(512, gt=0, description="beyond this, lower classes are shed first")
    window: WindowSettings = Field(default_factory=WindowSettings)
    reserved_for_high: float = Field(0.25, ge=0, lt=1, description="share of the window only high may use")
    max_in_flight_per_class: Dict[str, Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: {LOW: 2},
        description="cap per class inside the window, per running LLM replica: long prompts steal "
                    "every engine step's compute",
    )
    yield_to_high: Dict[Literal[MEDIUM, LOW], Annotated[int, Field(ge=1)]] = Field(
        default_factory=dict,
        description="class: it starts only while fewer high requests than this (per LLM replica) run or "
                    "wait; 1 = only in the gaps between high requests",
    )
    tenant_reserve: float = Field(
        0.05, ge=0, lt=1,
        description="with API keys and fair sharing: share of the window (at least one slot per LLM replica when "
                    "above 0) that only a tenant running nothing or less than its fair share of the window may "
                    "take, so a light tenant's request "
                    "starts at once beside a heavy tenant's backlog instead of waiting for one of its slots")
    admit_within: float = Field(
        0.8, gt=0, le=1, description="admit only if the predicted wait is below this share of the start deadline")
    generation_slack: float = Field(
        3.0, ge=1, description="generation budget = slack x max_tokens x the class's TPOT SLO")
    stall_s: float = Field(15.0, gt=0, description="no output for this long after the first token: 504, engine abort")
    tpot_slo_from_engine: float | None = Field(
        None, gt=1,
        description="when set, each class's TPOT SLO is at least this multiple of the engine's TPOT with one "
                    "stream alone, as each LLM replica measures it at warm-up on the machine it runs on. For a "
                    "profile whose SLO is what its engine meets at low load (the CPU one): a fixed figure is one "
                    "machine's, and on a machine 2.6x slower it held the window at its minimum at any load. None: "
                    "the declared figures stand (web chat's 50 ms on the GPU profiles is an absolute goal)")

    @model_validator(mode="after")
    def _every_class(self):
        for name in ("classes", "capacity"):
            missing = {c.label for c in PriorityClass} - set(getattr(self, name))
            if missing:
                raise ValueError(f"{name} must name every class; missing {sorted(missing)}")
        return self

    def targets(self, cls: "PriorityClass") -> ClassTargets:
        return self.classes[cls.label]

    @property
    def tightest_tpot_s(self) -> float:
        return min(t.tpot_s for t in self.classes.values())

    def scaled_to_engine(self, unloaded_tpot_s: float | None) -> "QueueSettings":
        """These settings with each class's TPOT SLO raised to ``tpot_slo_from_engine`` x ``unloaded_tpot_s``
        (the engine's TPOT with one stream alone, seconds) where that is more; unchanged when either is
        None. The declared figure is the floor: a fast machine keeps it."""
        if self.tpot_slo_from_engine is None or unloaded_tpot_s is None:
            return self
        floor = self.tpot_slo_from_engine * unloaded_tpot_s
        classes = {name: t.model_copy(update={"tpot_s": max(t.tpot_s, floor)}) for name, t in self.classes.items()}
        return self.model_copy(update={"classes": classes})


class CircuitSettings(_Strict):
    failure_threshold: int = Field(5, ge=1, description="consecutive faults (replica errors, engine death) that "
                                                        "open the circuit; a stall opens it at once; overload "
                                                        "never counts")
    open_s: float = Field(10.0, gt=0, description="how long it stays open before the router probes it")
    probe_timeout_s: float = Field(60.0, gt=0, description="a one-token probe slower than this fails")


class RouterSettings(_Strict):
    classification: ClassificationSettings = Field(default_factory=ClassificationSettings)
    admission: AdmissionSettings = Field(default_factory=AdmissionSettings)
    queues: QueueSettings = Field(default_factory=QueueSettings)
    circuit: CircuitSettings = Field(default_factory=CircuitSettings)
    tenancy: "TenancySettings" = Field(default_factory=lambda: TenancySettings())
    cors: "CorsSettings" = Field(default_factory=lambda: CorsSettings())


class TenancySettings(_Strict):
    """API keys, tiers and fair sharing (deployments/tenancy/). Without ``keys_file`` the service is open:
    the embedded default then binds only 127.0.0.1, and says so at start-up."""

    keys_file: str | None = Field(None, description="the tenants file: tiers, tenants, SHA-256 digests of "
                                                    "their keys (a mounted Kubernetes Secret on k8s)")
    reload_s: float = Field(2.0, gt=0, description="how often the router checks whether the file changed")


class CorsSettings(_Strict):
    allow_origins: list[str] = Field(default_factory=list, description="browser origins allowed to call the "
                                                                       "API cross-origin; none by default")


RouterSettings.model_rebuild()


def settings_digest(settings: RouterSettings) -> str:
    """SHA-256 of the settings as applied (``/health`` shows it: has a reconfigure reached a replica?)."""
    return hashlib.sha256(settings.model_dump_json().encode()).hexdigest()


def queue_settings_for(base: QueueSettings, overrides: dict) -> QueueSettings:
    """The queue settings of a pool whose profile overrides ``base`` with ``overrides`` (a profile's
    ``router_queues``), key by key at every depth. Raises pydantic.ValidationError when the result is
    not valid."""
    return QueueSettings.model_validate(_merged(base.model_dump(), overrides))


def _merged(base: dict, overrides: dict) -> dict:
    """``overrides`` on top of ``base``, key by key at every depth (a profile may change one class's SLO)."""
    merged = dict(base)
    for key, value in overrides.items():
        both_dicts = isinstance(merged.get(key), dict) and isinstance(value, dict)
        merged[key] = _merged(merged[key], value) if both_dicts else value
    return merged
