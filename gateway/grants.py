"""Per-edge permissions: the grants store (`dispatch grant`/`revoke`) plus token claims.

A grant's scope is one edge, `*` (every edge) or `group:NAME`, a site group whose
members `dispatch group add/remove` manage (fleet-level grants). Gateways cache each
user's grants and each group's members and poll one version counter four times a
second, so a change reaches every open connection within a second without a Redis
call per command.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import WatchError

from gateway.auth import User
from ledger.connection import AnyRedis
from ledger.keys import SAFE_ID, Keys

log = logging.getLogger("gateway.grants")

CAN_CONTROL = "can_control"
CAN_VIEW = "can_view"
PERMISSIONS = (CAN_CONTROL, CAN_VIEW)
ALL_EDGES = "*"
GROUP_PREFIX = "group:"


class GrantError(ValueError):
    """An unknown permission name or malformed grant."""


def check_permission(permission: str) -> str:
    if permission not in PERMISSIONS:
        raise GrantError(f"unknown permission {permission!r}; use one of {', '.join(PERMISSIONS)}")
    return permission


def check_scope(scope: str) -> str:
    """An edge id, `*`, or `group:NAME`."""
    name = scope.removeprefix(GROUP_PREFIX)
    if scope == ALL_EDGES or (SAFE_ID.fullmatch(name) and len(name) <= 64):
        return scope
    raise GrantError(
        f"{scope[:80]!r} is not an edge id, '*' or 'group:NAME' (letters, digits, '_', '.', '-')"
    )


def _permits(perms: frozenset[str], permission: str) -> bool:
    return permission in perms or (permission == CAN_VIEW and CAN_CONTROL in perms)


async def grant(redis: AnyRedis, keys: Keys, user: str, scope: str, permission: str) -> None:
    await _change(redis, keys, user, scope, permission, add=True)


async def revoke(redis: AnyRedis, keys: Keys, user: str, scope: str, permission: str) -> None:
    await _change(redis, keys, user, scope, permission, add=False)


async def _change(
    redis: AnyRedis, keys: Keys, user: str, scope: str, permission: str, *, add: bool
) -> None:
    """Add or remove one permission; optimistic (WATCH) so concurrent changes never clash."""
    check_permission(permission)
    check_scope(scope)
    key = keys.grants(user)
    async with redis.pipeline(transaction=True) as pipe:
        while True:
            try:
                await pipe.watch(key)
                perms = set(_split(await pipe.hget(key, scope)))
                perms = perms | {permission} if add else perms - {permission}
                pipe.multi()  # type: ignore[no-untyped-call]
                if perms:
                    pipe.hset(key, scope, ",".join(sorted(perms)))
                else:
                    pipe.hdel(key, scope)
                pipe.incr(keys.grants_version())
                await pipe.execute()
                return
            except WatchError:
                continue


async def change_group(
    redis: AnyRedis, keys: Keys, group: str, edges: list[str], *, add: bool
) -> None:
    """Add edges to (or remove them from) a site group; grants on it follow at once."""
    check_scope(GROUP_PREFIX + group)
    async with redis.pipeline(transaction=True) as pipe:
        if add:
            pipe.sadd(keys.group(group), *edges)
        else:
            pipe.srem(keys.group(group), *edges)
        pipe.incr(keys.grants_version())
        await pipe.execute()


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _split(raw: bytes | str | None) -> list[str]:
    if raw is None:
        return []
    return [p for p in _text(raw).split(",") if p]


@dataclass
class GrantCache:
    redis: AnyRedis
    keys: Keys
    version: Any = None
    users: dict[str, dict[str, frozenset[str]]] = field(default_factory=dict)
    groups: dict[str, frozenset[str]] = field(default_factory=dict)
    generation: int = 0  # bumped whenever the cache is dropped

    async def load(self, user_id: str) -> dict[str, frozenset[str]]:
        cached = self.users.get(user_id)
        if cached is not None:
            return cached
        generation = self.generation
        raw = await self.redis.hgetall(self.keys.grants(user_id))
        grants = {_text(k): frozenset(_split(v)) for k, v in raw.items()}
        if generation == self.generation:
            # Only cache what was read after the last drop: a read that raced a revocation
            # answers this one caller and is read again by the next.
            self.users[user_id] = grants
        return grants

    async def members(self, group: str) -> frozenset[str]:
        cached = self.groups.get(group)
        if cached is not None:
            return cached
        generation = self.generation
        edges = frozenset(_text(e) for e in await self.redis.smembers(self.keys.group(group)))
        if generation == self.generation:
            self.groups[group] = edges
        return edges

    async def poll(self) -> bool:
        """Drop cached grants if anyone changed them; True when they changed."""
        version = await self.redis.get(self.keys.grants_version())
        if version != self.version:
            self.version = version
            self.generation += 1
            self.users.clear()
            self.groups.clear()
            return True
        return False

    async def allows(self, user: User, edge_id: str, permission: str) -> str | None:
        """How `user` holds `permission` on `edge_id` (for the audit), or None."""
        claimed = user.control if permission == CAN_CONTROL else user.control | user.view
        if edge_id in claimed or ALL_EDGES in claimed:
            return f"token:{permission}"
        stored = await self.load(user.user_id)
        for scope in (edge_id, ALL_EDGES):
            if _permits(stored.get(scope, frozenset()), permission):
                return f"grant:{permission}:{scope}"
        for scope, perms in stored.items():
            if (
                scope.startswith(GROUP_PREFIX)
                and _permits(perms, permission)
                and edge_id in await self.members(scope.removeprefix(GROUP_PREFIX))
            ):
                return f"grant:{permission}:{scope}"
        return None

    async def visible_edges(self, user: User) -> frozenset[str] | None:
        """Edges `user` may view (claims, grants, groups); None means every edge."""
        claimed = user.view | user.control
        stored = {scope: perms for scope, perms in (await self.load(user.user_id)).items() if perms}
        if ALL_EDGES in claimed or ALL_EDGES in stored:
            return None
        edges = set(claimed)
        for scope in stored:
            if scope.startswith(GROUP_PREFIX):
                edges |= await self.members(scope.removeprefix(GROUP_PREFIX))
            else:
                edges.add(scope)
        return frozenset(edges)
