"""Tenant quota shared by every router replica, without a remote call on each request.

``TenantLedger`` (a one-replica Serve deployment beside the router) owns the
authoritative buckets: per tenant, requests and tokens per minute (token
buckets, limits.py) and the concurrent requests in use. A router replica never
asks it per request: its ``QuotaClient`` leases a small chunk at a time
(``LEASE_SHARE`` of the tier's limit, at least what the request needs) and
spends the chunk locally; it goes back to the ledger only when the chunk is
spent, and gives back what it holds beyond one chunk (a refund, a finished
request's slot) and everything a tenant left idle for ``IDLE_S``. So a limit
holds across replicas exactly (leases are taken from one bucket), the hot path
pays a remote call once per chunk, and a replica hoards at most one chunk.

Small limits (a chunk under one unit) lease one unit at a time: exact, at the
price of a call per request for that tenant.

Slots (concurrent requests) are recorded per router replica, which renews
them every ``IDLE_S`` with the count it really holds (so a lost give-back
corrects itself; calls are numbered, so a renewal overtaken by a newer lease is
ignored rather than erasing it); a replica silent for ``HOLDER_EXPIRY_S`` (it died) has
its slots freed, so a lost replica cannot lock a tenant out.

If the ledger cannot be reached the router admits the request (limits are
about sharing, not safety; refusing everyone because one actor is restarting
would turn a limiter into an outage), logs it, and retries the ledger on the
next request.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

from deployments.tenancy.limits import REQUESTS, TOKENS, Allowance, TokenBucket
from deployments.tenancy.tenants import Caller, Tier

logger = logging.getLogger("ray.serve")

# A lease is this share of a tier's per-minute limit (3 s of traffic at the full rate):
# large enough that a busy tenant calls the ledger about once per 3 s per router,
# small enough that what one router holds unused is a twentieth of the limit.
LEASE_SHARE = 0.05
# A tenant silent this long on a router gets its leases handed back.
IDLE_S = 1.0
# A router replica that has not renewed its slots for this long is gone; its slots are freed.
HOLDER_EXPIRY_S = 15 * IDLE_S


@dataclass(frozen=True)
class Amounts:
    """Units in each dimension: requests, tokens, concurrent slots."""

    requests: int = 0
    tokens: int = 0
    slots: int = 0

    def __bool__(self) -> bool:
        return bool(self.requests or self.tokens or self.slots)


@dataclass(frozen=True)
class Grant:
    """What the ledger granted, and each bucket's state after it (for headers and Retry-After)."""

    granted: Amounts
    remaining_requests: float
    remaining_tokens: float
    slots_in_use: int


class _TenantBuckets:
    def __init__(self, tier: Tier, now: float):
        self.requests = TokenBucket(tier.requests_per_minute, now)
        self.tokens = TokenBucket(tier.tokens_per_minute, now)
        self.slots: Dict[str, int] = {}  # router replica -> slots it holds
        self.tier = tier

    @property
    def slots_in_use(self) -> int:
        return sum(self.slots.values())

    def follow(self, tier: Tier, now: float) -> None:
        if tier != self.tier:
            self.requests.resize(tier.requests_per_minute, now)
            self.tokens.resize(tier.tokens_per_minute, now)
            self.tier = tier


class Ledger:
    """The pure bookkeeping behind ``TenantLedger``; times from ``clock``, seconds."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._tenants: Dict[str, _TenantBuckets] = {}
        self._holders: Dict[str, float] = {}  # router replica -> when it last called
        self._last_seq: Dict[str, int] = {}  # router replica -> the newest call number it sent that we applied

    def _seen(self, holder: str, seq: int) -> None:
        self._last_seq[holder] = max(seq, self._last_seq.get(holder, -1))
        now = self._clock()
        self._holders[holder] = now
        for gone in [h for h, at in self._holders.items() if now - at > HOLDER_EXPIRY_S]:
            del self._holders[gone]
            self._last_seq.pop(gone, None)
            for buckets in self._tenants.values():
                buckets.slots.pop(gone, None)
            logger.warning("tenant ledger: router replica %s stopped renewing; its slots are freed", gone)

    def _buckets(self, tenant: str, tier: Tier) -> _TenantBuckets:
        now = self._clock()
        buckets = self._tenants.get(tenant)
        if buckets is None:
            buckets = self._tenants[tenant] = _TenantBuckets(tier, now)
        buckets.follow(tier, now)
        return buckets

    def renew(self, holder: str, slots: Dict[str, int], seq: int) -> None:
        """A router replica is alive and holds ``slots`` per tenant (leased, in use or not), as of its call
        ``seq``; ignored when a newer call of it was applied already (the count predates that call)."""
        stale = seq < self._last_seq.get(holder, -1)
        self._seen(holder, seq)
        if stale:
            return
        for tenant, buckets in self._tenants.items():
            buckets.slots[holder] = slots.get(tenant, 0)

    def lease(self, tenant: str, tier: Tier, want: Amounts, holder: str, seq: int = 0) -> Grant:
        """Up to ``want`` in each dimension, as much as the buckets hold (whole units)."""
        self._seen(holder, seq)
        now = self._clock()
        buckets = self._buckets(tenant, tier)
        slots = max(0, min(want.slots, tier.max_concurrent - buckets.slots_in_use))
        buckets.slots[holder] = buckets.slots.get(holder, 0) + slots
        granted = Amounts(int(buckets.requests.take(want.requests, now)), int(buckets.tokens.take(want.tokens, now)),
                          slots)
        return Grant(granted, buckets.requests.remaining(now), buckets.tokens.remaining(now), buckets.slots_in_use)

    def give_back(self, tenant: str, tier: Tier, amounts: Amounts, holder: str, seq: int = 0) -> None:
        self._seen(holder, seq)
        now = self._clock()
        buckets = self._buckets(tenant, tier)
        buckets.requests.give_back(amounts.requests, now)
        buckets.tokens.give_back(amounts.tokens, now)
        buckets.slots[holder] = max(0, buckets.slots.get(holder, 0) - amounts.slots)


class TenantLedger:
    """The Serve deployment (one replica) every router replica leases quota from."""

    def __init__(self):
        self._ledger = Ledger()

    async def lease(self, tenant: str, tier: Tier, want: Amounts, holder: str, seq: int) -> Grant:
        return self._ledger.lease(tenant, tier, want, holder, seq)

    async def give_back(self, tenant: str, tier: Tier, amounts: Amounts, holder: str, seq: int) -> None:
        self._ledger.give_back(tenant, tier, amounts, holder, seq)

    async def renew(self, holder: str, slots: Dict[str, int], seq: int) -> None:
        self._ledger.renew(holder, slots, seq)


# --- the router's side ----------------------------------------------------------------------------


def chunk(limit: int) -> int:
    return int(limit * LEASE_SHARE)


@dataclass
class _Local:
    """What one router replica holds of one tenant's quota."""

    tier: Tier
    held: Dict[str, int] = field(default_factory=lambda: {"requests": 0, "tokens": 0, "slots": 0})
    remaining: Dict[str, float] = field(default_factory=dict)  # the ledger's buckets at the last lease
    running: int = 0  # admitted requests not finished: their slots are held too
    seen_at: float = 0.0
    last_used: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def covers(self, tokens: int) -> bool:
        return self.held["requests"] >= 1 and self.held["tokens"] >= tokens and self.held["slots"] >= 1


@dataclass(frozen=True)
class RateLimited:
    """429: which limit, its message, Retry-After seconds and the rate-limit headers."""

    message: str
    retry_after_s: int
    headers: Dict[str, str]


class Ticket:
    """One admitted request's hold on its tenant's quota; ``finish`` exactly once, with its real usage."""

    def __init__(self, client: Optional["QuotaClient"], caller: Caller, reserved_tokens: int,
                 headers: Dict[str, str]):
        self._client, self.caller, self.reserved_tokens, self.headers = client, caller, reserved_tokens, headers
        self._open = True

    def finish(self, used_tokens: Optional[int]) -> None:
        """Return the slot and the reserved tokens not used (``used_tokens``: prompt + output; None: all used)."""
        if self._open and self._client is not None:
            self._open = False
            unused = 0 if used_tokens is None else max(0, self.reserved_tokens - used_tokens)
            self._client._returned(self.caller, unused)


class QuotaClient:
    """One router replica's leases on every tenant's quota. ``ledger``: the TenantLedger's handle."""

    def __init__(self, ledger, holder: str, clock: Callable[[], float] = time.monotonic):
        self._ledger, self._holder, self._clock = ledger, holder, clock
        self._local: Dict[str, _Local] = {}
        self._tasks: set[asyncio.Task] = set()
        self._warned_at = -math.inf
        self._seq = 0  # numbers every call to the ledger
        self._in_flight = 0  # leases and give-backs sent, not answered

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _state(self, caller: Caller) -> _Local:
        local = self._local.get(caller.tenant)
        if local is None or local.tier != caller.tier:
            if local is not None and any(local.held.values()):
                self._give_back(caller.tenant, local.tier, dict(local.held))
            local = self._local[caller.tenant] = _Local(caller.tier)
        return local

    async def admit(self, caller: Caller, tokens: int) -> Ticket | RateLimited:
        """Take one request, ``tokens`` (prompt + max_tokens) and one slot of the caller's quota."""
        local = self._state(caller)
        if not local.covers(tokens):
            async with local.lock:  # one lease call per tenant at a time; the rest find it done
                if not local.covers(tokens):
                    if not await self._lease(caller, local, tokens):
                        return Ticket(None, caller, 0, {})  # ledger unreachable: admitted, unlimited
        tier, now = caller.tier, self._clock()
        if not local.covers(tokens):
            return self._refusal(local, tokens, now)
        for name, amount in ((REQUESTS, 1), (TOKENS, tokens), ("slots", 1)):
            local.held[name] -= amount
        local.last_used = now
        local.running += 1
        return Ticket(self, caller, tokens, self._headers(local, now))

    async def _lease(self, caller: Caller, local: _Local, tokens: int) -> bool:
        tier = caller.tier
        want = Amounts(
            requests=max(0, 1 - local.held["requests"]) + chunk(tier.requests_per_minute),
            tokens=max(0, tokens - local.held["tokens"]) + chunk(tier.tokens_per_minute),
            slots=max(0, 1 - local.held["slots"]) + chunk(tier.max_concurrent))
        self._in_flight += 1
        try:
            grant = await self._ledger.lease.remote(caller.tenant, tier, want, self._holder, self._next_seq())
        except Exception as exc:
            now = self._clock()
            if now - self._warned_at > 30:
                self._warned_at = now
                logger.warning("tenant ledger unreachable; admitting without limits: %s", str(exc)[:200])
            return False
        finally:
            self._in_flight -= 1
        local.held["requests"] += grant.granted.requests
        local.held["tokens"] += grant.granted.tokens
        local.held["slots"] += grant.granted.slots
        local.remaining = {REQUESTS: grant.remaining_requests, TOKENS: grant.remaining_tokens}
        local.seen_at = self._clock()
        return True

    def _allowance(self, local: _Local, dimension: str, now: float) -> Allowance:
        limit = local.tier.requests_per_minute if dimension == REQUESTS else local.tier.tokens_per_minute
        rate = limit / 60.0
        remaining = min(limit, local.remaining.get(dimension, limit) + rate * (now - local.seen_at))
        remaining = min(limit, remaining + local.held[dimension])
        return Allowance(limit, remaining, (limit - remaining) / rate)

    def _headers(self, local: _Local, now: float) -> Dict[str, str]:
        return {**self._allowance(local, REQUESTS, now).headers(REQUESTS),
                **self._allowance(local, TOKENS, now).headers(TOKENS)}

    def _refusal(self, local: _Local, tokens: int, now: float) -> RateLimited:
        tier, headers = local.tier, self._headers(local, now)
        if local.held["slots"] < 1:
            return RateLimited(f"Too many concurrent requests: this key's tier allows {tier.max_concurrent} at once; "
                               "retry when one of them has finished.", 1, headers)
        if tokens > tier.tokens_per_minute:
            return RateLimited(f"Request too large for tokens per min (TPM): Limit {tier.tokens_per_minute}, "
                               f"Requested {tokens} (prompt + max_tokens). Lower max_tokens or the prompt.",
                               60, headers)
        if local.held["requests"] < 1:
            dimension, label, limit, need = REQUESTS, "requests per min (RPM)", tier.requests_per_minute, 1
        else:
            dimension, label, limit, need = TOKENS, "tokens per min (TPM)", tier.tokens_per_minute, tokens
        allowance = self._allowance(local, dimension, now)
        wait_s = max(1, math.ceil((need - allowance.remaining) / (limit / 60.0)))
        return RateLimited(f"Rate limit reached for {label}: Limit {limit}, Requested {need}. "
                           f"Please try again in {wait_s}s.", wait_s, headers)

    def _returned(self, caller: Caller, unused_tokens: int) -> None:
        local = self._local.get(caller.tenant)
        if local is None or local.tier != caller.tier:  # the tier changed meanwhile: straight back
            self._give_back(caller.tenant, caller.tier, {"slots": 1, "tokens": unused_tokens})
            return
        local.running -= 1
        local.held["slots"] += 1
        local.held[TOKENS] += unused_tokens
        # Keep at most one chunk: the rest may be what another router replica is waiting for.
        excess = {"slots": local.held["slots"] - chunk(local.tier.max_concurrent),
                  TOKENS: local.held[TOKENS] - chunk(local.tier.tokens_per_minute)}
        excess = {name: amount for name, amount in excess.items() if amount > 0}
        if excess:
            for name, amount in excess.items():
                local.held[name] -= amount
            self._give_back(caller.tenant, local.tier, excess)

    def sweep(self) -> None:
        """Hand back every lease of a tenant idle for ``IDLE_S`` (called every ``IDLE_S``)."""
        now = self._clock()
        for tenant, local in list(self._local.items()):
            if now - local.last_used >= IDLE_S and any(local.held.values()) and not local.lock.locked():
                held, local.held = dict(local.held), {REQUESTS: 0, TOKENS: 0, "slots": 0}
                self._give_back(tenant, local.tier, held)

    async def sweep_forever(self) -> None:
        """Every ``IDLE_S``: hand back idle leases and renew this replica's slots at the ledger."""
        while True:
            await asyncio.sleep(IDLE_S)
            self.sweep()
            if self._in_flight:  # the count would miss what is on its way; renew next time
                continue
            try:
                held = {tenant: local.held["slots"] + local.running for tenant, local in self._local.items()}
                await self._ledger.renew.remote(self._holder, held, self._next_seq())
            except Exception:
                logger.debug("tenant ledger renew failed", exc_info=True)

    def _give_back(self, tenant: str, tier: Tier, held: Dict[str, int]) -> None:
        amounts = Amounts(held.get(REQUESTS, 0), held.get(TOKENS, 0), held.get("slots", 0))
        if not amounts:
            return
        task = asyncio.get_running_loop().create_task(self._send_back(tenant, tier, amounts))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_back(self, tenant: str, tier: Tier, amounts: Amounts) -> None:
        self._in_flight += 1
        try:
            await self._ledger.give_back.remote(tenant, tier, amounts, self._holder, self._next_seq())
        except Exception:  # lost tokens refill on their own; lost slots are freed when this replica expires
            logger.warning("could not give quota back to the tenant ledger", exc_info=True)
        finally:
            self._in_flight -= 1
