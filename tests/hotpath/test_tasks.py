"""Stopping tasks whose cancellation something swallowed (ledger/tasks.py)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import Any

import pytest

from ledger.connection import close, connect
from ledger.tasks import cancel_and_wait, run_together

from support import REDIS_URL


async def test_a_task_that_swallows_its_cancellation_is_cancelled_again() -> None:
    """As a batcher lane did inside redis-py's `get_connection()`: it came out as if not
    cancelled and went on to wait for work that never came."""
    never = asyncio.Event()
    swallowed: list[int] = []

    async def lane() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            swallowed.append(1)  # the library's doing, not ours
        await never.wait()

    async def failing() -> None:
        raise RuntimeError("already failed")

    tasks = [asyncio.create_task(lane()), asyncio.create_task(failing())]
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait(tasks, again_after_s=0.05), 5)
    assert swallowed == [1]
    assert tasks[0].cancelled()
    assert isinstance(tasks[1].exception(), RuntimeError)


async def test_python_3_11_wait_for_returns_instead_of_raising_when_cancelled_as_it_ends() -> None:
    """The cause, pinned: on Python 3.11 `asyncio.wait_for` whose awaitable finishes in
    the loop pass its caller is cancelled returns the result and drops the cancellation
    (python/cpython#86296; 3.12 rebuilt `wait_for` on `asyncio.timeout`). redis-py 8.1
    wraps every socket write in it when `socket_timeout` is set, as `ledger.connection`
    sets it."""
    loop = asyncio.get_running_loop()
    inner: asyncio.Future[str] = loop.create_future()

    async def caller() -> str:
        return await asyncio.wait_for(inner, 10)

    task = asyncio.create_task(caller())
    for _ in range(3):
        await asyncio.sleep(0)  # the caller now waits inside wait_for
    inner.set_result("written")
    task.cancel()
    if sys.version_info < (3, 12):
        assert await task == "written"
        assert task.cancelling() == 1  # asked to stop, yet it returned
    else:
        with pytest.raises(asyncio.CancelledError):
            await task


async def _lane(redis: Any, came_out: list[int], never: asyncio.Event) -> None:
    """As a batcher lane: a pooled connection, then a wait for work."""
    pool = redis.connection_pool
    connection = await pool.get_connection()
    task = asyncio.current_task()
    came_out.append(task.cancelling() if task is not None else 0)
    await pool.release(connection)
    await never.wait()


async def test_tasks_cancelled_while_redis_py_connects_all_end() -> None:
    """The real path: tasks taking a connection from a fresh pool of `ledger.connection`'s
    client, cancelled at every loop pass of the handshake. On Python 3.11 some of them come
    out of `get_connection()` as if not cancelled and wait for good; `cancel_and_wait`
    still ends every one."""
    came_out: list[int] = []  # each lane's `cancelling()` on leaving get_connection()
    for passes in range(60):
        redis = connect(REDIS_URL)
        task = asyncio.create_task(_lane(redis, came_out, asyncio.Event()))
        for _ in range(passes):
            await asyncio.sleep(0)
        await asyncio.wait_for(cancel_and_wait([task], again_after_s=0.02), 5)
        assert task.done()
        await close(redis)
    if sys.version_info < (3, 12):
        assert 1 in came_out, "no cancellation was swallowed: the test no longer reaches it"


async def _swallows_once(stopped: list[str], never: asyncio.Event) -> None:
    with contextlib.suppress(asyncio.CancelledError):  # as 3.11's wait_for may, in redis-py
        await asyncio.sleep(3600)
    try:
        await never.wait()
    finally:
        stopped.append("swallower")


async def test_run_together_raises_the_first_failure_and_stops_the_others() -> None:
    """As the projector's lanes and loops: one failed lane restarts them all."""
    stopped: list[str] = []

    async def fails() -> None:
        await asyncio.sleep(0.01)
        raise RuntimeError("lane lost its connection")

    with pytest.raises(RuntimeError, match="lane lost"):
        await asyncio.wait_for(run_together(_swallows_once(stopped, asyncio.Event()), fails()), 5)
    assert stopped == ["swallower"]


async def test_run_together_cancelled_stops_every_task() -> None:
    """Cancelled again while it stops its tasks (as `cancel_and_wait` does to whatever is
    still running), it still stops them before it ends."""
    stopped: list[str] = []
    runner = asyncio.create_task(run_together(_swallows_once(stopped, asyncio.Event())))
    await asyncio.sleep(0.01)
    await asyncio.wait_for(cancel_and_wait([runner]), 5)
    assert runner.cancelled()
    assert stopped == ["swallower"]
