"""The batcher writes each lane's batch straight to a connection of its own
(ledger/batcher.py): replies parsed as the client parses them, one caller's error
reply for that caller only, and a connection Redis dropped replaced on the next batch."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from ledger.batcher import Batcher
from ledger.connection import close, connect

URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
async def batcher() -> object:
    redis = connect(URL)
    b = Batcher(redis, url=URL)
    await b.start()
    yield b
    await b.close()
    await close(redis)


async def test_one_batch_answers_each_caller_with_its_own_reply(batcher: Batcher) -> None:
    key = f"test-batcher:{uuid.uuid4().hex}"
    calls = [
        batcher.call("SET", key, "x"),
        batcher.call("INCR", key),  # an error reply: for this caller only
        batcher.call("HSET", key + "h", "a", "1"),
        batcher.call("HGETALL", key + "h"),
        batcher.call("SET", key, "y", "GET", get=True),
    ]
    set_, incr, hset, hgetall, getset = await asyncio.gather(*calls, return_exceptions=True)
    assert set_ is True  # the client's reply callbacks still apply
    assert isinstance(incr, redis_errors.ResponseError)
    assert (hset, hgetall, getset) == (1, {b"a": b"1"}, b"x")
    await batcher.call("DEL", key, key + "h")


async def test_a_dropped_connection_is_replaced(batcher: Batcher) -> None:
    first = await batcher.call("CLIENT", "ID")
    admin = Redis.from_url(URL)
    try:
        assert await admin.client_kill_filter(_id=first) == 1
    finally:
        await admin.aclose()
    # The lane's next write fails on the dead socket; it reconnects and sends again.
    assert await batcher.call("PING") is True
    assert await batcher.call("CLIENT", "ID") != first


async def test_answered_lets_callers_act_on_their_replies_first(batcher: Batcher) -> None:
    """The gateway's log tail awaits `answered()` before it sends what it read, so that
    replies pass on their own events first and the tail skips them (gateway/direct.py).

    The race: the tail's XREAD reply and a pipeline's reply are read in the same loop
    turn, the tail's step queued first. The pipeline has answered by the time the tail
    runs, and its callers' steps are queued behind the tail's: an ack's done callback,
    an admission's task step and the `call_soon` it makes. They must still go first.
    """
    order: list[str] = []
    loop = asyncio.get_running_loop()
    admission = batcher.call("PING")
    ack = batcher.call("PING")
    tailing: list[asyncio.Future[None]] = []

    async def tail() -> None:
        await batcher.answered()
        order.append("tail")

    def tail_wakes_first(_: object) -> None:
        # Registered first, this runs before either caller's step: the tail's step as
        # it runs in the race, the rest of it left to a task.
        coro = tail()
        try:
            coro.send(None)
        except StopIteration:
            return
        tailing.append(asyncio.ensure_future(coro))

    admission.add_done_callback(tail_wakes_first)

    async def admit() -> None:
        await admission
        loop.call_soon(order.append, "admission")

    ack.add_done_callback(lambda _: order.append("ack"))
    await asyncio.create_task(admit())
    await asyncio.gather(*tailing)
    assert order == ["ack", "admission", "tail"]
