"""How many LLM replicas each pool runs right now, read from Serve's own status.

The router's window is per running replica (scheduler.may_start), so it must
follow the autoscaler: a pool scaled from 1 to 4 replicas takes four times the
requests at once. Polled, because Serve 2.60 gives a replica no push for it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, Dict

from ray import serve

logger = logging.getLogger("ray.serve")
POLL_S = 5.0


def running_replicas(app_name: str) -> Dict[str, int]:
    """RUNNING replicas per deployment of one application (a blocking controller call)."""
    app = serve.status().applications.get(app_name)
    if app is None:
        return {}
    return {name: int(d.replica_states.get("RUNNING", 0)) for name, d in app.deployments.items()}


async def follow_replica_counts(app_name: str, apply: Callable[[Dict[str, int]], None]) -> None:
    """Call ``apply`` with fresh counts every POLL_S seconds, for the replica's lifetime."""
    while True:
        try:
            apply(await asyncio.to_thread(running_replicas, app_name))
        except Exception:  # the controller may be restarting; keep the last counts
            logger.warning("could not read replica counts from Serve", exc_info=True)
        await asyncio.sleep(POLL_S)
