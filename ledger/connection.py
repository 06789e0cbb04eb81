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
# A reply lost on a link that stays open (black hole, dead NAT entry) would otherwise be
# awaited forever, and with it every call behind it in the batcher's pipeline. Set here,
# not left to the client's default; above the tail's XREAD BLOCK of 1 s.
SOCKET_TIMEOUT_S = 5.0


def _retry() -> Retry:
    return Retry(ExponentialWithJitterBackoff(cap=0.5, base=0.05), RETRIES)


def connect(url: str, *, cluster: bool = False, max_connections: int = 32) -> AnyRedis:
    """A client for `url`; bursts wait up to 10 s for a pooled connection instead of failing."""
    if cluster:
        return RedisCluster.from_url(
            url, max_connections=max_connections, retry=_retry(), socket_timeout=SOCKET_TIMEOUT_S
        )
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=10,
        retry=_retry(),
        socket_timeout=SOCKET_TIMEOUT_S,
    )
    return Redis(connection_pool=pool, retry=_retry())


def is_cluster(client: AnyRedis) -> bool:
    return isinstance(client, RedisCluster)
