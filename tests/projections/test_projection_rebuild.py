"""`dispatch projector --rebuild`: fresh tables from the retained log equal the incremental ones."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from projection_support import pg, roles, running, scalar, streams, wait_caught_up

from config.settings import Settings
from ledger.ids import new_event_id
from ledger.store import Ledger
from projections import loadgen, rebuild
from projections.verify import verify
from projections.worker import Database
from schemas.errors import ErrorCode, error
from schemas.events import Rejected

from support import Processes


async def refuse(ledger: Ledger, count: int) -> None:
    for i in range(count):
        await ledger.record_rejection(
            Rejected(
                event_id=new_event_id(),
                at=int(datetime.now(UTC).timestamp() * 1000),
                command_id="",
                edge_id="",
                actor=f"anonymous@127.0.0.1:{40000 + i}",
                error=error(ErrorCode.MALFORMED_JSON, "not valid JSON"),
                stage="gateway",
            )
        )


async def test_rebuild_of_a_namespace_with_empty_partitions_is_identical(
    ledger: Ledger, settings: Settings
) -> None:
    # One edge: one partition log has entries, the others and the refusals stream have none.
    plans = await loadgen.generate(ledger, range(12), edge_ids=["edge_00"], offline=0)
    async with running(ledger, settings):
        await wait_caught_up(settings, ledger.redis, ledger.keys)
        conn = await pg(settings)
        try:
            # The live projector keeps a `0-0` position for each stream it found empty. It
            # stores them when it first finds each stream quiet, which can come after the
            # busy stream is caught up: wait for every stream's row, not for a time.
            deadline = time.monotonic() + 30
            empty = len(streams(ledger.keys)) - 1
            while time.monotonic() < deadline:
                stored = await scalar(
                    conn, "SELECT count(*) FROM {s}.positions WHERE entry_id = '0-0'",
                    schema=settings.namespace,
                )  # fmt: skip
                if stored == empty:
                    break
                await asyncio.sleep(0.05)
            assert stored == empty
        finally:
            await conn.close()
    report = await rebuild.rebuild(ledger, Database(settings.database_url, roles(settings)))
    conn = await pg(settings)
    try:
        comparison = await rebuild.compare(conn, settings.namespace, report.schema)
        assert comparison.equal, comparison
        assert comparison.rows["commands"] == len(plans)
        assert comparison.rows["positions"] == 1
    finally:
        await conn.close()


@pytest.mark.slow
async def test_rebuild_equals_incremental_projection(
    ledger: Ledger, settings: Settings, processes: Processes
) -> None:
    # Incremental: small odd batches so commands' events straddle transactions, and the
    # log keeps growing while the projector works.
    async with running(ledger, settings, batch=97):
        await loadgen.generate(ledger, range(800))
        await refuse(ledger, 7)
        await loadgen.generate(ledger, range(800, 1600))
        await wait_caught_up(settings, ledger.redis, ledger.keys)

    proc = processes.dispatch("rebuild", "projector", "--rebuild", "--batch", "1000")
    assert proc.popen.wait(120) == 0, proc.log()
    out = proc.log()
    assert "identical to the live tables" in out, out
    target = rebuild.rebuild_schema(settings.namespace)

    conn = await pg(settings)
    try:
        comparison = await rebuild.compare(conn, settings.namespace, target)
        assert comparison.equal, comparison
        assert comparison.rows["commands"] == 1600
        assert comparison.rows["events"] == await scalar(
            conn, "SELECT count(*) FROM {s}.events", schema=settings.namespace
        )
        # Same chain, link by link (hashes included in the comparison above); and sound.
        assert await scalar(conn, "SELECT count(*) FROM {s}.chains", schema=target) == 9
        result = await verify(conn, target, commands=True)
        assert result.ok and result.commands == 1600, result.breaks
        # The rebuilt tables carry the same protection as the live ones.
        owner = await scalar(
            conn,
            "SELECT tableowner FROM pg_tables WHERE schemaname = %s AND tablename = 'events'",
            target,
        )
        assert owner == roles(settings).owner
    finally:
        await conn.close()

    # Retention trimmed the log: a swap would drop history, so it is refused.
    stream = ledger.keys.log(0)
    rows: Any = await ledger.redis.xrange(stream, "-", "+", count=50)
    trimmed = await ledger.redis.xtrim(stream, minid=rows[-1][0].decode(), approximate=False)
    assert trimmed == 49
    refused = processes.dispatch("rebuild-swap", "projector", "--rebuild", "--swap")
    assert refused.popen.wait(120) == 1, refused.log()
    assert "not swapped: the live tables hold 49 events the retained log" in refused.log()
    conn = await pg(settings)
    try:
        assert (
            await scalar(conn, "SELECT count(*) FROM {s}.commands", schema=settings.namespace)
            == 1600
        )
    finally:
        await conn.close()


@pytest.mark.slow
async def test_swapped_in_rebuild_keeps_being_projected(ledger: Ledger, settings: Settings) -> None:
    database = Database(settings.database_url, roles(settings))
    async with running(ledger, settings, batch=200) as projectors:
        first = await loadgen.generate(ledger, range(400))
        await wait_caught_up(settings, ledger.redis, ledger.keys)
        report = await rebuild.rebuild(ledger, database)
        # More commands while the rebuilt copy is behind, then the swap under load.
        second = await loadgen.generate(ledger, range(400, 700))
        conn = await pg(settings)
        try:
            previous = await rebuild.swap(conn, settings.namespace, report.schema)
            assert previous.startswith(f"{settings.namespace}_old_")
            third = await loadgen.generate(ledger, range(700, 900))
            await wait_caught_up(settings, ledger.redis, ledger.keys, timeout_s=60)
            assert projectors[0].projected > 0
            count = await scalar(
                conn, "SELECT count(*) FROM {s}.commands", schema=settings.namespace
            )
            assert count == len(first) + len(second) + len(third)
            result = await verify(conn, settings.namespace, commands=True)
            assert result.ok and result.commands == count, result.breaks
            # The maintenance functions follow the rename.
            path = await scalar(
                conn,
                "SELECT proconfig::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
                " WHERE n.nspname = %s AND p.proname = 'sweep_retention'",
                settings.namespace,
            )
            assert f"search_path={settings.namespace}, pg_temp" in path
        finally:
            await conn.close()
