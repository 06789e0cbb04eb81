"""Which storage the audit schema gets, and why: TimescaleDB only when it is usable."""

from __future__ import annotations

import logging

import pytest
import timescale
from projection_support import (
    NATIVE,
    StorageServer,
    drop_schemas,
    pg,
    roles,
    running,
    scalar,
    wait_caught_up,
)
from psycopg import AsyncConnection, errors, sql

from dispatch.settings import Settings
from ledger.store import Ledger
from projections import loadgen, schema
from projections.verify import verify


def storage_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "projections.schema"]


async def test_the_storage_is_the_usable_one_and_the_log_says_why(
    ledger: Ledger,
    settings: Settings,
    storage: StorageServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="projections.schema")
    if storage.name == NATIVE:
        conn = await pg(settings)
        try:
            if await scalar(
                conn, "SELECT count(*) FROM pg_available_extensions WHERE name = 'timescaledb'"
            ):
                pytest.skip("the test server itself has TimescaleDB: no native case to test")
        finally:
            await conn.close()
    await loadgen.generate(ledger, range(20))
    async with running(ledger, settings) as projectors:
        await wait_caught_up(settings, ledger.redis, ledger.keys)
    kind = projectors[0].storage
    lines = storage_lines(caplog)
    if storage.name == NATIVE:
        # The machine's PostgreSQL has no TimescaleDB at all.
        assert kind == schema.PARTITIONED
        assert any(
            "storage=partitioned reason=the timescaledb extension is not installed" in line
            for line in lines
        ), lines
    else:
        # The Apache edition: no policies, no LOGIN owner, yet a hypertable with retention.
        assert kind == schema.TIMESCALEDB
        assert any(
            "storage=timescaledb reason=timescaledb 2.28.3 (apache edition)" in line
            for line in lines
        ), lines
    assert sum("migration.applied" in line for line in lines) == len(schema.MIGRATIONS)
    conn = await pg(settings)
    try:
        assert await schema.storage_of(conn, settings.namespace) == kind
        if kind == schema.TIMESCALEDB:
            assert await scalar(
                conn,
                "SELECT count(*) FROM timescaledb_information.hypertables"
                " WHERE hypertable_schema = %s AND hypertable_name = 'events'",
                settings.namespace,
            )
            assert not await scalar(conn, "SELECT count(*) FROM timescaledb_information.jobs"
                                    " WHERE hypertable_schema = %s", settings.namespace)  # fmt: skip
        owner_login = await scalar(
            conn, "SELECT rolcanlogin FROM pg_roles WHERE rolname = %s", roles(settings).owner
        )
        assert owner_login is False
        assert (await verify(conn, settings.namespace, commands=True)).ok
        if kind == schema.TIMESCALEDB:
            # A chunk from before chunks were protected gets its trigger at the next migration.
            chunk = await scalar(
                conn, "SELECT c::text FROM show_chunks(%s::regclass) c LIMIT 1",
                f'"{settings.namespace}".events',
            )  # fmt: skip
            drop = sql.SQL("DROP TRIGGER events_no_truncate ON {}").format(sql.SQL(chunk))
            await conn.execute(drop)
            await schema.migrate(conn, settings.namespace, roles(settings))
            with pytest.raises(errors.InsufficientPrivilege, match="append-only"):
                await conn.execute(sql.SQL("TRUNCATE {}").format(sql.SQL(chunk)))
    finally:
        await conn.close()


async def test_a_failed_migration_names_its_cause_and_is_not_logged_as_applied(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="projections.schema")
    conn = await AsyncConnection.connect(settings.database_url, autocommit=True)
    try:
        s, owner = sql.Identifier(settings.namespace), sql.Identifier(roles(settings).owner)
        # Something already sits where the audit tables go (the owner's, so no permission
        # is missing).
        await conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(owner))
        await conn.execute(sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(s, owner))
        await conn.execute(sql.SQL("CREATE TABLE {}.positions (x int)").format(s))
        await conn.execute(sql.SQL("ALTER TABLE {}.positions OWNER TO {}").format(s, owner))
        with pytest.raises(schema.SchemaError) as failed:
            await schema.migrate(conn, settings.namespace, roles(settings))
        message = str(failed.value)
        assert 'DuplicateTable): relation "positions" already exists' in message
        assert "superuser" not in message and "CREATEROLE" not in message
        assert not any("migration.applied" in line for line in storage_lines(caplog))
        assert await scalar(
            conn, "SELECT to_regclass(%s) IS NULL", f'"{settings.namespace}".commands'
        )
    finally:
        await conn.close()


async def test_timescaledb_installed_but_not_preloaded_falls_back_to_native_partitions(
    timescale_clusters: timescale.Clusters, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="projections.schema")
    cluster = timescale_clusters.start(preload=False)
    conn = await AsyncConnection.connect(cluster.url, autocommit=True)
    try:
        assert await scalar(
            conn, "SELECT count(*) FROM pg_available_extensions WHERE name = 'timescaledb'"
        )
        kind = await schema.migrate(conn, namespace, schema.Roles.for_prefix(namespace))
        assert kind == schema.PARTITIONED
        # The session survived: nothing tried to load the extension.
        assert await scalar(conn, "SELECT 1") == 1
        assert not await scalar(
            conn, "SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'"
        )
    finally:
        await conn.close()
        drop_schemas(cluster.url, namespace)
        cluster.stop()
    lines = storage_lines(caplog)
    assert any(
        "storage=partitioned reason=the timescaledb extension is installed but not in "
        "shared_preload_libraries" in line
        for line in lines
    ), lines
