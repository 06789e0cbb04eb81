"""Stopping tasks whose cancellation something swallowed (ledger/tasks.py)."""

from __future__ import annotations

import asyncio

from ledger.tasks import cancel_and_wait


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
