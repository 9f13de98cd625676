"""Decide whether a classified request may enter, and with which generation limits.

Pure: takes the fields the client set and the prompt's token count, returns the
updates to apply (clamped max_tokens, filled-in sampling defaults) or the 400.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from deployments.router.settings import AdmissionSettings
from deployments.router.validation import RequestProblem


@dataclass(frozen=True)
class Admitted:
    max_tokens: int
    clamped: bool
    updates: dict[str, Any] = field(default_factory=dict)


def sequences(fields: Mapping[str, Any]) -> int:
    """How many sequences the engine runs for a request: its prompts (a completions batch has several;
    ``fields["prompts"]``, 1 when absent) times ``n``. Each may produce ``max_tokens``."""
    return (fields.get("prompts") or 1) * (fields.get("n") or 1)


def check_sampling_ranges(fields: Mapping[str, Any], settings: AdmissionSettings) -> RequestProblem | None:
    temperature, top_p = fields.get("temperature"), fields.get("top_p")
    n, penalty = fields.get("n"), fields.get("repetition_penalty")
    if temperature is not None and not 0 <= temperature <= 2:
        return RequestProblem(f"temperature must be between 0 and 2; got {temperature}", "temperature")
    if top_p is not None and not 0 < top_p <= 1:
        return RequestProblem(f"top_p must be in (0, 1]; got {top_p}", "top_p")
    if n is not None and not 1 <= n <= settings.max_n:
        return RequestProblem(f"n must be between 1 and {settings.max_n}; got {n}", "n")
    prompts = fields.get("prompts") or 1
    if prompts > 1 and sequences(fields) > settings.max_n:
        # The router admits, queues and paces requests, each a few sequences at most: a batch of many
        # prompts would run as many streams as that many requests while holding one slot.
        return RequestProblem(
            f"a request may run at most {settings.max_n} sequences (prompts x n); this one asks for "
            f"{sequences(fields)} ({prompts} prompts x n {n or 1}): send the prompts as separate requests",
            "prompt")
    if penalty is not None and penalty <= 0:
        return RequestProblem(f"repetition_penalty must be positive; got {penalty}", "repetition_penalty")
    return None


def decide_max_tokens(
    requested: int | None, prompt_tokens: int, max_model_len: int, settings: AdmissionSettings
) -> tuple[int, bool] | RequestProblem:
    """The max_tokens to run with and whether it was clamped, or why not."""
    room = max_model_len - prompt_tokens
    if requested is None:
        # Unset: as much as the cap and the context allow (or the configured default).
        if room < 1:
            return RequestProblem(
                f"prompt has {prompt_tokens} tokens, which leaves no room in the model's "
                f"context of {max_model_len} tokens",
                "messages",
            )
        wanted = settings.default_max_tokens or settings.max_tokens_cap
        return min(wanted, settings.max_tokens_cap, room), False
    if requested < 1:
        return RequestProblem(f"max_tokens must be at least 1; got {requested}", "max_tokens")
    clamped = requested > settings.max_tokens_cap
    if clamped and settings.over_cap == "reject":
        return RequestProblem(
            f"max_tokens {requested} is above this service's cap of {settings.max_tokens_cap}", "max_tokens"
        )
    applied = min(requested, settings.max_tokens_cap)
    if prompt_tokens + applied > max_model_len:
        return RequestProblem(
            f"prompt ({prompt_tokens} tokens) plus max_tokens ({applied}) is {prompt_tokens + applied}, "
            f"beyond the model's context of {max_model_len} tokens",
            "max_tokens",
        )
    return applied, clamped


def admit(
    fields: Mapping[str, Any], prompt_tokens: int, max_model_len: int, settings: AdmissionSettings
) -> Admitted | RequestProblem:
    """``fields``: only what the client set (unset fields are absent or None)."""
    problem = check_sampling_ranges(fields, settings)
    if problem is not None:
        return problem
    decided = decide_max_tokens(fields.get("max_tokens"), prompt_tokens, max_model_len, settings)
    if isinstance(decided, RequestProblem):
        return decided
    max_tokens, clamped = decided
    updates: dict[str, Any] = {"max_tokens": max_tokens}
    for name, value in settings.sampling_defaults.items():
        if fields.get(name) is None:
            updates[name] = value
    return Admitted(max_tokens=max_tokens, clamped=clamped, updates=updates)
