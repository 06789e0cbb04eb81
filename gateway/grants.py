"""Per-edge permissions: the grants store (`dispatch grant`/`revoke`) plus token claims.

Gateways cache each user's grants and poll one version counter once a second, so a
revocation reaches every open connection within a second without a Redis call per
command.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import WatchError

from gateway.auth import User
from ledger.keys import Keys

log = logging.getLogger("gateway.grants")

CAN_CONTROL = "can_control"
CAN_VIEW = "can_view"
PERMISSIONS = (CAN_CONTROL, CAN_VIEW)
ALL_EDGES = "*"


class GrantError(ValueError):
    """An unknown permission name or malformed grant."""


def check_permission(permission: str) -> str:
    if permission not in PERMISSIONS:
        raise GrantError(f"unknown permission {permission!r}; use one of {', '.join(PERMISSIONS)}")
    return permission


async def grant(redis: Redis, keys: Keys, user: str, edge: str, permission: str) -> None:
    await _change(redis, keys, user, edge, permission, add=True)


async def revoke(redis: Redis, keys: Keys, user: str, edge: str, permission: str) -> None:
    await _change(redis, keys, user, edge, permission, add=False)


async def _change(
    redis: Redis, keys: Keys, user: str, edge: str, permission: str, *, add: bool
) -> None:
    """Add or remove one permission; optimistic (WATCH) so concurrent changes never clash."""
    check_permission(permission)
    key = keys.grants(user)
    async with redis.pipeline(transaction=True) as pipe:
        while True:
            try:
                await pipe.watch(key)
                perms = set(_split(await pipe.hget(key, edge)))
                perms = perms | {permission} if add else perms - {permission}
                pipe.multi()  # type: ignore[no-untyped-call]
                if perms:
                    pipe.hset(key, edge, ",".join(sorted(perms)))
                else:
                    pipe.hdel(key, edge)
                pipe.incr(keys.grants_version())
                await pipe.execute()
                return
            except WatchError:
                continue


def _split(raw: bytes | str | None) -> list[str]:
    if raw is None:
        return []
    text = raw.decode() if isinstance(raw, bytes) else raw
    return [p for p in text.split(",") if p]


@dataclass
class GrantCache:
    redis: Redis
    keys: Keys
    version: Any = None
    users: dict[str, dict[str, frozenset[str]]] = field(default_factory=dict)
    generation: int = 0  # bumped whenever the cache is dropped

    async def load(self, user_id: str) -> dict[str, frozenset[str]]:
        cached = self.users.get(user_id)
        if cached is not None:
            return cached
        generation = self.generation
        raw = await self.redis.hgetall(self.keys.grants(user_id))
        grants = {
            (k.decode() if isinstance(k, bytes) else k): frozenset(_split(v))
            for k, v in raw.items()
        }
        if generation == self.generation:
            # Only cache what was read after the last drop: a read that raced a revocation
            # answers this one caller and is read again by the next.
            self.users[user_id] = grants
        return grants

    async def poll(self) -> bool:
        """Drop cached grants if anyone changed them; True when they changed."""
        version = await self.redis.get(self.keys.grants_version())
        if version != self.version:
            self.version = version
            self.generation += 1
            self.users.clear()
            return True
        return False

    async def run(self, interval_s: float = 0.25) -> None:
        while True:
            try:
                await self.poll()
            except Exception as exc:  # keep polling through Redis blips
                log.warning("gateway.grants.poll_failed error=%s", exc)
            await asyncio.sleep(interval_s)

    async def allows(self, user: User, edge_id: str, permission: str) -> str | None:
        """How `user` holds `permission` on `edge_id` (for the audit), or None."""
        claimed = user.control if permission == CAN_CONTROL else user.control | user.view
        if edge_id in claimed or ALL_EDGES in claimed:
            return f"token:{permission}"
        stored = await self.load(user.user_id)
        for scope in (edge_id, ALL_EDGES):
            perms = stored.get(scope, frozenset())
            if permission in perms or (permission == CAN_VIEW and CAN_CONTROL in perms):
                return f"grant:{permission}:{scope}"
        return None
