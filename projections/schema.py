"""The audit schema and its migrations, applied by the projector itself.

One logical schema whatever the storage: `events` is a TimescaleDB hypertable when the
extension exists and a natively range-partitioned table (by day) otherwise. Queries
never need to know which.
"""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime, timedelta

from psycopg import AsyncConnection, sql

log = logging.getLogger("projections.schema")

# Each migration is a list of statements; `{s}` is the schema (the deployment namespace).
MIGRATIONS: list[list[str]] = [
    [
        "CREATE TABLE IF NOT EXISTS {s}.events_template ("
        " event_id text NOT NULL,"
        " at timestamptz NOT NULL,"
        " command_id text NOT NULL,"
        " edge_id text NOT NULL,"
        " status text NOT NULL,"
        " actor text NOT NULL,"
        " stream text NOT NULL,"
        " entry_id text NOT NULL,"
        " error_code text,"
        " payload jsonb NOT NULL)",
        "CREATE TABLE IF NOT EXISTS {s}.commands ("
        " command_id text PRIMARY KEY,"
        " edge_id text NOT NULL,"
        " command_type text,"
        " device_id text,"
        " channel text,"
        " value jsonb,"
        " unit text,"
        " priority text,"
        " source text,"
        " actor text,"
        " status text NOT NULL,"
        " error_code text,"
        " error_message text,"
        " late boolean NOT NULL DEFAULT false,"
        " deliveries integer NOT NULL DEFAULT 0,"
        " issued_at timestamptz,"
        " routed_at timestamptz,"
        " delivered_at timestamptz,"
        " finished_at timestamptz,"
        " expires_at timestamptz,"
        " state jsonb NOT NULL,"
        " updated_at timestamptz NOT NULL DEFAULT now())",
        "CREATE INDEX IF NOT EXISTS commands_edge_issued ON {s}.commands (edge_id, issued_at)",
        "CREATE INDEX IF NOT EXISTS commands_source_issued ON {s}.commands (source, issued_at)",
        "CREATE INDEX IF NOT EXISTS commands_status_issued ON {s}.commands (status, issued_at)",
        "CREATE INDEX IF NOT EXISTS commands_issued ON {s}.commands (issued_at)",
        "CREATE TABLE IF NOT EXISTS {s}.positions ("
        " stream text PRIMARY KEY,"
        " entry_id text NOT NULL,"
        " updated_at timestamptz NOT NULL DEFAULT now())",
    ],
]

EVENTS_PARTITIONED = (
    "CREATE TABLE IF NOT EXISTS {s}.events (LIKE {s}.events_template INCLUDING ALL,"
    " PRIMARY KEY (event_id, at)) PARTITION BY RANGE (at)"
)
EVENTS_HYPERTABLE = (
    "CREATE TABLE IF NOT EXISTS {s}.events (LIKE {s}.events_template INCLUDING ALL,"
    " PRIMARY KEY (event_id, at))"
)
EVENT_INDEXES = [
    "CREATE INDEX IF NOT EXISTS events_command ON {s}.events (command_id, at)",
    "CREATE INDEX IF NOT EXISTS events_edge ON {s}.events (edge_id, at)",
]


def _q(statement: str, schema: str) -> sql.Composed:
    return sql.SQL(statement).format(s=sql.Identifier(schema))


async def has_timescaledb(conn: AsyncConnection) -> bool:
    cur = await conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'")
    return await cur.fetchone() is not None


async def migrate(conn: AsyncConnection, schema: str) -> str:
    """Bring the schema up to date; returns the storage kind ('timescaledb'/'partitioned')."""
    async with conn.transaction():
        # One migrator at a time, whichever projector process starts first.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"migrate:{schema}",))
        await conn.execute(_q("CREATE SCHEMA IF NOT EXISTS {s}", schema))
        await conn.execute(
            _q(
                "CREATE TABLE IF NOT EXISTS {s}.schema_migrations ("
                " version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
                schema,
            )
        )
        cur = await conn.execute(
            _q("SELECT coalesce(max(version), 0) FROM {s}.schema_migrations", schema)
        )
        row = await cur.fetchone()
        current = int(row[0]) if row else 0
        for version, statements in enumerate(MIGRATIONS, start=1):
            if version <= current:
                continue
            for statement in statements:
                await conn.execute(_q(statement, schema))
            await conn.execute(
                _q("INSERT INTO {s}.schema_migrations (version) VALUES (%s)", schema), (version,)
            )
            log.info("projector.migration.applied schema=%s version=%d", schema, version)
        kind = await _ensure_events(conn, schema)
    return kind


async def _ensure_events(conn: AsyncConnection, schema: str) -> str:
    cur = await conn.execute(
        "SELECT c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = 'events'",
        (schema,),
    )
    row = await cur.fetchone()
    if row is not None:
        return "partitioned" if row[0] == "p" else "timescaledb"
    if await has_timescaledb(conn):
        await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        await conn.execute(_q(EVENTS_HYPERTABLE, schema))
        await conn.execute(
            "SELECT create_hypertable(%s, 'at', chunk_time_interval => interval '1 day')",
            (f"{schema}.events",),
        )
        kind = "timescaledb"
    else:
        await conn.execute(_q(EVENTS_PARTITIONED, schema))
        await conn.execute(
            _q(
                "CREATE TABLE IF NOT EXISTS {s}.events_default PARTITION OF {s}.events DEFAULT",
                schema,
            )
        )
        kind = "partitioned"
    for statement in EVENT_INDEXES:
        await conn.execute(_q(statement, schema))
    return kind


def day_partition(schema: str, day: date) -> sql.Composed:
    name = f"events_{day:%Y%m%d}"
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return sql.SQL(
        "CREATE TABLE IF NOT EXISTS {s}.{name} PARTITION OF {s}.events FOR VALUES FROM ({lo}) TO ({hi})"
    ).format(
        s=sql.Identifier(schema),
        name=sql.Identifier(name),
        lo=sql.Literal(start),
        hi=sql.Literal(start + timedelta(days=1)),
    )


async def ensure_partitions(
    conn: AsyncConnection, schema: str, kind: str, days_ahead: int = 3
) -> None:
    """Create the daily partitions the next few days need (native partitioning only)."""
    if kind != "partitioned":
        return
    today = datetime.now(UTC).date()
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"partitions:{schema}",))
        for offset in range(-1, days_ahead + 1):
            day = today + timedelta(days=offset)
            if await _default_has_rows(conn, schema, day):
                continue  # rows already landed in the default partition for that day
            await conn.execute(day_partition(schema, day))


async def _default_has_rows(conn: AsyncConnection, schema: str, day: date) -> bool:
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    cur = await conn.execute(
        _q("SELECT 1 FROM {s}.events_default WHERE at >= %s AND at < %s LIMIT 1", schema),
        (start, start + timedelta(days=1)),
    )
    return await cur.fetchone() is not None
