"""Share the partitions among projector processes with Redis leases.

Each live process announces itself in a heartbeat set and holds at most its fair share
(ceil(partitions / live processes)) of per-partition leases. A lease expires if its
holder stops renewing it, and another process picks the partition up where the stored
position says. Correctness never rests on the lease alone: a position check in
PostgreSQL refuses a writer whose lease lapsed.
"""

from __future__ import annotations

import logging
import math
import time

from redis.asyncio import Redis

from ledger.keys import Keys

log = logging.getLogger("projections.leases")

RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Leases:
    def __init__(self, redis: Redis, keys: Keys, owner: str, *, ttl_ms: int = 10_000) -> None:
        self.redis = redis
        self.keys = keys
        self.owner = owner
        self.ttl_ms = ttl_ms
        self.held: set[int] = set()
        self._renew = redis.register_script(RENEW)
        self._release = redis.register_script(RELEASE)

    def _lease(self, partition: int) -> str:
        return self.keys.projector_lease(partition)

    def _members(self) -> str:
        return self.keys.projectors()

    async def rebalance(self) -> set[int]:
        """Renew held leases, take free ones up to the fair share, shed any excess."""
        now_ms = int(time.time() * 1000)
        members = self._members()
        await self.redis.zadd(members, {self.owner: now_ms})
        await self.redis.zremrangebyscore(members, "-inf", now_ms - self.ttl_ms)
        live = max(1, int(await self.redis.zcard(members)))
        share = math.ceil(self.keys.partitions / live)
        for p in sorted(self.held):
            if not await self._renew(keys=[self._lease(p)], args=[self.owner, self.ttl_ms]):
                log.warning("projector.lease.lost partition=%d", p)
                self.held.discard(p)
        while len(self.held) > share:
            p = max(self.held)
            await self._release(keys=[self._lease(p)], args=[self.owner])
            self.held.discard(p)
            log.info("projector.lease.released partition=%d share=%d", p, share)
        for p in self.keys.all_partitions():
            if len(self.held) >= share:
                break
            if p in self.held:
                continue
            if await self.redis.set(self._lease(p), self.owner, nx=True, px=self.ttl_ms):
                self.held.add(p)
                log.info("projector.lease.taken partition=%d share=%d", p, share)
        return set(self.held)

    async def release_all(self) -> None:
        for p in list(self.held):
            await self._release(keys=[self._lease(p)], args=[self.owner])
        self.held.clear()
        await self.redis.zrem(self._members(), self.owner)
