"""Redis clients for the ledger's processes: they ride out a Redis restart.

redis-py's asyncio client does not retry by default, so after a restart every pooled
connection fails once. These clients reconnect and retry connection errors a few times
with backoff. Retrying is safe for the ledger: admission is idempotent per command id,
transitions are compare-and-set, and a delivery whose reply was lost is reclaimed.
"""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

RETRIES = 6  # with the backoff below: about 2 s before a command gives up


def connect(url: str, *, max_connections: int | None = None) -> Redis:
    return Redis.from_url(
        url,
        max_connections=max_connections,
        retry=Retry(ExponentialWithJitterBackoff(cap=0.5, base=0.05), RETRIES),
    )
