"""The audit schema, its roles and its migrations, applied by the projector itself.

One logical schema whatever the storage: `events` is a TimescaleDB hypertable (1-day
chunks) when the extension is usable (installed or creatable, and preloaded) and a
natively range-partitioned table (one partition per UTC day) otherwise; the log says
which and why. Queries never need to know which. Both storages share one retention
mechanism (the project's own sweep drops whole days and records the cut in `chain_cuts`
and `retention_cuts`; no background policy, so the Apache edition suffices) and the same
tamper evidence (row triggers refuse UPDATE/DELETE, every partition or chunk refuses
TRUNCATE).

Three roles per deployment (names from `Roles.for_prefix`, the namespace by default):

* `<prefix>_owner` (no login) owns the schema, tables and functions. Only an owner can
  disable triggers, so nobody who writes rows is one.
* `<prefix>_projector` writes: INSERT on `events` (append-only: no UPDATE, DELETE or
  TRUNCATE, and triggers refuse them even to the owner), INSERT/UPDATE on the mutable
  views (`commands`, `positions`, `chains`). Partition upkeep and retention run through
  two SECURITY DEFINER functions it may EXECUTE, which act only as the policy says.
* `<prefix>_reader` reads everything (auditors, `dispatch audit`).

Migrations run as the connecting (admin) user, who must be a superuser or hold
CREATEROLE (and be allowed to CREATE EXTENSION timescaledb, to use it); the schema's
objects are created under `SET ROLE <owner>`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import NamedTuple

from psycopg import AsyncConnection, sql
from psycopg.errors import DuplicateObject, InsufficientPrivilege

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


class Roles(NamedTuple):
    """The deployment's three PostgreSQL roles: owner of the schema, projector, auditors."""

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

# One retention mechanism for both storages, run by the project's own sweep (no
# background policy: the Apache edition has none, and jobs need a LOGIN owner). Whole
# days older than the horizon go: native day partitions by DROP TABLE, TimescaleDB chunks
# by drop_chunks. Before a day goes, each chain's last link in it is recorded
# (`chain_cuts`) so `dispatch audit verify` can tell retention from deletion; the sweep
# itself is recorded in `retention_cuts`. `{parts}`, `{lock}`, `{drop_*}`: the storage's part.
SWEEP_RETENTION = """
CREATE OR REPLACE FUNCTION {s}.sweep_retention() RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = {s}, pg_temp AS $$
DECLARE
  keep_days integer;
  horizon timestamptz;
  part regclass;
  dropped integer := 0;
  trimmed integer;
BEGIN
  SELECT value::integer INTO keep_days FROM audit_settings WHERE key = 'retention_days';
  IF keep_days IS NULL OR keep_days < 1 THEN
    RETURN 0;
  END IF;
  horizon := ((now() AT TIME ZONE 'UTC')::date - keep_days)::timestamp AT TIME ZONE 'UTC';
  PERFORM pg_advisory_xact_lock(hashtext('dispatch-partitions:' || current_schema()));
  {lock}
  FOR part IN {parts} LOOP
    EXECUTE format('INSERT INTO chain_cuts AS k (chain, seq, hash, cut_at) '
      'SELECT DISTINCT ON (chain) chain, seq, hash, now() FROM %s ORDER BY chain, seq DESC '
      'ON CONFLICT (chain) DO UPDATE SET seq = EXCLUDED.seq, hash = EXCLUDED.hash, '
      'cut_at = EXCLUDED.cut_at WHERE EXCLUDED.seq > k.seq', part);
    {drop_one}
    dropped := dropped + 1;
  END LOOP;
  {drop_all}
  DELETE FROM commands WHERE issued_at < horizon;
  GET DIAGNOSTICS trimmed = ROW_COUNT;
  IF dropped > 0 OR trimmed > 0 THEN
    INSERT INTO retention_cuts (horizon, swept_at, parts_dropped, commands_deleted)
    VALUES (horizon, now(), dropped, trimmed);
  END IF;
  RETURN dropped;
END $$
"""

_NATIVE_PARTS = (
    "SELECT c.oid::regclass FROM pg_inherits i"
    " JOIN pg_class c ON c.oid = i.inhrelid"
    " WHERE i.inhparent = format('%I.events', current_schema())::regclass"
    " AND c.relname ~ '^events_[0-9]{{8}}$'"
    " AND to_date(substr(c.relname, 8), 'YYYYMMDD')::timestamp AT TIME ZONE 'UTC' < horizon"
    " ORDER BY c.relname"
)
# Chunks are 1 UTC day: those entirely below the horizon are the rows `at < horizon`.
_CHUNK_PARTS = (
    "SELECT c FROM {ts}.show_chunks(format('%I.events', current_schema())::regclass,"
    " older_than => horizon) AS c"
)


def sweep_function(kind: str, extension_schema: str = "") -> str:
    """The sweep's body for a storage (`{s}` left for the schema)."""
    if kind == PARTITIONED:
        return SWEEP_RETENTION.format(
            s="{s}",
            parts=_NATIVE_PARTS,
            lock="",  # day partitions are created under the advisory lock above
            drop_one="EXECUTE format('DROP TABLE %s', part);",
            drop_all="",
        )
    ts = '"' + extension_schema.replace('"', '""') + '"'
    return SWEEP_RETENTION.format(
        s="{s}",
        parts=_CHUNK_PARTS.format(ts=ts),
        # Chunks appear as rows arrive: hold inserts back so drop_chunks drops exactly
        # the chunks whose cuts were recorded (a few milliseconds, once an hour).
        lock="LOCK TABLE events IN SHARE MODE;",
        drop_one="",
        drop_all=(
            f"PERFORM {ts}.drop_chunks(format('%I.events', current_schema())::regclass,"
            " older_than => horizon);"
        ),
    )


# TimescaleDB creates chunks itself and copies only row triggers to them: each new chunk
# gets the TRUNCATE refusal from a statement trigger of the insert that created it (in
# the same transaction, so no chunk is ever visible unprotected).
PROTECT_CHUNKS = """
CREATE OR REPLACE FUNCTION {s}.protect_chunks() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = {s}, pg_temp AS $$
DECLARE
  chunk regclass;
BEGIN
  FOR chunk IN
    SELECT c FROM {ts}.show_chunks(format('%I.events', current_schema())::regclass) AS c
     WHERE NOT EXISTS (SELECT 1 FROM pg_trigger t
                        WHERE t.tgrelid = c AND t.tgname = 'events_no_truncate')
  LOOP
    EXECUTE format('CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON %s '
      'FOR EACH STATEMENT EXECUTE FUNCTION %I.refuse_change()', chunk, current_schema());
  END LOOP;
  RETURN NULL;
END $$
"""

FUNCTIONS = ("ensure_day(date)", "sweep_retention()")  # the writer may EXECUTE these
DEFINERS = (*FUNCTIONS, "protect_chunks()")  # SECURITY DEFINER: bound to their schema

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
    [
        # One row per retention sweep that removed something: the horizon it cut at.
        "CREATE TABLE {s}.retention_cuts ("
        " horizon timestamptz NOT NULL,"
        " swept_at timestamptz NOT NULL,"
        " parts_dropped integer NOT NULL,"
        " commands_deleted integer NOT NULL)",
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

# Chain links whose ledger entries Redis lost after they were projected (a truncated AOF
# tail, a failover to a lagging replica), recorded by projections/reconcile.py so that
# `dispatch audit verify` explains them. The writer role may INSERT and UPDATE (_grant).
LEDGER_GAPS_TABLE = (
    "CREATE TABLE {s}.ledger_gaps ("
    " chain text NOT NULL,"
    " first_seq bigint NOT NULL,"
    " last_seq bigint NOT NULL,"
    " stream text NOT NULL,"
    " first_entry text NOT NULL,"
    " last_entry text NOT NULL,"
    " missing integer NOT NULL,"
    " commands text[] NOT NULL,"
    " ledger_last text NOT NULL,"
    " detected_at timestamptz NOT NULL DEFAULT now(),"
    " PRIMARY KEY (chain, first_seq))"
)
MIGRATIONS.append([LEDGER_GAPS_TABLE])

# The folded state is read back only by the projector (re-folding) and `audit verify`,
# never searched: `json` stores the text as given, where `jsonb` parsed and rebuilt it
# on every upsert (a quarter of PostgreSQL's CPU per projected event).
MIGRATIONS.append(["ALTER TABLE {s}.commands ALTER COLUMN state TYPE json USING state::json"])

# The indexed texts in byte order (COLLATE "C"): under the database's default collation
# (C.UTF-8 is not "C" to PostgreSQL 15) every index comparison went through strcoll.
# Identifiers are ASCII and UTF-8 byte order is code point order, so every ORDER BY
# reads the same. Index-only: the rows are not rewritten.
_BYTE_ORDER = {
    "events": ("event_id", "command_id", "chain"),
    "commands": ("command_id", "edge_id", "source", "actor", "status", "command_type"),
}
MIGRATIONS.append(
    [
        f"ALTER TABLE {{s}}.{table} "
        + ", ".join(f'ALTER COLUMN {c} TYPE text COLLATE "C"' for c in columns)
        for table, columns in _BYTE_ORDER.items()
    ]
)


def _q(statement: str, schema: str) -> sql.Composed:
    return sql.SQL(statement).format(s=sql.Identifier(schema))


@dataclass(frozen=True, slots=True)
class Storage:
    """The storage a schema uses, and why (logged at migration)."""

    kind: str
    reason: str
    extension_schema: str = ""  # where TimescaleDB's functions live


# GUCs only the preloaded TimescaleDB loader defines: readable without privileges, unlike
# `shared_preload_libraries`.
_LOADER_SETTINGS = ("timescaledb.disable_load", "timescaledb.bgw_launcher_poll_time")


async def _preloaded(conn: AsyncConnection) -> bool:
    try:
        async with conn.transaction():
            cur = await conn.execute("SELECT current_setting('shared_preload_libraries')")
            row = await cur.fetchone()
        libraries = [lib.strip().strip('"') for lib in str(row[0] if row else "").split(",")]
        return "timescaledb" in libraries
    except InsufficientPrivilege:
        cur = await conn.execute(
            "SELECT 1 FROM pg_settings WHERE name = ANY(%s)", (list(_LOADER_SETTINGS),)
        )
        return await cur.fetchone() is not None


async def _extension(conn: AsyncConnection) -> tuple[str, str] | None:
    """(version, schema) of the timescaledb extension in this database, if created."""
    cur = await conn.execute(
        "SELECT e.extversion, n.nspname FROM pg_extension e"
        " JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'timescaledb'"
    )
    row = await cur.fetchone()
    return (str(row[0]), str(row[1])) if row else None


async def _edition(conn: AsyncConnection) -> str:
    cur = await conn.execute("SELECT current_setting('timescaledb.license', true)")
    row = await cur.fetchone()
    return str(row[0]) if row and row[0] else "unknown"


async def choose_storage(conn: AsyncConnection) -> Storage:
    """TimescaleDB when it is usable here (created, or creatable, and preloaded); native
    partitioning otherwise. Creates the extension when it is available but not created."""
    cur = await conn.execute(
        "SELECT default_version FROM pg_available_extensions WHERE name = 'timescaledb'"
    )
    available = await cur.fetchone()
    created = await _extension(conn)
    if available is None and created is None:
        return Storage(PARTITIONED, "the timescaledb extension is not installed on the server")
    if not await _preloaded(conn):
        # Using the extension without its preloaded loader fails (and ends the session).
        return Storage(
            PARTITIONED,
            "the timescaledb extension is installed but not in shared_preload_libraries "
            "(add it there and restart PostgreSQL to use TimescaleDB)",
        )
    if created is None:
        try:
            async with conn.transaction():
                await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        except Exception as exc:
            return Storage(PARTITIONED, f"CREATE EXTENSION timescaledb failed: {_first_line(exc)}")
        created = await _extension(conn)
        if created is None:  # pragma: no cover - CREATE EXTENSION succeeded
            return Storage(PARTITIONED, "the timescaledb extension vanished after creation")
        how = "created"
    else:
        how = "already created"
    version, where = created
    edition = await _edition(conn)
    return Storage(
        TIMESCALEDB, f"timescaledb {version} ({edition} edition) {how} in this database", where
    )


async def _existing_storage(conn: AsyncConnection, schema: str, kind: str) -> Storage:
    if kind == PARTITIONED:
        return Storage(PARTITIONED, "the schema already uses native partitions")
    created = await _extension(conn)
    if created is None or not await _preloaded(conn):
        raise SchemaError(
            f"the audit schema {schema!r} is a TimescaleDB hypertable but the timescaledb "
            "extension is not usable in this database (not created, or not in "
            "shared_preload_libraries): restore it, or rebuild into native partitions "
            "with `dispatch projector --rebuild --swap` on a server without it"
        )
    return Storage(TIMESCALEDB, "the schema already uses a hypertable", created[1])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
            existing = await storage_of(conn, schema)
            storage = (
                await choose_storage(conn)
                if existing is None
                else await _existing_storage(conn, schema, existing)
            )
            await conn.execute(
                sql.SQL("CREATE SCHEMA IF NOT EXISTS {} AUTHORIZATION {}").format(
                    sql.Identifier(schema), owner
                )
            )
            await conn.execute(sql.SQL("SET LOCAL ROLE {}").format(owner))
            applied = await _apply_migrations(conn, schema, storage)
            await conn.execute(
                _q(
                    "INSERT INTO {s}.audit_settings (key, value) VALUES ('retention_days', %s)"
                    " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                    schema,
                ),
                (str(retention_days),),
            )
            await _grant(conn, schema, roles)
            await conn.execute("RESET ROLE")
    except SchemaError:
        raise
    except InsufficientPrivilege as exc:
        raise SchemaError(
            f"migrating the audit schema {schema!r} failed: {_first_line(exc)}. The migrating "
            "user (from DISPATCH_DATABASE_URL) must be a superuser or hold CREATEROLE and "
            "CREATE on the database"
        ) from exc
    except Exception as exc:
        raise SchemaError(
            f"migrating the audit schema {schema!r} failed ({type(exc).__name__}): "
            f"{_first_line(exc)}; nothing was changed"
        ) from exc
    # Only now, after the commit: a rolled-back migration was never applied.
    for version in applied:
        log.info(
            "projector.migration.applied schema=%s version=%d storage=%s",
            schema,
            version,
            storage.kind,
        )
    log.info(
        "projector.storage schema=%s storage=%s reason=%s", schema, storage.kind, storage.reason
    )
    return storage.kind


async def _apply_migrations(conn: AsyncConnection, schema: str, storage: Storage) -> list[int]:
    kind = storage.kind
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
    applied: list[int] = []
    for version, statements in enumerate(MIGRATIONS, start=1):
        if version <= current:
            continue
        for statement in statements:
            await conn.execute(_q(statement, schema))
        if version == 1:
            await _create_events(conn, schema, storage)
        await conn.execute(
            _q("INSERT INTO {s}.schema_migrations (version) VALUES (%s)", schema), (version,)
        )
        applied.append(version)
    # Functions are (re)created every time so their bodies follow the code.
    await conn.execute(_q(REFUSE_CHANGE, schema))
    await conn.execute(_q(sweep_function(kind, storage.extension_schema), schema))
    if kind == PARTITIONED:
        await conn.execute(_q(ENSURE_DAY, schema))
    else:
        await _protect_chunks(conn, schema, storage.extension_schema)
        await _remove_old_policy(conn, schema, storage.extension_schema)
    return applied


async def _remove_old_policy(conn: AsyncConnection, schema: str, extension_schema: str) -> None:
    """Earlier versions added a retention policy (licensed edition only): the sweep
    replaces it, and two mechanisms would cut without recording."""
    cur = await conn.execute(
        "SELECT count(*) FROM timescaledb_information.jobs WHERE proc_name = 'policy_retention'"
        " AND hypertable_schema = %s AND hypertable_name = 'events'",
        (schema,),
    )
    row = await cur.fetchone()
    if row and row[0]:
        await conn.execute(
            sql.SQL("SELECT {}.remove_retention_policy(%s::regclass)").format(
                sql.Identifier(extension_schema)
            ),
            (sql.Identifier(schema, "events").as_string(conn),),
        )
        log.info("projector.retention.policy_removed schema=%s (the sweep replaces it)", schema)


async def _protect_chunks(conn: AsyncConnection, schema: str, extension_schema: str) -> None:
    ts = '"' + extension_schema.replace('"', '""') + '"'
    await conn.execute(_q(PROTECT_CHUNKS.replace("{ts}", ts), schema))
    await conn.execute(_q("DROP TRIGGER IF EXISTS events_protect_chunks ON {s}.events", schema))
    await conn.execute(
        _q(
            "CREATE TRIGGER events_protect_chunks AFTER INSERT ON {s}.events"
            " FOR EACH STATEMENT EXECUTE FUNCTION {s}.protect_chunks()",
            schema,
        )
    )
    # Chunks made before this trigger existed (an earlier version's schema) get theirs now.
    cur = await conn.execute(
        sql.SQL(
            "SELECT c::text FROM {}.show_chunks(%s::regclass) AS c WHERE NOT EXISTS"
            " (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = c AND t.tgname = 'events_no_truncate')"
        ).format(sql.Identifier(extension_schema)),
        (sql.Identifier(schema, "events").as_string(conn),),
    )
    for (chunk,) in await cur.fetchall():
        await conn.execute(
            sql.SQL(
                "CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON {} FOR EACH STATEMENT"
                " EXECUTE FUNCTION {}.refuse_change()"
            ).format(sql.SQL(chunk), sql.Identifier(schema))
        )


async def _create_events(conn: AsyncConnection, schema: str, storage: Storage) -> None:
    if storage.kind == TIMESCALEDB:
        await conn.execute(_q("CREATE TABLE {s}.events (" + EVENT_COLUMNS + ")", schema))
        await conn.execute(
            sql.SQL(
                "SELECT {}.create_hypertable(%s::regclass, 'at',"
                " chunk_time_interval => interval '1 day')"
            ).format(sql.Identifier(storage.extension_schema)),
            (sql.Identifier(schema, "events").as_string(conn),),
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
    if await has_table(conn, schema, "quarantine"):
        statements.append(sql.SQL("GRANT INSERT ON {}.quarantine TO {}").format(s, writer))
    if await has_table(conn, schema, "ledger_gaps"):
        statements.append(sql.SQL("GRANT INSERT, UPDATE ON {}.ledger_gaps TO {}").format(s, writer))
    for function in ("refuse_change()", *DEFINERS):
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


async def has_table(conn: AsyncConnection, schema: str, table: str) -> bool:
    """Whether `schema.table` exists (an older or unprojected schema may lack it)."""
    cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f'"{schema}".{table}',))
    row = await cur.fetchone()
    return bool(row and row[0])


async def bind_functions(conn: AsyncConnection, schema: str) -> None:
    """Point the maintenance functions at `schema` (after a schema was renamed)."""
    for function in DEFINERS:
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


async def sweep_retention(conn: AsyncConnection, schema: str, kind: str = "") -> int:
    """Drop whole days past the retention (partitions or chunks: the function knows)."""
    cur = await conn.execute(_q("SELECT {s}.sweep_retention()", schema))
    row = await cur.fetchone()
    dropped = int(row[0]) if row else 0
    if dropped:
        log.info("projector.retention.swept schema=%s days_dropped=%d", schema, dropped)
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
