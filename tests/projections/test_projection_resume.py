"""Crashes, re-reads and shared partitions: no gap, no duplicate, same chain."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import pytest
from projection_support import at_port, log_ids, pg, positions, roles, scalar, wait_caught_up
from redis.asyncio import Redis

from config.settings import Settings
from ledger import lifecycle
from ledger.store import Ledger
from projections import loadgen
from projections.logs import LogReader, decode
from projections.schema import migrate
from projections.verify import verify
from projections.worker import Database, Projector, ProjectorConfig
from projections.writer import Writer, _command_line

from support import Processes, free_port


async def stored_ids(settings: Settings) -> list[tuple[str, str]]:
    conn = await pg(settings)
    try:
        cur = await conn.execute(f'SELECT stream, entry_id FROM "{settings.namespace}".events')
        return [(a, b) for a, b in await cur.fetchall()]
    finally:
        await conn.close()


async def writer_for(settings: Settings) -> Writer:
    admin = await pg(settings)
    kind = await migrate(admin, settings.namespace, roles(settings))
    await admin.close()
    conn = await Database(settings.database_url, roles(settings)).connect_writer("test-writer")
    return Writer(conn, settings.namespace, kind)


async def log_entries(ledger: Ledger, partition: int) -> tuple[str, list[Any]]:
    stream = ledger.keys.log(partition)
    rows: Any = await ledger.redis.xrange(stream, "-", "+")
    return stream, rows


async def pending(ledger: Ledger) -> int:
    total = 0
    for p in ledger.keys.all_partitions():
        total += int((await ledger.redis.xpending(ledger.keys.log(p), "projector"))["pending"])
    return total


async def busiest_partition(ledger: Ledger) -> int:
    sizes = [await ledger.redis.xlen(ledger.keys.log(p)) for p in ledger.keys.all_partitions()]
    return sizes.index(max(sizes))


async def test_a_batch_read_twice_is_stored_once(ledger: Ledger, settings: Settings) -> None:
    await loadgen.generate(ledger, range(200))
    writer = await writer_for(settings)
    reader = LogReader(ledger.redis)
    try:
        stream, rows = await log_entries(ledger, await busiest_partition(ledger))
        entries, _, _ = decode(stream, rows)
        assert len(entries) >= 150
        first = await writer.apply(stream, entries[:100], reader.fetch)
        # A crash after the commit but before XACK hands the same entries out again.
        again = await writer.apply(stream, entries[:100], reader.fetch)
        overlap = await writer.apply(stream, entries[50:150], reader.fetch)
        assert (first.new, again.new, overlap.new) == (100, 0, 50)
        assert overlap.position == entries[149].entry_id
        ids = await stored_ids(settings)
        assert sorted(ids) == sorted((stream, e.entry_id) for e in entries[:150])
        result = await verify(writer.conn, settings.namespace)
        assert result.ok and result.events == 150, result.breaks
    finally:
        await writer.conn.close()


async def test_entries_handed_to_another_reader_are_fetched_not_skipped(
    ledger: Ledger, settings: Settings
) -> None:
    """Two lease holders split the group's entries: the later half cannot skip the first."""
    await loadgen.generate(ledger, range(200))
    writer = await writer_for(settings)
    reader = LogReader(ledger.redis, batch=30)
    try:
        stream, rows = await log_entries(ledger, await busiest_partition(ledger))
        entries, _, _ = decode(stream, rows)
        later = await writer.apply(stream, entries[100:200], reader.fetch)
        assert later.new == len(entries[:200]) and later.filled == 100
        earlier = await writer.apply(stream, entries[:100], reader.fetch)
        assert earlier.new == 0
        assert sorted(await stored_ids(settings)) == sorted(
            (stream, e.entry_id) for e in entries[:200]
        )
        assert (await verify(writer.conn, settings.namespace, commands=True)).ok
    finally:
        await writer.conn.close()


async def test_an_event_id_repeated_in_the_log_is_stored_once(
    ledger: Ledger, settings: Settings
) -> None:
    await loadgen.generate(ledger, range(16))
    stream, rows = await log_entries(ledger, await busiest_partition(ledger))
    # The same event appended again (a replayed append): idempotent by event id.
    await ledger.redis.xadd(stream, {"e": rows[3][1][b"e"]})
    writer = await writer_for(settings)
    try:
        applied = await writer.catch_up(stream, LogReader(ledger.redis).fetch)
        assert applied.new == len(rows)
        assert await scalar(
            writer.conn, "SELECT count(*) FROM {s}.events", schema=settings.namespace
        ) == len(rows)
        assert (await verify(writer.conn, settings.namespace)).ok
        # Appended again after it was stored: a later batch meets it in the table.
        await ledger.redis.xadd(stream, {"e": rows[5][1][b"e"]})
        await loadgen.generate(ledger, range(16, 20))
        later = await writer.catch_up(stream, LogReader(ledger.redis).fetch)
        total = len(await ledger.redis.xrange(stream, "-", "+"))
        assert later.new == total - len(rows) - 2
        assert (
            await scalar(writer.conn, "SELECT count(*) FROM {s}.events", schema=settings.namespace)
            == total - 2
        )
        assert (await verify(writer.conn, settings.namespace, commands=True)).ok
    finally:
        await writer.conn.close()


async def test_a_new_command_row_stored_meanwhile_is_not_copied_over(
    ledger: Ledger, settings: Settings
) -> None:
    """New commands are COPYed straight into the table; should one be stored after all
    (by another writer, between the batch's lookup and its COPY), the COPY writes nothing
    and says so, and the stored row stays as it was."""
    await loadgen.generate(ledger, range(16))
    writer = await writer_for(settings)
    try:
        stream, rows = await log_entries(ledger, await busiest_partition(ledger))
        entries, _, _ = decode(stream, rows)
        await writer.catch_up(stream, LogReader(ledger.redis).fetch)
        first = entries[0].event
        partial = lifecycle.replay([first])  # what a stale writer would hold: `issued` only
        assert partial is not None
        before = await scalar(
            writer.conn,
            "SELECT status FROM {s}.commands WHERE command_id = %s",
            first.command_id,
            schema=settings.namespace,
        )
        async with writer.conn.transaction():
            assert not await writer._insert_commands(_command_line(partial))
        after = await scalar(
            writer.conn,
            "SELECT status FROM {s}.commands WHERE command_id = %s",
            first.command_id,
            schema=settings.namespace,
        )
        assert before == after != "issued"
        assert (await verify(writer.conn, settings.namespace, commands=True)).ok
    finally:
        await writer.conn.close()


@pytest.mark.slow
async def test_projector_killed_mid_batch_resumes_without_gap_or_duplicate(
    ledger: Ledger, settings: Settings, processes: Processes
) -> None:
    await loadgen.generate(ledger, range(6000))
    expected = await log_ids(ledger.redis, ledger.keys)
    first = processes.dispatch("projector", "projector", "--batch", "200")
    conn = await pg(settings)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline, first.log()
            busy = await scalar(
                conn,
                "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE %s"
                " AND xact_start IS NOT NULL AND state <> 'idle'",
                f"dispatch-projector:{settings.namespace}:%",
            )
            stored = await positions(conn, settings.namespace)
            if busy and any(e != "0-0" for e in stored.values()):
                first.kill()  # SIGKILL while its writer is inside a batch transaction
                break
            await asyncio.sleep(0.002)
        await asyncio.sleep(0.3)  # PostgreSQL rolls the open transaction back
        partial = await stored_ids(settings)
        assert 0 < len(partial) < len(expected), "the kill did not land mid-projection"
        # What survived is exactly each stream's log up to its stored position.
        stored_at = await positions(conn, settings.namespace)
        for stream, position in stored_at.items():
            rows: Any = (
                await ledger.redis.xrange(stream, "-", position) if position != "0-0" else []
            )
            assert sorted(e for s, e in partial if s == stream) == sorted(
                r[0].decode() for r in rows
            )
        # It had read a batch it never committed nor acknowledged.
        assert await pending(ledger) > 0

        processes.dispatch("projector", "projector", "--batch", "200")
        await wait_caught_up(settings, ledger.redis, ledger.keys, timeout_s=90)
        final = await stored_ids(settings)
        assert len(final) == len(set(final)) == len(expected)
        assert set(final) == expected
        assert await scalar(
            conn, "SELECT count(DISTINCT event_id) FROM {s}.events", schema=settings.namespace
        ) == len(expected)
        assert (
            await scalar(conn, "SELECT count(*) FROM {s}.commands", schema=settings.namespace)
            == 6000
        )
        result = await verify(conn, settings.namespace, commands=True)
        assert result.ok and result.commands == 6000, result.breaks
        # The restarted projector acknowledged what the killed one had read.
        await asyncio.sleep(0.5)
        assert await pending(ledger) == 0
    finally:
        await conn.close()


@pytest.mark.slow
async def test_two_projector_processes_share_the_partitions(
    ledger: Ledger, settings: Settings, processes: Processes
) -> None:
    a = processes.dispatch("projector-a", "projector")
    b = processes.dispatch("projector-b", "projector")
    await loadgen.generate(ledger, range(1500))
    expected = await log_ids(ledger.redis, ledger.keys)

    async def holders() -> set[str]:
        owners = set()
        for p in ledger.keys.all_partitions():
            owner = await ledger.redis.get(ledger.keys.projector_lease(p))
            if owner:
                owners.add(owner.decode())
        return owners

    deadline = time.monotonic() + 30
    while len(await holders()) < 2:
        assert time.monotonic() < deadline, a.log() + b.log()
        await asyncio.sleep(0.2)
    await wait_caught_up(settings, ledger.redis, ledger.keys, timeout_s=60)
    final = await stored_ids(settings)
    assert len(final) == len(expected) and set(final) == expected


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


async def test_verdicts_go_on_while_postgres_is_down_and_projection_resumes(
    settings: Settings,
) -> None:
    """Timeouts are safety-relevant: they must not wait for the audit database."""
    port = free_port()  # nothing listens here yet: PostgreSQL is "down"
    url = at_port(settings.database_url, port)
    target = urlsplit(settings.database_url)
    client = Redis.from_url(settings.redis_url)
    ledger = Ledger(client, replace(settings.ledger(), ack_timeout_ms=300))
    await ledger.start()
    server: asyncio.Server | None = None
    projector = Projector(ledger, url, ProjectorConfig(rebalance_interval_s=0.2))
    task = asyncio.create_task(projector.run())
    try:
        # Stays `delivered` (handed to the edge, never acknowledged). A `routed` command
        # that was never handed out waits for its hand-out, not for a verdict.
        [planned] = await loadgen.generate(ledger, range(17, 18))
        deadline = time.monotonic() + 20
        while (await ledger.lookup(planned.command_id)).status != "timed_out":  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "no verdict while PostgreSQL was down"
            await asyncio.sleep(0.05)
        assert projector.storage == "" and projector.verdicts.reached >= 1

        async def forward(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            pr, pw = await asyncio.open_connection(
                target.hostname or "127.0.0.1", target.port or 5432
            )
            await asyncio.gather(_pipe(r, pw), _pipe(pr, w))

        server = await asyncio.start_server(forward, "127.0.0.1", port)  # PostgreSQL is back
        await wait_caught_up(settings, client, ledger.keys, timeout_s=30)
        conn = await pg(settings)
        try:
            cur = await conn.execute(
                f'SELECT status FROM "{settings.namespace}".commands WHERE command_id = %s',
                (planned.command_id,),
            )
            assert await cur.fetchone() == ("timed_out",)
        finally:
            await conn.close()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if server is not None:
            server.close()
        await ledger.close()
        await client.aclose()
