"""Concurrency per connection without reordering its commands.

A dashboard or edge connection may have many frames in flight: their checks (rate
limits, grants, the command-id claim) run concurrently, but each frame's ledger write
waits for its `Turn`, which opens once every earlier frame of that connection has
*enqueued* its write (or finished). The batcher sends the scripts of one hash slot
(one partition, hence one edge) in the order they were made, so each edge's writes
reach Redis in arrival order: setpoint A then B for the same channel can never be
admitted as B then A.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("ledger.ordering")


class Turn:
    """One frame's place in its connection's order."""

    def __init__(self, previous: asyncio.Future[None] | None) -> None:
        self._previous = previous
        self._passed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def wait(self) -> None:
        """Until every earlier frame has enqueued its write (or gave up)."""
        if self._previous is not None and not self._previous.done():
            await asyncio.shield(self._previous)

    def passed(self) -> None:
        """This frame's write is enqueued (or it will write nothing): let the next one go."""
        if not self._passed.done():
            self._passed.set_result(None)


class InOrder:
    """Runs each frame's handler as a task; at most `limit` frames in flight.

    Handlers answer their frame themselves, failures included. Should one raise
    anyway, `on_failure` answers for it: a frame is never dropped in silence.
    """

    def __init__(self, on_failure: Callable[[Exception], None], limit: int = 64) -> None:
        self._on_failure = on_failure
        self._limit = limit
        self._tasks: collections.deque[asyncio.Task[None]] = collections.deque()
        self._last: asyncio.Future[None] | None = None

    async def run(self, handler: Callable[[Turn], Awaitable[None]]) -> None:
        while len(self._tasks) >= self._limit:
            oldest = self._tasks.popleft()
            await asyncio.wait({oldest})
        turn = Turn(self._last)
        self._last = turn._passed
        self._tasks.append(asyncio.create_task(self._guarded(handler, turn)))
        while self._tasks and self._tasks[0].done():
            self._tasks.popleft()

    async def _guarded(self, handler: Callable[[Turn], Awaitable[None]], turn: Turn) -> None:
        try:
            await handler(turn)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("ledger.ordering.handler_failed")
            self._on_failure(exc)
        finally:
            turn.passed()

    async def drain(self) -> None:
        """Wait for the frames still in flight (e.g. before closing the connection)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks))
        self._tasks.clear()

    def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()
