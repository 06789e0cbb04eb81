"""The audit schema, its roles and its migrations, applied by the projector itself.

One logical schema whatever the storage: `events` is a TimescaleDB hypertable when the
extension exists and a natively range-partitioned table (one partition per UTC day)
otherwise. Queries never need to know which.

Three roles per deployment (names from `Roles.for_prefix`, the namespace by default):

* `<prefix>_owner` (no login) owns the schema, tables and functions. Only an owner can
  disable triggers, so nobody who writes rows is one.
* `<prefix>_projector` writes: INSERT on `events` (append-only: no UPDATE, DELETE or
  TRUNCATE, and triggers refuse them even to the owner), INSERT/UPDATE on the mutable
  views (`commands`, `positions`, `chains`). Partition upkeep and retention run through
  two SECURITY DEFINER functions it may EXECUTE, which act only as the policy says.
* `<prefix>_reader` reads everything (auditors, `dispatch audit`).

Migrations run as the connecting (admin) user, who must be a superuser or hold
CREATEROLE; the schema's objects are created under `SET ROLE <owner>`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, date, datetime

from psycopg import AsyncConnection, sql
from psycopg.errors import DuplicateObject

log = logging.getLogger("projections.schema")

MAX_IDENTIFIER = 63  # PostgreSQL truncates longer names silently
PARTITIONED = "partitioned"
TIMESCALEDB = "timescaledb"
DEFAULT_RETENTION_DAYS = 400
GENESIS = "0" * 64  # prev_hash of the first event of a chain
REFUSALS_CHAIN = "#refusals"  # chain of gateway refusals (never a valid edge id)


class SchemaError(RuntimeError):
    """The audit schema cannot be set up; the message says what to do."""


def check_identifier(value: str, what: str) -> str:
    if not value or len(value.encode()) > MAX_IDENTIFIER:
        raise SchemaError(
            f"{what} {value!r} must be 1-{MAX_IDENTIFIER} bytes (PostgreSQL would truncate it); "
            "use a shorter DISPATCH_NAMESPACE or set DISPATCH_DB_ROLE_PREFIX"
        )
    return value


@dataclass(frozen=True, slots=True)
class Roles:
    owner: str
    writer: str
    reader: str

    @classmethod
    def for_prefix(cls, prefix: str) -> Roles:
        return cls(
            owner=check_identifier(f"{prefix}_owner", "role"),
            writer=check_identifier(f"{prefix}_projector", "role"),
            reader=check_identifier(f"{prefix}_reader", "role"),
        )

    def all(self) -> tuple[str, str, str]:
        return (self.owner, self.writer, self.reader)


EVENT_COLUMNS = (
    " event_id text NOT NULL,"
    " at timestamptz NOT NULL,"
    " chain text NOT NULL,"
    " seq bigint NOT NULL,"
    " command_id text NOT NULL,"
    " edge_id text NOT NULL,"
    " status text NOT NULL,"
    " actor text NOT NULL,"
    " error_code text,"
    " stream text NOT NULL,"
    " entry_id text NOT NULL,"
    " payload text NOT NULL,"  # the ledger's bytes, unchanged: the hash covers them
    " prev_hash text NOT NULL,"
    " hash text NOT NULL,"
    " PRIMARY KEY (event_id, at)"
)


def _ms(later: str, earlier: str) -> str:
    return f"(extract(epoch FROM ({later} - {earlier})) * 1000)::bigint"


COMMANDS_TABLE = (
    "CREATE TABLE {s}.commands ("
    " command_id text PRIMARY KEY,"
    " edge_id text NOT NULL,"
    " command_type text,"
    " device_id text,"
    " channel text,"
    " value jsonb,"
    " unit text,"
    " priority text,"
    " duration_sec integer,"
    " expiry_sec integer,"
    " client_timestamp timestamptz,"
    " source text,"
    " actor text,"
    " grant_basis text,"
    " status text NOT NULL,"
    " final boolean NOT NULL,"
    " error_code text,"
    " error_message text,"
    " late boolean NOT NULL,"
    " deliveries integer NOT NULL,"
    " issued_at timestamptz NOT NULL,"
    " routed_at timestamptz,"
    " delivered_at timestamptz,"
    " finished_at timestamptz,"
    " executed_at timestamptz,"
    " expires_at timestamptz,"
    f" route_ms bigint GENERATED ALWAYS AS ({_ms('routed_at', 'issued_at')}) STORED,"
    f" deliver_ms bigint GENERATED ALWAYS AS ({_ms('delivered_at', 'routed_at')}) STORED,"
    f" execute_ms bigint GENERATED ALWAYS AS ({_ms('finished_at', 'delivered_at')}) STORED,"
    f" total_ms bigint GENERATED ALWAYS AS ({_ms('finished_at', 'issued_at')}) STORED,"
    " state jsonb NOT NULL,"
    " updated_at timestamptz NOT NULL DEFAULT now())"
)

REFUSE_CHANGE = """
CREATE OR REPLACE FUNCTION {s}.refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'audit rows of %.% are append-only: % refused', TG_TABLE_SCHEMA,
    TG_TABLE_NAME, TG_OP
    USING ERRCODE = 'insufficient_privilege',
          HINT = 'events are tamper-evident history; retention drops whole day partitions';
END $$
"""

# Both functions find their schema through their own search_path (set at creation and
# re-bound when a rebuilt schema is swapped in), never through the caller's.
ENSURE_DAY = """
CREATE OR REPLACE FUNCTION {s}.ensure_day(d date) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = {s}, pg_temp AS $$
DECLARE
  part text := 'events_' || to_char(d, 'YYYYMMDD');
  lo timestamptz := d::timestamp AT TIME ZONE 'UTC';
BEGIN
  PERFORM pg_advisory_xact_lock(hashtext('dispatch-partitions:' || current_schema()));
  IF to_regclass(format('%I.%I', current_schema(), part)) IS NOT NULL THEN
    RETURN true;
  END IF;
  -- Rows of that day already sit in the default partition: leave them there.
  IF EXISTS (SELECT 1 FROM events_default WHERE at >= lo AND at < lo + interval '1 day') THEN
    RETURN false;
  END IF;
  EXECUTE format('CREATE TABLE %I.%I PARTITION OF %I.events FOR VALUES FROM (%L) TO (%L)',
    current_schema(), part, current_schema(), lo, lo + interval '1 day');
  EXECUTE format('CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON %I.%I '
    'FOR EACH STATEMENT EXECUTE FUNCTION %I.refuse_change()',
    current_schema(), part, current_schema());
  RETURN true;
END $$
"""

SWEEP_RETENTION = """
CREATE OR REPLACE FUNCTION {s}.sweep_retention() RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = {s}, pg_temp AS $$
DECLARE
  keep_days integer;
  horizon date;
  part record;
  dropped integer := 0;
BEGIN
  SELECT value::integer INTO keep_days FROM audit_settings WHERE key = 'retention_days';
  IF keep_days IS NULL OR keep_days < 1 THEN
    RETURN 0;
  END IF;
  horizon := (now() AT TIME ZONE 'UTC')::date - keep_days;
  PERFORM pg_advisory_xact_lock(hashtext('dispatch-partitions:' || current_schema()));
  FOR part IN
    SELECT c.relname FROM pg_inherits i
      JOIN pg_class c ON c.oid = i.inhrelid
      JOIN pg_class p ON p.oid = i.inhparent
      JOIN pg_namespace n ON n.oid = p.relnamespace
     WHERE n.nspname = current_schema() AND p.relname = 'events'
       AND c.relname ~ '^events_[0-9]{{8}}$'
       AND to_date(substr(c.relname, 8), 'YYYYMMDD') < horizon
     ORDER BY c.relname
  LOOP
    -- Remember where each chain was cut so `dispatch audit verify` can tell retention
    -- from deletion.
    EXECUTE format('INSERT INTO chain_cuts AS k (chain, seq, hash, cut_at) '
      'SELECT DISTINCT ON (chain) chain, seq, hash, now() FROM %I.%I ORDER BY chain, seq DESC '
      'ON CONFLICT (chain) DO UPDATE SET seq = EXCLUDED.seq, hash = EXCLUDED.hash, '
      'cut_at = EXCLUDED.cut_at WHERE EXCLUDED.seq > k.seq', current_schema(), part.relname);
    EXECUTE format('DROP TABLE %I.%I', current_schema(), part.relname);
    dropped := dropped + 1;
  END LOOP;
  DELETE FROM commands WHERE issued_at < horizon::timestamp AT TIME ZONE 'UTC';
  RETURN dropped;
END $$
"""

FUNCTIONS = ("ensure_day(date)", "sweep_retention()")

# Each migration is a list of statements run as the owner; `{s}` is the schema.
MIGRATIONS: list[list[str]] = [
    [
        COMMANDS_TABLE,
        "CREATE INDEX commands_issued ON {s}.commands (issued_at, command_id)",
        "CREATE INDEX commands_edge ON {s}.commands (edge_id, issued_at, command_id)",
        "CREATE INDEX commands_source ON {s}.commands (source, issued_at, command_id)",
        "CREATE INDEX commands_actor ON {s}.commands (actor, issued_at, command_id)",
        "CREATE INDEX commands_status ON {s}.commands (status, issued_at, command_id)",
        "CREATE INDEX commands_type ON {s}.commands (command_type, issued_at, command_id)",
        "CREATE TABLE {s}.positions ("
        " stream text PRIMARY KEY,"
        " entry_id text NOT NULL,"
        " updated_at timestamptz NOT NULL DEFAULT now())",
        "CREATE TABLE {s}.chains ("
        " chain text PRIMARY KEY,"
        " seq bigint NOT NULL,"
        " hash text NOT NULL,"
        " updated_at timestamptz NOT NULL DEFAULT now())",
        "CREATE TABLE {s}.chain_cuts ("
        " chain text PRIMARY KEY,"
        " seq bigint NOT NULL,"
        " hash text NOT NULL,"
        " cut_at timestamptz NOT NULL)",
        "CREATE TABLE {s}.audit_settings (key text PRIMARY KEY, value text NOT NULL)",
        REFUSE_CHANGE,
    ],
]

# Log entries the projector could not decode or store (projections/quarantine.py); the
# same table in native and TimescaleDB mode. The writer role may INSERT (see _grant).
QUARANTINE_TABLE = (
    "CREATE TABLE {s}.quarantine ("
    " stream text NOT NULL,"
    " entry_id text NOT NULL,"
    " raw bytea NOT NULL,"
    " kind text NOT NULL,"
    " reason text NOT NULL,"
    " quarantined_at timestamptz NOT NULL DEFAULT now(),"
    " PRIMARY KEY (stream, entry_id))"
)
MIGRATIONS.append([QUARANTINE_TABLE])


def _q(statement: str, schema: str) -> sql.Composed:
    return sql.SQL(statement).format(s=sql.Identifier(schema))


async def has_timescaledb(conn: AsyncConnection) -> bool:
    cur = await conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'")
    return await cur.fetchone() is not None


async def storage_of(conn: AsyncConnection, schema: str) -> str | None:
    """'partitioned', 'timescaledb', or None when the schema has no events table."""
    cur = await conn.execute(
        "SELECT c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = 'events'",
        (schema,),
    )
    row = await cur.fetchone()
    if row is None:
        return None
    return PARTITIONED if row[0] == "p" else TIMESCALEDB


async def is_current(conn: AsyncConnection, schema: str) -> bool:
    """True when every migration is applied (checkable with the writer role alone)."""
    try:
        async with conn.transaction():
            cur = await conn.execute(
                _q("SELECT coalesce(max(version), 0) FROM {s}.schema_migrations", schema)
            )
            row = await cur.fetchone()
    except Exception:
        return False
    return row is not None and int(row[0]) >= len(MIGRATIONS)


async def _ensure_roles(conn: AsyncConnection, roles: Roles) -> None:
    for role in roles.all():
        cur = await conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
        if await cur.fetchone() is None:
            try:
                async with conn.transaction():
                    await conn.execute(
                        sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role))
                    )
            except DuplicateObject:
                pass  # created meanwhile by a migrator of another database
            log.info("projector.role.created role=%s", role)
    cur = await conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
    row = await cur.fetchone()
    if not (row and row[0]):
        # A CREATEROLE admin needs membership to create objects as the owner.
        for role in roles.all():
            await conn.execute(sql.SQL("GRANT {} TO CURRENT_USER").format(sql.Identifier(role)))


async def migrate(
    conn: AsyncConnection,
    schema: str,
    roles: Roles,
    *,
    retention_days: int = DEFAULT_RETENTION_DAYS,
) -> str:
    """Bring the schema up to date; returns the storage kind ('timescaledb'/'partitioned')."""
    check_identifier(schema, "schema")
    try:
        async with conn.transaction():
            # One migrator at a time, whichever projector process starts first.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext(%s))", (f"dispatch-migrate:{schema}",)
            )
            await _ensure_roles(conn, roles)
            owner = sql.Identifier(roles.owner)
            kind = await storage_of(conn, schema)
            if kind is None:
                kind = TIMESCALEDB if await has_timescaledb(conn) else PARTITIONED
                if kind == TIMESCALEDB:
                    await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
            await conn.execute(
                sql.SQL("CREATE SCHEMA IF NOT EXISTS {} AUTHORIZATION {}").format(
                    sql.Identifier(schema), owner
                )
            )
            await conn.execute(sql.SQL("SET LOCAL ROLE {}").format(owner))
            await _apply_migrations(conn, schema, kind)
            await conn.execute(
                _q(
                    "INSERT INTO {s}.audit_settings (key, value) VALUES ('retention_days', %s)"
                    " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                    schema,
                ),
                (str(retention_days),),
            )
            if kind == TIMESCALEDB:
                await _timescale_retention(conn, schema, retention_days)
            await _grant(conn, schema, roles)
            await conn.execute("RESET ROLE")
    except SchemaError:
        raise
    except Exception as exc:
        raise SchemaError(
            f"migrating the audit schema {schema!r} failed: {exc}. The migrating user (from "
            "DISPATCH_DATABASE_URL) must be a superuser or hold CREATEROLE and CREATE on the "
            "database"
        ) from exc
    return kind


async def _apply_migrations(conn: AsyncConnection, schema: str, kind: str) -> None:
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
        if version == 1:
            await _create_events(conn, schema, kind)
        await conn.execute(
            _q("INSERT INTO {s}.schema_migrations (version) VALUES (%s)", schema), (version,)
        )
        log.info(
            "projector.migration.applied schema=%s version=%d storage=%s", schema, version, kind
        )
    # Functions are (re)created every time so their bodies follow the code.
    await conn.execute(_q(REFUSE_CHANGE, schema))
    if kind == PARTITIONED:
        await conn.execute(_q(ENSURE_DAY, schema))
        await conn.execute(_q(SWEEP_RETENTION, schema))


async def _create_events(conn: AsyncConnection, schema: str, kind: str) -> None:
    if kind == TIMESCALEDB:
        # TimescaleDB path (the extension is not installable on the reference machine).
        await conn.execute(_q("CREATE TABLE {s}.events (" + EVENT_COLUMNS + ")", schema))
        await conn.execute(
            "SELECT create_hypertable(%s, 'at', chunk_time_interval => interval '1 day')",
            (f"{schema}.events",),
        )
    else:
        await conn.execute(
            _q("CREATE TABLE {s}.events (" + EVENT_COLUMNS + ") PARTITION BY RANGE (at)", schema)
        )
        await conn.execute(
            _q("CREATE TABLE {s}.events_default PARTITION OF {s}.events DEFAULT", schema)
        )
        await conn.execute(
            _q(
                "CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON {s}.events_default"
                " FOR EACH STATEMENT EXECUTE FUNCTION {s}.refuse_change()",
                schema,
            )
        )
    for statement in (
        "CREATE INDEX events_command ON {s}.events (command_id, at)",
        "CREATE INDEX events_chain ON {s}.events (chain, seq)",
        "CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON {s}.events"
        " FOR EACH ROW EXECUTE FUNCTION {s}.refuse_change()",
        "CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON {s}.events"
        " FOR EACH STATEMENT EXECUTE FUNCTION {s}.refuse_change()",
    ):
        await conn.execute(_q(statement, schema))


async def _timescale_retention(conn: AsyncConnection, schema: str, retention_days: int) -> None:
    await conn.execute(
        "SELECT remove_retention_policy(%s, if_exists => true)", (f"{schema}.events",)
    )
    await conn.execute(
        "SELECT add_retention_policy(%s, drop_after => make_interval(days => %s))",
        (f"{schema}.events", retention_days),
    )


async def _grant(conn: AsyncConnection, schema: str, roles: Roles) -> None:
    s = sql.Identifier(schema)
    writer, reader = sql.Identifier(roles.writer), sql.Identifier(roles.reader)
    statements = [
        sql.SQL("GRANT USAGE ON SCHEMA {} TO {}, {}").format(s, writer, reader),
        sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA {} TO {}, {}").format(s, writer, reader),
        sql.SQL("GRANT INSERT ON {}.events TO {}").format(s, writer),
        sql.SQL("GRANT INSERT, UPDATE ON {}.commands, {}.positions, {}.chains TO {}").format(
            s, s, s, writer
        ),
    ]
    if await _has_table(conn, schema, "quarantine"):
        statements.append(sql.SQL("GRANT INSERT ON {}.quarantine TO {}").format(s, writer))
    for function in ("refuse_change()", *FUNCTIONS):
        exists = await conn.execute(
            "SELECT to_regprocedure(%s) IS NOT NULL", (f"{schema}.{function}",)
        )
        row = await exists.fetchone()
        if not (row and row[0]):
            continue
        name = sql.SQL("{}.").format(s) + sql.SQL(function)
        statements.append(sql.SQL("REVOKE ALL ON FUNCTION {} FROM PUBLIC").format(name))
        if function in FUNCTIONS:
            statements.append(sql.SQL("GRANT EXECUTE ON FUNCTION {} TO {}").format(name, writer))
    for statement in statements:
        await conn.execute(statement)


async def _has_table(conn: AsyncConnection, schema: str, table: str) -> bool:
    cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f'"{schema}".{table}',))
    row = await cur.fetchone()
    return bool(row and row[0])


async def bind_functions(conn: AsyncConnection, schema: str) -> None:
    """Point the maintenance functions at `schema` (after a schema was renamed)."""
    for function in FUNCTIONS:
        exists = await conn.execute(
            "SELECT to_regprocedure(%s) IS NOT NULL", (f"{schema}.{function}",)
        )
        row = await exists.fetchone()
        if row and row[0]:
            await conn.execute(
                sql.SQL("ALTER FUNCTION {}.").format(sql.Identifier(schema))
                + sql.SQL(function)
                + sql.SQL(" SET search_path = {}, pg_temp").format(sql.Identifier(schema))
            )


async def ensure_day(conn: AsyncConnection, schema: str, kind: str, day: date) -> bool:
    """Create the day's partition (native partitioning; TimescaleDB makes its own chunks)."""
    if kind != PARTITIONED:
        return True
    cur = await conn.execute(_q("SELECT {s}.ensure_day(%s)", schema), (day,))
    row = await cur.fetchone()
    created = bool(row and row[0])
    if not created:
        log.warning(
            "projector.partition.skipped schema=%s day=%s reason=rows_in_default_partition",
            schema,
            day,
        )
    return created


async def sweep_retention(conn: AsyncConnection, schema: str, kind: str) -> int:
    """Drop whole day partitions past the retention (TimescaleDB runs its own policy)."""
    if kind != PARTITIONED:
        return 0
    cur = await conn.execute(_q("SELECT {s}.sweep_retention()", schema))
    row = await cur.fetchone()
    dropped = int(row[0]) if row else 0
    if dropped:
        log.info("projector.retention.swept schema=%s partitions_dropped=%d", schema, dropped)
    return dropped


def utc_day(moment: datetime) -> date:
    return moment.astimezone(UTC).date()


async def drop_roles(conn: AsyncConnection, roles: Roles) -> None:
    """Remove the roles (tests, teardown); their schemas must be dropped first."""
    for role in roles.all():
        cur = await conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
        if await cur.fetchone() is None:
            continue
        await conn.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(role)))
        await conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
