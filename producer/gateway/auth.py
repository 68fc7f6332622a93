"""Tenants' API keys: made and revoked with ``refinery keys``, checked on every request.

A key reads ``rfk_<key id>_<secret>``. Redis holds, per key id, the tenant, the key's
limits and the SHA-256 of the whole key, never the key itself. A plain hash rather than a
slow password hash because the secret is 256 random bits: there is nothing to guess, and a
slow hash would cost every request. The presented key's hash is compared with the stored
one in constant time. Nothing is cached, so a revoked key fails on the next request to any
replica.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
from datetime import datetime
from typing import cast

import redis
from pydantic import BaseModel, Field

from producer.gateway.problems import Unauthorized
from shared import keys
from shared.contract import utcnow
from shared.errors import InvalidInput

TENANT_PATTERN = r"^[A-Za-z0-9][\w.\-]{0,63}$"
_KEY = re.compile(r"^rfk_(?P<key_id>[0-9a-f]{16})_(?P<secret>[\w\-]{43})$")


class ApiKey(BaseModel):
    """What a key grants; ``refinery keys list`` shows these (never the secret)."""

    key_id: str
    tenant: str = Field(pattern=TENANT_PATTERN)
    rate: float = Field(gt=0)  # jobs per second
    max_queued: int = Field(ge=1)
    created_at: datetime
    revoked_at: datetime | None = None


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class KeyStore:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def create(self, tenant: str, *, rate: float, max_queued: int) -> tuple[str, ApiKey]:
        """A new key for ``tenant``; returns the key itself (shown once) and its record."""
        if not re.fullmatch(TENANT_PATTERN, tenant):
            raise InvalidInput("1-64 letters, digits, '_', '.' or '-', starting with a letter or digit", field="tenant")
        if not (rate > 0 and math.isfinite(rate)):
            raise InvalidInput("must be a positive, finite number of jobs per second", field="rate")
        if max_queued < 1:
            raise InvalidInput("must be at least 1", field="max_queued")
        key_id = secrets.token_hex(8)
        token = f"rfk_{key_id}_{secrets.token_urlsafe(32)}"
        record = ApiKey(key_id=key_id, tenant=tenant, rate=rate, max_queued=max_queued, created_at=utcnow())
        with self.redis.pipeline() as pipe:
            pipe.hset(keys.api_key(key_id), mapping={"record": record.model_dump_json(), "sha256": _digest(token)})
            pipe.sadd(keys.API_KEYS, key_id)
            pipe.sadd(keys.TENANTS, tenant)
            pipe.execute()
        return token, record

    def list(self) -> list[ApiKey]:
        ids = sorted(member.decode() for member in cast(set[bytes], self.redis.smembers(keys.API_KEYS)))
        with self.redis.pipeline(transaction=False) as pipe:
            for key_id in ids:
                pipe.hget(keys.api_key(key_id), "record")
            found = [ApiKey.model_validate_json(raw) for raw in pipe.execute() if raw is not None]
        return sorted(found, key=lambda key: (key.tenant, key.created_at))

    def revoke(self, key_id: str) -> ApiKey:
        """Mark the key revoked (kept, so the list still shows who had it and until when)."""
        name = keys.api_key(key_id)
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(name)
                    raw = pipe.hget(name, "record")
                    if raw is None:
                        pipe.reset()
                        raise InvalidInput(f"no API key {key_id!r}", field="key_id")
                    record = ApiKey.model_validate_json(raw)
                    if record.revoked_at is None:
                        record.revoked_at = utcnow()
                    pipe.multi()
                    pipe.hset(name, "record", record.model_dump_json())
                    pipe.execute()
                    return record
                except redis.WatchError:
                    continue

    def authenticate(self, authorization: str | None) -> ApiKey:
        """The key an ``Authorization: Bearer <key>`` header names, if it is valid and live."""
        scheme, _, token = (authorization or "").partition(" ")
        match = _KEY.match(token.strip()) if scheme.lower() == "bearer" else None
        if match is None:
            raise Unauthorized("send 'Authorization: Bearer <API key>' with a key from `refinery keys create`")
        stored = cast(list[bytes | None], self.redis.hmget(keys.api_key(match["key_id"]), ["record", "sha256"]))
        raw, digest = stored
        # Compared even when the key id is unknown, so the answer takes the same time.
        expected = digest.decode() if digest else "0" * 64
        if not hmac.compare_digest(_digest(token.strip()), expected) or raw is None:
            raise Unauthorized("unknown or revoked API key")
        record = ApiKey.model_validate_json(raw)
        if record.revoked_at is not None:
            raise Unauthorized("unknown or revoked API key")
        return record
