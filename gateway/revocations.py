"""Revoked tokens (`dispatch revoke-token`): a deny-list of `jti`s every gateway honours.

The list is a Redis ZSET `jti -> the token's expiry`, so entries can be dropped once
the token would be refused anyway. Each revocation bumps a version counter; gateways
poll it four times a second and reload the list only when it moved, so checking a
token on every command costs a set lookup, and open connections of a revoked token
are closed within a second.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from gateway.auth import AuthError
from ledger.connection import AnyRedis
from ledger.keys import Keys

log = logging.getLogger("gateway.revocations")


async def revoke_token(redis: AnyRedis, keys: Keys, jti: str, until_s: float) -> None:
    """Refuse the token with this `jti` until `until_s` (its expiry, Unix seconds)."""
    now = time.time()
    async with redis.pipeline(transaction=True) as pipe:
        pipe.zadd(keys.revoked_tokens(), {jti: until_s}, gt=True)  # adds, or extends
        pipe.zremrangebyscore(keys.revoked_tokens(), "-inf", f"({now}")
        pipe.incr(keys.revoked_version())
        await pipe.execute()


@dataclass
class Revocations:
    redis: AnyRedis
    keys: Keys
    version: Any = None
    jtis: frozenset[str] = field(default_factory=frozenset)

    def revoked(self, jti: str) -> bool:
        return jti in self.jtis

    async def poll(self) -> bool:
        """Reload the deny-list if anyone revoked a token; True when it changed."""
        version = await self.redis.get(self.keys.revoked_version())
        if version == self.version:
            return False
        # Read the version first: a revocation landing in between is in the list already
        # and makes the next poll reload once more, never the other way round.
        raw = await self.redis.zrangebyscore(self.keys.revoked_tokens(), f"({time.time()}", "+inf")
        self.jtis = frozenset(j.decode() if isinstance(j, bytes) else str(j) for j in raw)
        self.version = version
        return True

    async def check(self, jti: str) -> None:
        """Authoritative check at a handshake (one round trip): raise if revoked."""
        if (
            self.revoked(jti)
            or await self.redis.zscore(self.keys.revoked_tokens(), jti) is not None
        ):
            raise AuthError("token refused: it has been revoked")
