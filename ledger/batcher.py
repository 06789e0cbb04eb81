"""Pipelining across concurrent callers: one Redis round trip serves many commands.

Every coroutine that needs Redis on the hot path calls `Batcher.call(...)` or
`Batcher.script(...)`; a flusher task per lane sends whatever has accumulated as one
non-transactional pipeline. When idle a call costs one round trip; under load a round
trip carries hundreds of calls, which is what lets one gateway core keep up (see FACTS:
~11 µs per pipelined command against ~40 µs per sequential round trip). Scripts go to
the lane of their hash slot, so transitions of one partition reach Redis in the order
they were made, which ledger/ordering.py relies on. More lanes overlap pipelines where
Redis latency dominates; on two cores one lane measured faster (the gateway is
CPU-bound there), so one is the default.

On a single server each lane keeps one connection and writes its batch to it directly:
redis-py's pipeline object (a pool checkout, per-call bookkeeping, observability hooks)
cost ~0.08 ms of every round trip here, 0.15 against 0.07 ms for two scripts. Replies
are still parsed by the client's own callbacks, and a lost connection is retried with
the client's retry policy, as its pipeline would (scripts are idempotent by request id).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from ledger.connection import AnyRedis
from ledger.errors import LedgerUnavailable
from ledger.scripts import ALL, Script
from ledger.tasks import cancel_and_wait

log = logging.getLogger("ledger.batcher")
_CALLER_STEPS = 2  # see `Batcher.answered`

Args = tuple[Any, ...]
Call = tuple[Args, dict[str, Any]]


class _Lane:
    """One flusher: its calls reach Redis in the order they were made."""

    def __init__(self) -> None:
        self.pending: list[tuple[Call, asyncio.Future[Any]]] = []
        self.wakeup = asyncio.Event()
        self.flushing: asyncio.Future[None] | None = None  # done once its replies are out
        self.conn: Any = None  # its own connection (single server), taken on first use


class Batcher:
    def __init__(
        self, redis: AnyRedis, *, max_batch: int = 512, lanes: int = 1, url: str = ""
    ) -> None:
        self._redis = redis
        self._max_batch = max_batch
        self._lanes = [_Lane() for _ in range(lanes)]
        self._url = url
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.load_scripts()
        self._tasks = [
            asyncio.create_task(self._run(lane), name=f"ledger-batcher-{i}")
            for i, lane in enumerate(self._lanes)
        ]

    async def close(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks = []
        for lane in self._lanes:
            if lane.conn is not None:
                conn, lane.conn = lane.conn, None
                await conn.disconnect()
                await self._redis.connection_pool.release(conn)  # type: ignore[union-attr]
            for _, fut in lane.pending:
                if not fut.done():
                    fut.set_exception(LedgerUnavailable("the ledger is shutting down"))
            lane.pending.clear()

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
        """Queue one Redis command whose order against others does not matter.

        `options` reach redis-py's reply parser (e.g. `get=True` for SET ... GET).
        """
        return self._enqueue(min(self._lanes, key=lambda lane: len(lane.pending)), args, options)

    def script(
        self, script: Script, keys: Sequence[str], argv: Sequence[Any]
    ) -> asyncio.Future[Any]:
        """Queue a ledger script; scripts on the same hash slot run in call order.

        Every key of a transition shares its partition's slot, so a partition's
        transitions stay in order while other partitions' pipelines overlap with them.
        """
        lane = self._lanes[key_slot(keys[0].encode()) % len(self._lanes)]
        return self._enqueue(lane, ("EVALSHA", script.sha, len(keys), *keys, *argv), {})

    def _enqueue(self, lane: _Lane, args: Args, options: dict[str, Any]) -> asyncio.Future[Any]:
        if not self._tasks:
            raise LedgerUnavailable("the ledger batcher is not running (call start() first)")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        lane.pending.append(((args, options), fut))
        lane.wakeup.set()
        return fut

    async def _run(self, lane: _Lane) -> None:
        while True:
            await lane.wakeup.wait()
            if not lane.pending:
                lane.wakeup.clear()
                continue
            batch = lane.pending[: self._max_batch]
            del lane.pending[: self._max_batch]
            if not lane.pending:
                lane.wakeup.clear()
            # A caller that stopped waiting (its frame was answered `unavailable` after
            # the wait) must not have its call run later behind its back: drop it.
            batch = [item for item in batch if not item[1].done()]
            if batch:
                lane.flushing = asyncio.get_running_loop().create_future()
                try:
                    await self._flush(batch, lane)
                finally:
                    lane.flushing.set_result(None)
                    lane.flushing = None

    async def answered(self, timeout_s: float = 0.1) -> None:
        """Until the pipelines out now have answered their callers (at once if none is),
        at most `timeout_s` (Redis may be slow to answer, or not at all), and the callers
        have taken two steps on their answers.

        A pipeline whose reply was read in the same loop turn as the caller's own wake-up
        may have answered already, with its callers' steps queued behind this caller: a
        done callback (one step), or a task that resumes and then schedules its next
        step with `call_soon` (two). The two yields let those run first.
        """
        flushes = [lane.flushing for lane in self._lanes if lane.flushing is not None]
        if flushes:
            await asyncio.wait(flushes, timeout=timeout_s)
        for _ in range(_CALLER_STEPS):
            await asyncio.sleep(0)

    async def _flush(self, batch: list[tuple[Call, asyncio.Future[Any]]], lane: _Lane) -> None:
        try:
            replies = await self._execute([call for call, _ in batch], lane)
            if any(isinstance(r, redis_errors.NoScriptError) for r in replies):
                # Redis restarted and forgot the scripts: load them and retry those calls.
                await self.load_scripts()
                retry = [
                    i for i, r in enumerate(replies) if isinstance(r, redis_errors.NoScriptError)
                ]
                again = await self._execute([batch[i][0] for i in retry], lane)
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

    async def _execute(self, commands: list[Call], lane: _Lane) -> list[Any]:
        """The replies of `commands`, in order (a Redis error reply as its exception)."""
        redis = self._redis
        if isinstance(redis, RedisCluster):  # each command to its node: the client's pipeline
            async with redis.pipeline(transaction=False) as pipe:
                for args, options in commands:
                    pipe.execute_command(*args, **options)
                return list(await pipe.execute(raise_on_error=False))
        conn = lane.conn
        if conn is None:
            pool: Any = redis.connection_pool
            conn = lane.conn = await pool.get_connection()
        try:
            return list(
                await conn.retry.call_with_retry(
                    lambda: self._exchange(redis, conn, commands),
                    lambda _error: conn.disconnect(),
                )
            )
        except BaseException:
            # Out of retries or cancelled mid-exchange: replies may still be on their
            # way; the next batch starts on a fresh connection instead of reading them.
            await conn.disconnect(nowait=True)
            raise

    @staticmethod
    async def _exchange(redis: Redis, conn: Any, commands: list[Call]) -> list[Any]:
        await conn.send_packed_command(conn.pack_commands([args for args, _ in commands]))
        replies: list[Any] = []
        for args, options in commands:
            try:
                replies.append(await redis.parse_response(conn, args[0], **options))
            except redis_errors.ResponseError as exc:
                replies.append(exc)
        return replies
