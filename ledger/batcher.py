"""Pipelining across concurrent callers: one Redis round trip serves many commands.

Every coroutine that needs Redis on the hot path calls `Batcher.call(...)`; one
flusher task sends whatever has accumulated as one non-transactional pipeline. When
idle a call costs one round trip; under load a round trip carries hundreds of calls,
which is what lets one gateway core keep up (see FACTS: ~11 µs per pipelined command
against ~40 µs per sequential round trip). With the single flusher, calls reach Redis
in the order they were made, which ledger/ordering.py relies on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from redis import exceptions as redis_errors

from ledger.connection import AnyRedis
from ledger.errors import LedgerUnavailable
from ledger.scripts import ALL, Script

log = logging.getLogger("ledger.batcher")

Args = tuple[Any, ...]
Call = tuple[Args, dict[str, Any]]


class Batcher:
    def __init__(
        self, redis: AnyRedis, *, max_batch: int = 512, flushers: int = 1, url: str = ""
    ) -> None:
        self._redis = redis
        self._max_batch = max_batch
        self._flushers = flushers
        self._url = url
        self._pending: list[tuple[Call, asyncio.Future[Any]]] = []
        self._wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.load_scripts()
        self._tasks = [
            asyncio.create_task(self._run(), name=f"ledger-batcher-{i}")
            for i in range(self._flushers)
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for _, fut in self._pending:
            if not fut.done():
                fut.set_exception(LedgerUnavailable("the ledger is shutting down"))
        self._pending.clear()

    async def load_scripts(self) -> None:
        try:
            # Not pipelined: on Redis Cluster SCRIPT LOAD must reach every primary.
            for script in ALL:
                await self._redis.script_load(script.source)
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
            raise LedgerUnavailable(
                f"loading ledger scripts: Redis at {self._url or 'the configured URL'} did "
                f"not answer ({exc}); start Redis or set DISPATCH_REDIS_URL"
            ) from exc

    def call(self, *args: Any, **options: Any) -> asyncio.Future[Any]:
        """Queue one Redis command; the future resolves with its reply or raises.

        `options` reach redis-py's reply parser (e.g. `get=True` for SET ... GET).
        """
        if not self._tasks:
            raise LedgerUnavailable("the ledger batcher is not running (call start() first)")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append(((args, options), fut))
        self._wakeup.set()
        return fut

    def script(
        self, script: Script, keys: Sequence[str], argv: Sequence[Any]
    ) -> asyncio.Future[Any]:
        return self.call("EVALSHA", script.sha, len(keys), *keys, *argv)

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            if not self._pending:
                self._wakeup.clear()
                continue
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            if not self._pending:
                self._wakeup.clear()
            await self._flush(batch)

    async def _flush(self, batch: list[tuple[Call, asyncio.Future[Any]]]) -> None:
        try:
            replies = await self._execute([call for call, _ in batch])
            if any(isinstance(r, redis_errors.NoScriptError) for r in replies):
                # Redis restarted and forgot the scripts: load them and retry those calls.
                await self.load_scripts()
                retry = [
                    i for i, r in enumerate(replies) if isinstance(r, redis_errors.NoScriptError)
                ]
                again = await self._execute([batch[i][0] for i in retry])
                for i, reply in zip(retry, again, strict=True):
                    replies[i] = reply
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
            failure = LedgerUnavailable(
                f"Redis at {self._url or 'the configured URL'} did not answer ({exc}); "
                "start Redis or set DISPATCH_REDIS_URL"
            )
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(failure)
            return
        except Exception as exc:  # anything else must still release every waiter
            log.exception("ledger.batch.failed")
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for (_, fut), reply in zip(batch, replies, strict=True):
            if fut.done():
                continue
            if isinstance(reply, Exception):
                fut.set_exception(reply)
            else:
                fut.set_result(reply)

    async def _execute(self, commands: list[Call]) -> list[Any]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for args, options in commands:
                pipe.execute_command(*args, **options)
            return list(await pipe.execute(raise_on_error=False))
