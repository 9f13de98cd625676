"""The tenants file: tiers, tenants and the SHA-256 digests of their API keys.

Platform teams put one deployment in front of many applications. Each
application is a tenant with a tier (the highest priority class it may use and
its rate limits) and one or more keys. Only digests are stored, so the file
(mounted from a Kubernetes Secret, or a local path in serve_config.yaml's
``tenancy.keys_file`` of the router's settings) never holds a key in clear. Two digests for one
tenant is how a key is rotated: add the new one, move the clients, drop the
old one; the router re-reads the file when it changes, nothing restarts.

Format (YAML)::

    sharing: fair            # fair: tenants of one class share it by tokens served; fifo: arrival order
    tiers:
      standard: {max_class: high, requests_per_minute: 600, tokens_per_minute: 400000, max_concurrent: 32}
    tenants:
      webchat: {tier: standard, key_sha256: ["<64 hex digits>"]}

A digest: ``printf %s "$KEY" | sha256sum`` or ``python -m deployments.tenancy.tenants digest``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deployments.config.names import HIGH, PRIORITY_CLASSES

logger = logging.getLogger("ray.serve")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Tier(_Strict):
    """What a tenant may use. Limits are per tenant, summed over every router replica."""

    max_class: Literal[PRIORITY_CLASSES] = Field(  # type: ignore[valid-type]
        HIGH, description="the most urgent class its requests may get; above it they are lowered")
    requests_per_minute: int = Field(gt=0)
    tokens_per_minute: int = Field(gt=0, description="prompt + max_tokens reserved at admission, "
                                                     "corrected to prompt + output at the end")
    max_concurrent: int = Field(gt=0, description="requests of the tenant queued or running at once")


class Tenant(_Strict):
    tier: str
    key_sha256: List[str] = Field(min_length=1)

    @field_validator("key_sha256")
    @classmethod
    def _hex_digests(cls, digests: List[str]) -> List[str]:
        for digest in digests:
            if len(digest) != 64 or any(ch not in "0123456789abcdef" for ch in digest.lower()):
                raise ValueError("key_sha256 entries are SHA-256 hex digests (64 hex digits), never keys")
        return [digest.lower() for digest in digests]


class TenantsFile(_Strict):
    sharing: Literal["fair", "fifo"] = "fair"
    tiers: Dict[str, Tier] = Field(min_length=1)
    tenants: Dict[str, Tenant] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self):
        for name, tenant in self.tenants.items():
            if tenant.tier not in self.tiers:
                raise ValueError(f"tenant {name!r} names tier {tenant.tier!r}, not one of {sorted(self.tiers)}")
        owners: Dict[str, str] = {}
        for name, tenant in self.tenants.items():
            for digest in tenant.key_sha256:
                if owners.setdefault(digest, name) != name:
                    raise ValueError(f"one key digest is listed for both {owners[digest]!r} and {name!r}")
        return self

    def tier_of(self, tenant: str) -> Tier:
        return self.tiers[self.tenants[tenant].tier]


@dataclass(frozen=True)
class Caller:
    """The authenticated sender of one request."""

    tenant: str
    tier: Tier


class AuthFailure(Exception):
    """401. The message never says whether a key exists."""


MISSING = ("You didn't provide an API key. Provide it in an Authorization header using Bearer auth "
           "(Authorization: Bearer YOUR_KEY).")
WRONG_SCHEME = "The Authorization header must use the Bearer scheme (Authorization: Bearer YOUR_KEY)."
INCORRECT = "Incorrect API key provided."


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def bearer_key(authorization: Optional[str]) -> str:
    """The key of an ``Authorization: Bearer <key>`` header. Raises AuthFailure."""
    if authorization is None or not authorization.strip():
        raise AuthFailure(MISSING)
    scheme, _, key = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise AuthFailure(WRONG_SCHEME)
    key = key.strip()
    if not key:
        raise AuthFailure(MISSING)
    return key


def load(path: str) -> TenantsFile:
    """Parse and check the tenants file. Raises OSError, yaml.YAMLError or pydantic.ValidationError."""
    with open(path, encoding="utf-8") as handle:
        return TenantsFile.model_validate(yaml.safe_load(handle))


class KeyRing:
    """The tenants file as last read; re-read when its stat changes (checked at most every ``reload_s``).

    A Kubernetes Secret update swaps the mounted file atomically; a file that
    no longer parses is logged and the previous version kept, so a bad edit
    never locks every tenant out.
    """

    def __init__(self, path: str, reload_s: float = 2.0, clock=time.monotonic):
        self._path, self._reload_s, self._clock = path, reload_s, clock
        self._signature = self._stat()
        self._file = load(path)  # at start, a bad file is an error: refuse to run open by accident
        self._digests = self._index(self._file)
        self._checked_at = clock()
        self.version = 1

    def _stat(self):
        st = os.stat(self._path)
        return st.st_mtime_ns, st.st_ino, st.st_size

    @staticmethod
    def _index(tenants: TenantsFile) -> list[tuple[bytes, str]]:
        return [(bytes.fromhex(d), name) for name, tenant in tenants.tenants.items() for d in tenant.key_sha256]

    @property
    def file(self) -> TenantsFile:
        self._maybe_reload()
        return self._file

    def _maybe_reload(self) -> None:
        now = self._clock()
        if now - self._checked_at < self._reload_s:
            return
        self._checked_at = now
        try:
            signature = self._stat()
            if signature == self._signature:
                return
            fresh = load(self._path)
        except Exception as exc:
            logger.error("tenants file %s could not be re-read; keeping the previous version: %s",
                         self._path, str(exc)[:300])
            return
        self._signature, self._file, self._digests = signature, fresh, self._index(fresh)
        self.version += 1
        logger.info("tenants file %s re-read: %d tenants, %d tiers", self._path, len(fresh.tenants), len(fresh.tiers))

    def authenticate(self, authorization: Optional[str]) -> Caller:
        """The caller an Authorization header names. Raises AuthFailure (401).

        Every stored digest is compared, with ``hmac.compare_digest``, whatever
        matched: the time taken says nothing about which digest is close.
        """
        key = bearer_key(authorization)
        presented = hashlib.sha256(key.encode("utf-8")).digest()
        tenants = self.file
        found = None
        for stored, name in self._digests:
            if hmac.compare_digest(presented, stored):
                found = name
        if found is None:
            raise AuthFailure(INCORRECT)
        return Caller(found, tenants.tier_of(found))


def _main(argv: list[str]) -> int:
    """``digest``: the SHA-256 of a key read from stdin; ``new``: a fresh key and its digest."""
    if argv[:1] == ["digest"]:
        print(digest(sys.stdin.read().strip()))
        return 0
    if argv[:1] == ["new"]:
        key = "sk-" + secrets.token_urlsafe(32)
        print(f"key:    {key}\nsha256: {digest(key)}")
        return 0
    print("usage: python -m deployments.tenancy.tenants digest < keyfile | new", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
