"""One projector process writes over several connections (lanes), each with its share of
the held partitions: every event still stored once, and one lane's failure restarts all."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from projection_support import log_ids, pg, running, scalar, wait_caught_up
from psycopg import AsyncConnection
from test_projection_resume import stored_ids

from config.settings import Settings
from ledger.store import Ledger
from projections import loadgen
from projections.verify import verify
from projections.worker import Projector

FLEET = tuple(loadgen.edges(100))  # edges in every partition


async def backends(conn: AsyncConnection, settings: Settings, owner: str) -> set[int]:
    cur = await conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
        (f"dispatch-projector:{settings.namespace}:{owner}",),
    )
    return {int(pid) for (pid,) in await cur.fetchall()}


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


async def test_one_process_projects_every_partition_over_two_connections(
    ledger: Ledger, settings: Settings
) -> None:
    await loadgen.generate(ledger, range(800), edge_ids=FLEET)
    expected = await log_ids(ledger.redis, ledger.keys)
    assert len({s for s, _ in expected}) >= 2  # both lanes have streams to write
    conn = await pg(settings)
    try:
        async with running(ledger, settings, lanes=2) as [projector]:
            await until(
                lambda: _connected(conn, settings, projector.owner),
                "the projector did not open one connection per lane",
            )
            await wait_caught_up(settings, ledger.redis, ledger.keys)
            assert len(await backends(conn, settings, projector.owner)) == 2
            # Each held stream is written by exactly one lane.
            shares = [set(projector._streams(lane, 2)) for lane in range(2)]
            assert shares[0] and shares[1] and not shares[0] & shares[1]
            assert shares[0] | shares[1] == set(projector._streams())
        final = await stored_ids(settings)
        assert len(final) == len(expected) and set(final) == expected
        result = await verify(conn, settings.namespace, commands=True)
        assert result.ok and result.commands == 800, result.breaks
    finally:
        await conn.close()


async def test_a_lane_whose_connection_dies_restarts_every_lane_and_loses_nothing(
    ledger: Ledger, settings: Settings
) -> None:
    await loadgen.generate(ledger, range(3000), edge_ids=FLEET)
    expected = await log_ids(ledger.redis, ledger.keys)
    conn = await pg(settings)
    try:
        async with running(ledger, settings, lanes=2, batch=100) as [projector]:
            owner = projector.owner
            await until(lambda: _connected(conn, settings, owner), "lanes not connected")
            before = await backends(conn, settings, owner)
            await until(lambda: _stored_some(projector), "nothing projected")
            victim = min(before)
            assert await scalar(conn, "SELECT pg_terminate_backend(%s)", victim)

            async def replaced() -> bool:
                now = await backends(conn, settings, owner)
                return len(now) == 2 and not now & before

            # The surviving lane is stopped and reconnected with the failed one: a lane
            # left running alone would leave the other's partitions unprojected.
            await until(replaced, "the lanes were not all reconnected after one failed")
            await wait_caught_up(settings, ledger.redis, ledger.keys, timeout_s=90)
        final = await stored_ids(settings)
        assert len(final) == len(set(final)) == len(expected)
        assert set(final) == expected
        result = await verify(conn, settings.namespace, commands=True)
        assert result.ok and result.commands == 3000, result.breaks
    finally:
        await conn.close()


async def _connected(conn: AsyncConnection, settings: Settings, owner: str) -> bool:
    """One backend per lane (two lanes)."""
    return len(await backends(conn, settings, owner)) == 2


async def _stored_some(projector: Projector) -> bool:
    return projector.projected > 0
