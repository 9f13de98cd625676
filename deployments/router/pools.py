"""Which LLM pool serves a request: by its class first, then by the context it needs.

A layout (deployments/config/layouts.py) may run several pools of the same
model, say 4×TP1 at 8k context for interactive traffic and 1×TP4 at 128k for
long documents. A request goes to the first pool, in layout order, that takes
its class and whose context fits it. One that fits no pool of its class spills
to the smallest pool that fits it at all (a long medium prompt to the
long-context pool), and one that fits nowhere is admitted against the largest
context, so admission's 400 names the real limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from deployments.router.settings import PriorityClass


@dataclass(frozen=True)
class PoolRoute:
    name: str
    classes: frozenset[str]
    max_model_len: int
    engine_priority: bool  # does this pool's engine order its queue by priority?

    def fits(self, tokens_needed: int) -> bool:
        return tokens_needed <= self.max_model_len


def choose_pool(cls: PriorityClass, tokens_needed: int, pools: Sequence[PoolRoute]) -> PoolRoute:
    """The pool for a request of class ``cls`` needing ``tokens_needed`` context tokens."""
    for pool in pools:
        if cls.label in pool.classes and pool.fits(tokens_needed):
            return pool
    spill = [pool for pool in pools if pool.fits(tokens_needed)]
    if spill:
        return min(spill, key=lambda pool: pool.max_model_len)
    return max(pools, key=lambda pool: pool.max_model_len)


def tokens_needed(prompt_tokens: int, requested_max_tokens: int | None, max_tokens_cap: int) -> int:
    """Context a request needs: its prompt plus the output it may get (at least one token)."""
    if requested_max_tokens is None:
        return prompt_tokens + 1
    return prompt_tokens + max(1, min(requested_max_tokens, max_tokens_cap))
