"""Stopping tasks when a library may swallow their cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterable
from typing import Any

AGAIN_AFTER_S = 0.5


async def cancel_and_wait(
    tasks: Iterable[asyncio.Task[Any]], *, again_after_s: float = AGAIN_AFTER_S
) -> None:
    """Cancel `tasks` and return once every one has ended, cancelling again any task
    still running after `again_after_s`.

    A gateway stopped right after it started (its port taken) hung for good, one run in
    ten: a batcher lane cancelled inside redis-py's `pool.get_connection()` came out of
    it as if not cancelled (`Task.cancelling()` still 1), went on to its next wait and
    was never woken. The cause: with `socket_timeout` set, redis-py 8.1 wraps each socket
    write (the connection's handshake too) in `asyncio.wait_for`, which on Python 3.11
    returns instead of raising when cancelled in the loop pass its write ends
    (python/cpython#86296, gone in 3.12; tests/hotpath/test_tasks.py pins both). Any
    Redis call can do it, so every long-lived task is stopped through here. Its
    exceptions are retrieved here, as `gather` would.
    """
    pending = {task for task in tasks if not task.done()}
    every = set(pending)
    interrupted = False
    while pending:
        for task in pending:
            task.cancel()
        try:
            _, pending = await asyncio.wait(pending, timeout=again_after_s)
        except asyncio.CancelledError:
            # Cancelled itself (as a task stopped this way is, again and again): stop
            # the tasks first, or they would outlive it.
            interrupted = True
            pending = {task for task in pending if not task.done()}
    for task in every:
        if not task.cancelled():
            task.exception()  # retrieved: the caller stops them, it does not report them
    if interrupted:
        raise asyncio.CancelledError


async def run_together(*coros: Coroutine[Any, Any, Any]) -> None:
    """Run `coros` as tasks until the first one fails or this is cancelled; then stop the
    others with `cancel_and_wait` and raise the failure (`gather` would leave them
    running, or wait for one that swallowed its cancellation)."""
    tasks = [asyncio.create_task(coro) for coro in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()
    finally:
        await cancel_and_wait(tasks)
