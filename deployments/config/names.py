"""Names the app gives its LLM deployments, and reading a pool back from one.

Kept free of heavy imports: the Serve controller loads it with the
autoscaling policy.
"""

from __future__ import annotations

from typing import Optional

DEPLOYMENT_PREFIX = "ObservedLLMServer:"


def deployment_name_prefix(pool: str) -> str:
    return f"{DEPLOYMENT_PREFIX}{pool}:"


def pool_of_deployment(deployment_name: str) -> Optional[str]:
    """The pool an LLM deployment serves, from the name the app gives it."""
    if not deployment_name.startswith(DEPLOYMENT_PREFIX):
        return None
    rest = deployment_name[len(DEPLOYMENT_PREFIX):]
    return rest.split(":", 1)[0] if ":" in rest else None
