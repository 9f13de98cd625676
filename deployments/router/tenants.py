"""The router's side of tenancy: who is calling, may they, and what their request used.

``ApiKeyAuth`` (ASGI middleware) is the gate: with keys configured, every
``/v1`` HTTP route, present or added later, needs ``Authorization: Bearer
<key>``; a missing, malformed or unknown key is a 401 in OpenAI's format that
never says whether a key exists. The caller it finds rides on the request's
``state``. A WebSocket may instead name its key in its first message; the
socket handler passes it as that turn's Authorization header, and
``TenantGate.caller_of`` checks it the same way.

``TenantGate`` then caps the caller's class at its tier, takes its quota
(tenancy/ledger.py: requests, tokens, concurrent requests, shared by every
router replica) and, when the request ends, returns what was not used and
records the tenant's usage. Without keys it does nothing but say, once, that
the service is open.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import Dict, Optional

from starlette.requests import HTTPConnection

from deployments.observability import metrics
from deployments.router.errors import openai_error
from deployments.router.live_settings import current
from deployments.router.settings import PriorityClass, TenancySettings
from deployments.tenancy.ledger import QuotaClient, RateLimited, Ticket
from deployments.tenancy.tenants import AuthFailure, Caller, KeyRing

logger = logging.getLogger("ray.serve")

CALLER_STATE = "caller"
OPEN_WARNING = ("No API keys configured (the Router's user_config: tenancy.keys_file): the service is OPEN to anyone who can reach "
                "its port; it binds 127.0.0.1 only. Configure a tenants file before exposing it.")
TIER_LOWERED_HEADER = "x-priority-lowered-by-tier"

_rings: Dict[tuple, KeyRing] = {}
_rings_lock = threading.Lock()


def key_ring(settings: TenancySettings) -> Optional[KeyRing]:
    """The process's one KeyRing for these settings (shared by the middleware and the router); None: open."""
    if settings.keys_file is None:
        return None
    key = (settings.keys_file, settings.reload_s)
    with _rings_lock:
        if key not in _rings:
            _rings[key] = KeyRing(settings.keys_file, settings.reload_s)
        return _rings[key]


def unauthorized(failure: AuthFailure):
    metrics.refused_at_door(401, "unauthorized")
    return openai_error(401, str(failure), "invalid_request_error", code="invalid_api_key",
                        headers={"www-authenticate": 'Bearer realm="llm"'})


class ApiKeyAuth:
    """ASGI middleware: authenticate every ``/v1`` HTTP request when keys are configured."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("path", "").startswith("/v1"):
            ring = key_ring(current(scope).tenancy)
            if ring is not None:
                try:
                    caller = ring.authenticate(HTTPConnection(scope).headers.get("authorization"))
                except AuthFailure as failure:
                    return await unauthorized(failure)(scope, receive, send)
                scope.setdefault("state", {})[CALLER_STATE] = caller
        return await self.app(scope, receive, send)


@dataclass
class TenantUse:
    """One request's tenant: its ticket on the quota; ``finished`` records its usage once."""

    caller: Optional[Caller]
    ticket: Optional[Ticket] = None

    @property
    def tenant(self) -> str:
        return self.caller.tenant if self.caller else ""

    @property
    def headers(self) -> Dict[str, str]:
        return dict(self.ticket.headers) if self.ticket else {}

    def finished(self, status: int, prompt_tokens: int, output_tokens: Optional[int], started: bool) -> None:
        if self.ticket is not None:  # tokens used: none if it never started; all reserved if unknown
            self.ticket.finish(0 if not started else None if output_tokens is None else prompt_tokens + output_tokens)
        metrics.tenant_request(self.tenant or metrics.NONE, status,
                               prompt_tokens=prompt_tokens if started else 0, output_tokens=output_tokens or 0)


class TenantGate:
    """Per router replica: the key ring, the quota client, the tier's class cap."""

    def __init__(self, ledger, replica_id: str):
        self._ledger, self._replica_id = ledger, replica_id
        self._settings: TenancySettings | None = None
        self.ring: KeyRing | None = None
        self.quota: QuotaClient | None = None

    def apply(self, settings: TenancySettings) -> None:
        """Use these settings from now on (at start and on every reconfigure). Raises what
        ``tenancy.tenants.load`` raises for a missing or malformed tenants file: a bad edit fails the
        deploy instead of opening the service or locking every tenant out."""
        if settings == self._settings:
            return
        self.ring = key_ring(settings)
        if self.ring is not None and self.quota is None and self._ledger is not None:
            self.quota = QuotaClient(self._ledger, self._replica_id)
        if self.ring is None:
            logger.warning(OPEN_WARNING)
        self._settings = settings

    @property
    def fair(self) -> bool:
        return self.ring is None or self.ring.file.sharing == "fair"

    @property
    def reserve(self) -> bool:
        """Keep the tenants' reserve of the window (queues.tenant_reserve)? Only with keys and fair sharing:
        without keys every request is one anonymous tenant, and the reserve would only sit idle."""
        return self.ring is not None and self.ring.file.sharing == "fair"

    def caller_of(self, connection: HTTPConnection) -> Caller | None:
        """The authenticated caller (None when open). Raises AuthFailure."""
        if self.ring is None:
            return None
        caller = connection.scope.get("state", {}).get(CALLER_STATE)
        return caller or self.ring.authenticate(connection.headers.get("authorization"))

    @staticmethod
    def cap_class(caller: Caller | None, cls: PriorityClass) -> tuple[PriorityClass, Dict[str, str]]:
        """The class the caller's tier allows, and the header that says it was lowered."""
        if caller is None:
            return cls, {}
        allowed = PriorityClass.parse(caller.tier.max_class)
        if cls < allowed:
            return allowed, {TIER_LOWERED_HEADER: cls.label}
        return cls, {}

    async def admit(self, caller: Caller | None, tokens: int) -> TenantUse | RateLimited:
        if caller is None or self.quota is None:
            return TenantUse(caller)
        ticket = await self.quota.admit(caller, tokens)
        if isinstance(ticket, RateLimited):
            metrics.tenant_request(caller.tenant, 429, prompt_tokens=0, output_tokens=0)
            return ticket
        return TenantUse(caller, ticket)

    async def run(self) -> None:
        """Background: hand back idle leases, renew this replica's slots (once keys are configured)."""
        while self.quota is None:
            await asyncio.sleep(1.0)
        await self.quota.sweep_forever()


def rate_limited(limited: RateLimited, headers: Dict[str, str]):
    metrics.refused_at_door(429, "rate_limited")
    return openai_error(429, limited.message, "rate_limit_error", code="rate_limit_exceeded",
                        headers={**headers, **limited.headers, "retry-after": str(limited.retry_after_s)})
