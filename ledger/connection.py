"""Redis clients for the ledger: one standalone server or a Redis Cluster.

Every transition is a single-slot script, so both work the same way; only readers that
follow many streams at once (one XREAD over several partitions) must read per
partition on a cluster, because a multi-key XREAD must stay within one hash slot.
"""

from __future__ import annotations

from typing import TypeAlias

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster

AnyRedis: TypeAlias = Redis | RedisCluster


def connect(url: str, *, cluster: bool = False, max_connections: int = 32) -> AnyRedis:
    """A client for `url`; bursts wait up to 10 s for a pooled connection instead of failing."""
    if cluster:
        return RedisCluster.from_url(url, max_connections=max_connections)
    pool = BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=10)
    return Redis(connection_pool=pool)


def is_cluster(client: AnyRedis) -> bool:
    return isinstance(client, RedisCluster)
