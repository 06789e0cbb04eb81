"""Redis clients for the ledger: one standalone server or a Redis Cluster.

Every transition is a single-slot script, so both work the same way; only readers that
follow many streams at once (one XREAD over several partitions) must read per
partition on a cluster, because a multi-key XREAD must stay within one hash slot.

The clients ride out a Redis restart: redis-py's asyncio client does not retry by
default, so after a restart every pooled connection would fail once. Retrying is safe
for the ledger: admission is idempotent per command id, transitions are
compare-and-set, and a delivery whose reply was lost is reclaimed.
"""

from __future__ import annotations

from typing import TypeAlias

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

AnyRedis: TypeAlias = Redis | RedisCluster
RETRIES = 6  # with the backoff below: about 2 s before a command gives up


def _retry() -> Retry:
    return Retry(ExponentialWithJitterBackoff(cap=0.5, base=0.05), RETRIES)


def connect(url: str, *, cluster: bool = False, max_connections: int = 32) -> AnyRedis:
    """A client for `url`; bursts wait up to 10 s for a pooled connection instead of failing."""
    if cluster:
        return RedisCluster.from_url(url, max_connections=max_connections, retry=_retry())
    pool = BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=10, retry=_retry()
    )
    return Redis(connection_pool=pool, retry=_retry())


def is_cluster(client: AnyRedis) -> bool:
    return isinstance(client, RedisCluster)
