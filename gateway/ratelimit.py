"""Commands per second per user, per edge and for the whole deployment.

One atomic Lua script (GCRA, `ledger/lua/ratelimit.lua`) checks every scope that
applies and charges all of them or none, on the Redis server's clock, so every gateway
shares the same budget. The call goes through the ledger's batcher: concurrent
commands share one round trip, and the enrollment check runs in the same pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

from ledger import scripts
from ledger.batcher import Batcher
from ledger.keys import Keys

USER, EDGE, GLOBAL = "user", "edge", "global"


@dataclass(frozen=True, slots=True)
class Rate:
    per_s: float
    burst: int

    @property
    def enabled(self) -> bool:
        return self.per_s > 0

    @property
    def interval_ms(self) -> float:
        return 1000.0 / self.per_s

    def describe(self, scope: str) -> str:
        """e.g. `user:10/s burst 20`, the `limit` of a `rate_limited` error."""
        return f"{scope}:{self.per_s:g}/s burst {self.burst}"


@dataclass(frozen=True, slots=True)
class RateDecision:
    """The rate limiter's answer to one charge (a timeout verdict is another thing)."""

    allowed: bool
    scope: str = ""
    limit: str = ""
    retry_after_s: float = 0.0


ALLOWED = RateDecision(True)


@dataclass(frozen=True, slots=True)
class RateLimits:
    user: Rate
    edge: Rate
    global_: Rate


class RateLimiter:
    def __init__(self, batcher: Batcher, keys: Keys, limits: RateLimits) -> None:
        self.batcher = batcher
        self.keys = keys
        self.limits = limits

    def _scopes(self, user_id: str, edge_id: str | None) -> list[tuple[str, str, Rate]]:
        wanted = [
            (USER, user_id, self.limits.user),
            (EDGE, edge_id, self.limits.edge),
            (GLOBAL, "all", self.limits.global_),
        ]
        return [(scope, who, rate) for scope, who, rate in wanted if who and rate.enabled]

    async def check(self, user_id: str, edge_id: str | None) -> RateDecision:
        """Charge one command to the user, the edge (when given) and the global budget."""
        scopes = self._scopes(user_id, edge_id)
        if not scopes:
            return ALLOWED
        keys = [self.keys.ratelimit(scope, who) for scope, who, _ in scopes]
        argv: list[str] = []
        for _, _, rate in scopes:
            argv += [repr(rate.interval_ms), str(rate.burst)]
        refused, wait_ms = await self.batcher.script(scripts.RATELIMIT, keys, argv)
        index = int(refused)
        if index == 0:
            return ALLOWED
        scope, _, rate = scopes[index - 1]
        return RateDecision(
            False,
            scope=scope,
            limit=rate.describe(scope),
            retry_after_s=round(float(wait_ms) / 1000, 3),
        )
