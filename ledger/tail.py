"""Follow many streams with one blocking connection: the gateway's only reader.

One XREAD BLOCK covers every partition's lifecycle log and wake stream, so a gateway
needs one Redis connection for all its dashboards and edges, whatever their number.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from redis import exceptions as redis_errors

from ledger.connection import AnyRedis

log = logging.getLogger("ledger.tail")

Entry = tuple[str, bytes, dict[bytes, bytes]]  # stream, entry id, fields


class StreamTail:
    def __init__(
        self, redis: AnyRedis, streams: Sequence[str], *, block_ms: int = 1000, count: int = 1000
    ) -> None:
        self._redis = redis
        self._streams = list(streams)
        self._block_ms = block_ms
        self._count = count
        self._positions: dict[Any, Any] = {}
        # When XREAD last answered (an empty answer too: BLOCK returns every `block_ms`).
        self.last_read = time.monotonic()

    async def start_at_end(self) -> None:
        """Resolve `$` to concrete ids so nothing appended between reads is skipped."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for stream in self._streams:
                pipe.xrevrange(stream, "+", "-", count=1)
            tops = await pipe.execute()
        for stream, top in zip(self._streams, tops, strict=True):
            self._positions[stream] = top[0][0] if top else "0-0"

    async def __aiter__(self) -> AsyncIterator[list[Entry]]:
        if not self._positions:
            await self.start_at_end()
        while True:
            try:
                reply: Any = await self._redis.xread(
                    self._positions, count=self._count, block=self._block_ms
                )
            except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
                log.warning("ledger.tail.reconnecting error=%s", exc)
                await asyncio.sleep(0.5)
                continue
            except Exception:  # e.g. a stream key overwritten with another type: keep trying
                log.exception("ledger.tail.failed streams=%d", len(self._streams))
                await asyncio.sleep(0.5)
                continue
            self.last_read = time.monotonic()
            batch: list[Entry] = []
            for stream_raw, entries in reply or []:
                stream = stream_raw.decode() if isinstance(stream_raw, bytes) else stream_raw
                for entry_id, fields in entries:
                    batch.append((stream, entry_id, fields))
                if entries:
                    self._positions[stream] = entries[-1][0]
            if batch:
                yield batch
