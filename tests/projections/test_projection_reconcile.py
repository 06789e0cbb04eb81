"""Reconciliation against real Redis and PostgreSQL: a log that lost its tail after the
audit stored it, then entries appended below the audit's position (a promoted replica
whose clock is behind). The end-to-end AOF scenario is in tests/faults.

The loss is made the way a truncated AOF leaves a log: the last entries removed and the
log's last id set back to the last entry kept (XDEL + XSETID).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import msgspec
import pytest
from projection_support import pg, positions, running, wait_caught_up
from psycopg import AsyncConnection, sql

from config.settings import Settings
from ledger.ids import new_event_id
from ledger.store import Ledger
from projections import ledger_gaps, loadgen, reconcile, reconcile_loop
from projections.quarantine import REGISTRY
from projections.verify import verify
from projections.writer import entry_key

LOST = 3


async def busiest(ledger: Ledger) -> str:
    sizes = {
        ledger.keys.log(p): await ledger.redis.xlen(ledger.keys.log(p))
        for p in ledger.keys.all_partitions()
    }
    return max(sizes, key=lambda s: sizes[s])


async def lose_tail(ledger: Ledger, stream: str, count: int) -> tuple[list[Any], str]:
    """Remove the log's last `count` entries as a truncated AOF does; returns them and the
    last entry kept."""
    redis: Any = ledger.redis
    tail = list(reversed(await redis.xrevrange(stream, "+", "-", count=count + 1)))
    kept, lost = tail[0][0].decode(), tail[1:]
    await redis.xdel(stream, *(e for e, _ in lost))
    await redis.execute_command("XSETID", stream, kept)
    return lost, kept


async def projected_then_lost(ledger: Ledger, settings: Settings) -> tuple[str, list[Any], str]:
    """40 commands projected, then the busiest log loses its last LOST entries:
    (that log, the lost entries, the last entry kept)."""
    await loadgen.generate(ledger, range(40))
    async with running(ledger, settings):
        await wait_caught_up(settings, ledger.redis, ledger.keys)  # type: ignore[arg-type]
    stream = await busiest(ledger)
    lost, kept = await lose_tail(ledger, stream, LOST)
    return stream, lost, kept


async def stored_links(conn: AsyncConnection, schema: str, stream: str) -> dict[str, int]:
    cur = await conn.execute(
        sql.SQL("SELECT event_id, seq FROM {}.events WHERE stream = %s").format(
            sql.Identifier(schema)
        ),
        (stream,),
    )
    return {str(e): int(s) for e, s in await cur.fetchall()}


def gauge(partition: str) -> float | None:
    return REGISTRY.get_sample_value("dispatch_ledger_missing_events", {"partition": partition})


async def test_a_lost_tail_is_found_recorded_and_reported(
    ledger: Ledger, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    schema = settings.namespace
    stream, lost, kept = await projected_then_lost(ledger, settings)
    lost_ids = {e.decode() for e, _ in lost}
    lost_events = {msgspec.json.decode(f[b"e"])["event_id"] for _, f in lost}

    conn = await pg(settings)
    try:
        checker = reconcile.Reconciler(
            ledger.redis, ledger.keys, schema, retain_log_s=settings.retain_log_s
        )
        result = await checker.check(conn, full=True)
        [gap] = result.gaps
        assert gap.stream == stream
        assert {x.entry_id for x in gap.missing} == lost_ids
        assert {x.event_id for x in gap.missing} == lost_events
        assert gap.regressed and gap.ledger_last == kept
        assert {a.command_id for a in gap.affected} == {x.command_id for x in gap.missing}
        # Only the damaged log: every other one holds all its stored links.
        assert all(not s.missing for s in result.streams if s.stream != stream)
        assert not result.skipped

        await ledger_gaps.record(conn, schema, result)
        await ledger_gaps.record(conn, schema, result)  # found again: recorded once
        runs = await ledger_gaps.recorded(conn, schema)
        assert sum(r.missing for r in runs) == LOST
        assert {r.stream for r in runs} == {stream}

        loop = reconcile_loop.ReconcileLoop(checker, lambda: pg(settings), lambda: [stream])
        with caplog.at_level(logging.ERROR, logger="projections.reconcile"):
            loop.publish(result)
            loop.publish(result)  # logged once per loss, not per round
        [alarm] = [r.getMessage() for r in caplog.records if "ledger.reconcile.gap" in r.message]
        assert f"partition={gap.partition} stream={stream} missing={LOST} " in alarm
        first = min(lost_ids, key=entry_key)
        assert f" first={first} " in alarm
        assert gauge(gap.partition) == LOST

        text = "\n".join(reconcile.report(result, schema))
        assert f"ledger REGRESSION: {LOST} events stored in the audit" in text
        for affected in gap.affected:
            assert affected.line() in text

        # The chains are untouched and whole: verify passes.
        assert (await verify(conn, schema)).ok
    finally:
        await conn.close()


async def test_entries_appended_below_the_audit_position_are_projected(
    ledger: Ledger, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    schema = settings.namespace
    stream, _, kept = await projected_then_lost(ledger, settings)
    conn = await pg(settings)
    try:
        position = (await positions(conn, schema))[stream]
        before = await stored_links(conn, schema, stream)
        loop = reconcile_loop.ReconcileLoop(
            reconcile.Reconciler(
                ledger.redis, ledger.keys, schema, retain_log_s=settings.retain_log_s
            ),
            lambda: pg(settings),
            lambda: [stream],
        )
        # At the restart: a full check finds the lost tail, nothing passed over yet.
        first_check = await loop.tick(conn)
        assert first_check.full and len(first_check.streams[0].missing) == LOST
        assert not first_check.skipped
        # A server whose clock is behind appends right after the last id it kept: new
        # events (a redelivery-like copy of a kept event, under fresh event ids) whose
        # entry ids are at or below what the audit stored.
        redis: Any = ledger.redis
        [(_, fields)] = await redis.xrange(stream, kept, kept)
        ms, seq = entry_key(kept)
        added: dict[str, str] = {}
        for n in range(1, 4):
            event = msgspec.json.decode(fields[b"e"])
            event["event_id"] = new_event_id()
            entry = f"{ms}-{seq + n}"
            await redis.xadd(stream, {"e": msgspec.json.encode(event)}, id=entry)
            added[entry] = event["event_id"]
        assert all(entry_key(e) <= entry_key(position) for e in added)

        with caplog.at_level(logging.ERROR, logger="projections.reconcile"):
            result = await loop.tick(conn)
        # Later, the same server: an incremental check (only what was stored since).
        assert not result.full
        [check] = result.streams
        assert check.unprojected == sorted(added, key=entry_key)
        [line] = [r.getMessage() for r in caplog.records if "unprojected" in r.message]
        assert f" entries=3 first={min(added, key=entry_key)} " in line
        rewound = (await positions(conn, schema))[stream]
        assert entry_key(rewound) < entry_key(min(added, key=entry_key))

        async with running(ledger, settings):
            deadline = time.monotonic() + 30
            while not set(added.values()) <= set(await stored_links(conn, schema, stream)):
                assert time.monotonic() < deadline, "the rewound entries were not projected"
                await asyncio.sleep(0.1)
        after = await stored_links(conn, schema, stream)
        # Each new event stored once, linked after every link stored before the loss.
        assert len(after) == len(before) + len(added)
        assert min(after[e] for e in added.values()) > max(before.values())
        assert (await verify(conn, schema)).ok
        # Nothing left to rewind; the lost tail is still reported.
        again = await loop.reconciler.check(conn, [stream], full=True)
        assert not again.skipped
        assert len(again.streams[0].missing) == LOST
    finally:
        await conn.close()
