"""Every number the router decides with, read from serve_config.yaml (`args.router`).

Defaults follow the seed: 30 s deadlines, max_tokens capped at 2048, sampling
temperature 0.7 / top_p 0.9 / repetition_penalty 1.1.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Dict, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class PriorityClass(IntEnum):
    """Lower value = more urgent; the value is also vLLM's request `priority`."""

    HIGH = 0
    MEDIUM = 1
    LOW = 2

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> "PriorityClass":
        return cls[text.strip().upper()]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _per_class(high, medium, low):
    return Field(default_factory=lambda: {"high": high, "medium": medium, "low": low})


class ClassificationSettings(_Strict):
    high_below_tokens: int = Field(128, gt=0, description="prompts shorter than this are high")
    medium_below_tokens: int = Field(2048, gt=0, description="else shorter than this are medium; rest low")
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
    sampling_defaults: Dict[str, float] = Field(
        default_factory=lambda: {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1}
    )


class QueueSettings(_Strict):
    capacity: Dict[str, int] = _per_class(64, 32, 16)
    max_queued_total: int = Field(96, gt=0, description="beyond this, lower classes are shed first")
    max_in_flight: int = Field(8, gt=0, description="concurrency window toward a pool, per running LLM replica")
    reserved_for_high: float = Field(0.25, ge=0, lt=1, description="share of the window only high may use")
    max_in_flight_per_class: Dict[str, int] = Field(
        default_factory=lambda: {"high": 8, "medium": 4, "low": 2},
        description="cap per class inside the window, per running LLM replica: long prompts steal "
                    "every engine step's compute",
    )
    yield_to_high: Dict[Literal["medium", "low"], int] = Field(
        default_factory=dict,
        description="class: it starts only while fewer high requests than this (per LLM replica) run or "
                    "wait; 1 = only in the gaps between high requests",
    )
    timeouts_s: Dict[str, float] = _per_class(30.0, 30.0, 30.0)
    retry_after_s: int = Field(2, ge=1, description="Retry-After on a full queue")


class CircuitSettings(_Strict):
    failure_threshold: int = Field(5, ge=1, description="consecutive failures that open the circuit")
    open_s: float = Field(10.0, gt=0, description="how long it stays open before a half-open probe")


class RouterSettings(_Strict):
    classification: ClassificationSettings = Field(default_factory=ClassificationSettings)
    admission: AdmissionSettings = Field(default_factory=AdmissionSettings)
    queues: QueueSettings = Field(default_factory=QueueSettings)
    circuit: CircuitSettings = Field(default_factory=CircuitSettings)
