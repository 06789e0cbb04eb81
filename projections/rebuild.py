"""`dispatch projector --rebuild`: project the whole retained log into fresh tables.

The rebuild reads every partition log and the refusals stream from the start (XRANGE,
no consumer group, no leases: live projectors keep running) up to their last entry at
the start, into the schema `<namespace>_rebuild`, with the same writer as incremental
projection. It then compares the fresh tables with the live ones. With `swap` the fresh
schema replaces the live one (which is kept as `<namespace>_old_<UTC time>` until an
operator drops it); running projectors carry on in the new tables from their positions,
closing any gap from the log.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from psycopg import AsyncConnection, sql

from ledger.store import Ledger
from projections import schema
from projections.logs import LogReader
from projections.worker import Database
from projections.writer import START, Fetch, Gap, Writer, entry_key

log = logging.getLogger("projections.rebuild")

# Columns compared per table: everything the projection derives (not its own clocks).
COMPARED = {
    "events": (
        "event_id, at, chain, seq, command_id, edge_id, status, actor, error_code, stream,"
        " entry_id, payload, prev_hash, hash"
    ),
    "commands": (
        "command_id, edge_id, command_type, device_id, channel, value, unit, priority,"
        " duration_sec, expiry_sec, client_timestamp, source, actor, grant_basis, status, final,"
        " error_code, error_message, late, deliveries, issued_at, routed_at, delivered_at,"
        " finished_at, executed_at, expires_at, route_ms, deliver_ms, execute_ms, total_ms,"
        " state::jsonb"  # `json` has no equality; as jsonb, compared as before
    ),
    "chains": "chain, seq, hash",
    "positions": "stream, entry_id",
}
# Rows that mean "nothing yet": a live projector keeps a `0-0` position for every stream it
# reads, even an empty one, which a rebuild (reading only streams with entries) omits.
NOTHING_YET = {"positions": sql.SQL(" WHERE entry_id <> {}").format(sql.Literal(START))}


@dataclass
class Comparison:
    only_live: dict[str, int] = field(default_factory=dict)
    only_rebuilt: dict[str, int] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    missing_events: int = 0  # live events (by id) that the rebuilt tables do not have

    @property
    def equal(self) -> bool:
        return not any(self.only_live.values()) and not any(self.only_rebuilt.values())


@dataclass
class RebuildReport:
    schema: str
    events: int = 0
    streams: int = 0
    seconds: float = 0.0
    comparison: Comparison | None = None
    previous: str = ""  # where the replaced live schema went (after a swap)


def rebuild_schema(live: str) -> str:
    return f"{live}_rebuild"


async def rebuild(
    ledger: Ledger, database: Database, *, batch: int = 2000, retention_days: int | None = None
) -> RebuildReport:
    """Build `<namespace>_rebuild` from the retained log (dropping any earlier one)."""
    live = ledger.config.namespace
    target = rebuild_schema(live)
    started = time.monotonic()
    admin = await AsyncConnection.connect(database.admin_url, autocommit=True)
    try:
        await admin.execute(
            sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(target))
        )
        storage = await schema.migrate(
            admin,
            target,
            database.roles,
            retention_days=retention_days or schema.DEFAULT_RETENTION_DAYS,
        )
    finally:
        await admin.close()
    log.info("projector.rebuild.started schema=%s storage=%s", target, storage)
    report = RebuildReport(target)
    conn = await database.connect_writer(f"dispatch-projector:{live}:rebuild")
    try:
        writer = Writer(conn, target, storage)
        today = datetime.now(UTC).date()
        for offset in range(-1, 4):
            await schema.ensure_day(conn, target, storage, today + timedelta(days=offset))
        reader = LogReader(ledger.redis, batch=batch, gap_limit=batch)
        keys = ledger.keys
        streams = [(keys.log(p), False) for p in keys.all_partitions()]
        streams.append((keys.audit(), True))
        for stream, refusals in streams:
            end = await reader.last_id(stream)
            if end is None:
                continue
            report.streams += 1
            report.events += await _project_stream(writer, reader, stream, end, refusals)
    finally:
        await conn.close()
    report.seconds = time.monotonic() - started
    log.info(
        "projector.rebuild.completed schema=%s events=%d streams=%d seconds=%.1f",
        target,
        report.events,
        report.streams,
        report.seconds,
    )
    return report


async def _project_stream(
    writer: Writer, reader: LogReader, stream: str, end: str, refusals: bool
) -> int:
    async def fetch(name: str, after: str, before: str) -> Gap:
        return await reader.fetch(name, after, before, upto=end)

    bounded: Fetch = fetch
    stored = 0
    position = ""
    while True:
        applied = await writer.catch_up(stream, bounded, refusals=refusals)
        stored += applied.new
        if applied.position == position or entry_key(applied.position) >= entry_key(end):
            return stored
        position = applied.position


async def compare(conn: AsyncConnection, live: str, rebuilt: str) -> Comparison:
    """Rows only in the live tables and rows only in the rebuilt ones, per table."""
    result = Comparison()
    for table, columns in COMPARED.items():
        where = NOTHING_YET.get(table, sql.SQL(""))
        a = sql.SQL("SELECT {c} FROM {s}.{t}{w}").format(
            c=sql.SQL(columns), s=sql.Identifier(live), t=sql.Identifier(table), w=where
        )
        b = sql.SQL("SELECT {c} FROM {s}.{t}{w}").format(
            c=sql.SQL(columns), s=sql.Identifier(rebuilt), t=sql.Identifier(table), w=where
        )
        for left, right, into in ((a, b, result.only_live), (b, a, result.only_rebuilt)):
            cur = await conn.execute(
                sql.SQL("SELECT count(*) FROM ({} EXCEPT ALL {}) AS d").format(left, right)
            )
            row = await cur.fetchone()
            into[table] = int(row[0]) if row else 0
        cur = await conn.execute(
            sql.SQL("SELECT count(*) FROM {}.{}{}").format(
                sql.Identifier(rebuilt), sql.Identifier(table), where
            )
        )
        row = await cur.fetchone()
        result.rows[table] = int(row[0]) if row else 0
    cur = await conn.execute(
        sql.SQL(
            "SELECT count(*) FROM {a}.events l WHERE NOT EXISTS"
            " (SELECT 1 FROM {b}.events r WHERE r.event_id = l.event_id AND r.at = l.at)"
        ).format(a=sql.Identifier(live), b=sql.Identifier(rebuilt))
    )
    row = await cur.fetchone()
    result.missing_events = int(row[0]) if row else 0
    return result


async def swap(conn: AsyncConnection, live: str, rebuilt: str) -> str:
    """Put the rebuilt schema in place of the live one; returns the old one's new name."""
    old = schema.check_identifier(f"{live}_old_{datetime.now(UTC):%Y%m%d%H%M%S}", "schema")
    async with conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext(%s))", (f"dispatch-migrate:{live}",)
        )
        exists = await schema.storage_of(conn, live)
        # Wait for writers' open batches (each starts by locking its position row) and
        # hold new ones back, so no transaction spans both copies.
        for name in (live, rebuilt) if exists is not None else (rebuilt,):
            await conn.execute(
                sql.SQL("LOCK TABLE {}.positions IN ACCESS EXCLUSIVE MODE").format(
                    sql.Identifier(name)
                )
            )
        if exists is not None:
            await conn.execute(
                sql.SQL("ALTER SCHEMA {} RENAME TO {}").format(
                    sql.Identifier(live), sql.Identifier(old)
                )
            )
            await schema.bind_functions(conn, old)
        await conn.execute(
            sql.SQL("ALTER SCHEMA {} RENAME TO {}").format(
                sql.Identifier(rebuilt), sql.Identifier(live)
            )
        )
        await schema.bind_functions(conn, live)
    log.info("projector.rebuild.swapped schema=%s previous=%s", live, old)
    return old if exists is not None else ""
