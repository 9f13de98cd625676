"""Decide a request's priority class: from its prompt length, or a permitted X-Priority."""

from __future__ import annotations

from dataclasses import dataclass

from deployments.router.settings import ClassificationSettings, PriorityClass
from deployments.router.validation import RequestProblem

PRIORITY_HEADER = "x-priority"


@dataclass(frozen=True)
class Classification:
    priority: PriorityClass
    by_length: PriorityClass
    overridden: bool


def class_by_length(prompt_tokens: int, settings: ClassificationSettings) -> PriorityClass:
    if prompt_tokens < settings.high_below_tokens:
        return PriorityClass.HIGH
    if prompt_tokens < settings.medium_below_tokens:
        return PriorityClass.MEDIUM
    return PriorityClass.LOW


def classify(
    prompt_tokens: int, requested: str | None, settings: ClassificationSettings
) -> Classification | RequestProblem:
    """A client may always ask to be treated as less urgent; more urgent only if allowed."""
    by_length = class_by_length(prompt_tokens, settings)
    if requested is None or not requested.strip():
        return Classification(by_length, by_length, overridden=False)
    try:
        asked = PriorityClass.parse(requested)
    except KeyError:
        choices = ", ".join(c.label for c in PriorityClass)
        return RequestProblem(f"X-Priority must be one of {choices}; got {requested[:40]!r}", PRIORITY_HEADER)
    if asked < by_length and not settings.allow_priority_upgrade:
        return RequestProblem(
            f"X-Priority {asked.label!r} is higher than this prompt's class {by_length.label!r} "
            f"({prompt_tokens} tokens) and upgrades are not allowed",
            PRIORITY_HEADER,
        )
    return Classification(asked, by_length, overridden=asked != by_length)
