"""Tamper evidence: the writer role cannot change history; verify finds what a superuser did."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import psycopg
import pytest
from projection_support import pg, roles, running, scalar, wait_caught_up
from psycopg import errors, sql

from dispatch.settings import Settings
from ledger.ids import new_event_id
from ledger.store import Ledger
from projections import loadgen, schema
from projections.verify import verify
from projections.worker import Database
from schemas.events import Authorized

from support import Processes


async def projected(ledger: Ledger, settings: Settings, count: int = 120) -> list[loadgen.Planned]:
    plans = await loadgen.generate(ledger, range(count))
    async with running(ledger, settings):
        await wait_caught_up(settings, ledger.redis, ledger.keys)
    return plans


def admin(settings: Settings) -> psycopg.Connection[Any]:
    return psycopg.connect(settings.database_url, autocommit=True)


def parts(conn: psycopg.Connection[Any], schema: str) -> list[str]:
    """The day partitions or TimescaleDB chunks of `events` (both are its children)."""
    rows = conn.execute(
        "SELECT inhrelid::regclass::text FROM pg_inherits WHERE inhparent = %s::regclass"
        " ORDER BY 1",
        (sql.Identifier(schema, "events").as_string(conn),),
    ).fetchall()
    return [str(r[0]) for r in rows]


def login_url(settings: Settings, role: str) -> str:
    """The database URL with `role` as the user (trust authentication on the test server)."""
    scheme, rest = settings.database_url.split("://", 1)
    return f"{scheme}://{role}@{rest.split('@', 1)[-1]}"


async def test_the_projector_role_cannot_change_or_unprotect_audit_rows(
    ledger: Ledger, settings: Settings
) -> None:
    await projected(ledger, settings)
    s = sql.Identifier(settings.namespace)
    writer = roles(settings).writer
    with admin(settings) as conn:
        owner = conn.execute(
            "SELECT tableowner FROM pg_tables WHERE schemaname = %s AND tablename = 'events'",
            (settings.namespace,),
        ).fetchone()
        assert owner is not None and owner[0] == roles(settings).owner != writer
        part = parts(conn, settings.namespace)[0]
        # The deployment with least privilege: the projector logs in as the writer role.
        conn.execute(sql.SQL("ALTER ROLE {} LOGIN").format(sql.Identifier(writer)))
    with psycopg.connect(login_url(settings, writer), autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (writer,)
        before = conn.execute(sql.SQL("SELECT count(*) FROM {}.events").format(s)).fetchone()
        for statement in (
            "UPDATE {}.events SET status = 'executed' WHERE status = 'rejected'",
            "DELETE FROM {}.events WHERE status = 'rejected'",
            "TRUNCATE {}.events",
            "ALTER TABLE {}.events DISABLE TRIGGER ALL",
            "DROP TABLE {}.events",
            f"UPDATE {part} SET status = 'x'",
            f"TRUNCATE {part}",
            "UPDATE {}.chain_cuts SET seq = 0",
            "SET ROLE " + roles(settings).owner,
            "SET session_replication_role = replica",
        ):
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute(sql.SQL(statement).format(s))
        after = conn.execute(sql.SQL("SELECT count(*) FROM {}.events").format(s)).fetchone()
        assert before == after and before is not None and before[0] > 0
        # What it may do: append, and run the retention policy (nothing is old enough).
        assert conn.execute(sql.SQL("SELECT {}.sweep_retention()").format(s)).fetchone() == (0,)


async def test_triggers_refuse_even_a_superuser_and_verify_names_an_altered_row(
    ledger: Ledger, settings: Settings, processes: Processes
) -> None:
    plans = await projected(ledger, settings)
    s = sql.Identifier(settings.namespace)
    with admin(settings) as conn:
        for statement in (
            "UPDATE {}.events SET status = 'executed' WHERE status = 'rejected'",
            "DELETE FROM {}.events",
            "TRUNCATE {}.events",
        ):
            with pytest.raises(errors.InsufficientPrivilege, match="append-only"):
                conn.execute(sql.SQL(statement).format(s))
        # Each day partition / chunk refuses TRUNCATE on its own too (they do not inherit
        # the parent's statement trigger; TimescaleDB creates chunks as rows arrive).
        children = parts(conn, settings.namespace)
        assert children
        for child in children:
            with pytest.raises(errors.InsufficientPrivilege, match="append-only"):
                conn.execute(sql.SQL("TRUNCATE {}").format(sql.SQL(child)))
    ok = processes.dispatch("verify-ok", "audit", "verify", "--commands")
    assert ok.popen.wait(60) == 0, ok.log()
    assert "audit chain intact" in ok.log() and "120 command rows" in ok.log()

    # A superuser who switches triggers off rewrites an edge rejection into an execution.
    rejected = next(p for p in plans if p.status == "rejected")
    with admin(settings) as conn:
        conn.execute("SET session_replication_role = replica")
        row = conn.execute(
            sql.SQL(
                "UPDATE {}.events SET status = 'executed', payload = replace(payload,"
                ' \'"status":"rejected"\', \'"status":"executed"\') WHERE command_id = %s'
                " AND status = 'rejected' RETURNING event_id, chain, seq"
            ).format(s),
            (rejected.command_id,),
        ).fetchone()
    assert row is not None
    event_id, chain, seq = row
    bad = processes.dispatch("verify-bad", "audit", "verify")
    assert bad.popen.wait(60) == 1
    out = bad.log()
    assert "audit chain BROKEN" in out
    assert f"edge {chain}: seq {seq} (event {event_id}): content altered" in out
    # Other edges' chains are intact.
    other = next(p.edge_id for p in plans if p.edge_id != chain)
    good = processes.dispatch("verify-edge", "audit", "verify", "--edge", other)
    assert good.popen.wait(60) == 0, good.log()


async def test_verify_finds_deleted_links_and_rewritten_command_rows(
    ledger: Ledger, settings: Settings
) -> None:
    plans = await projected(ledger, settings)
    s = sql.Identifier(settings.namespace)
    edges = sorted({p.edge_id for p in plans if p.status == "executed"})
    middle, last, view, oldest = edges[0], edges[1], edges[2], edges[3]
    with admin(settings) as conn:
        conn.execute("SET session_replication_role = replica")
        # The oldest links, with no retention cut recorded: the horizon check finds them.
        conn.execute(
            sql.SQL("DELETE FROM {}.events WHERE chain = %s AND seq <= 2").format(s), (oldest,)
        )
        conn.execute(
            sql.SQL("DELETE FROM {}.events WHERE chain = %s AND seq = 5").format(s), (middle,)
        )
        conn.execute(
            sql.SQL(
                "DELETE FROM {}.events WHERE chain = %s AND seq = (SELECT max(seq) FROM {}.events"
                " WHERE chain = %s)"
            ).format(s, s),
            (last, last),
        )
    # The commands table is a mutable view the projector role may update: verify re-derives it.
    executed = next(p for p in plans if p.edge_id == view and p.status == "executed")
    conn2 = await Database(settings.database_url, roles(settings)).connect_writer("test")
    try:
        await conn2.execute(
            sql.SQL("UPDATE {}.commands SET status = 'failed' WHERE command_id = %s").format(s),
            (executed.command_id,),
        )
    finally:
        await conn2.close()
    conn = await pg(settings)
    try:
        result = await verify(conn, settings.namespace, commands=True)
    finally:
        await conn.close()
    reasons = {b.chain: b.reason for b in result.breaks}
    assert reasons[middle] == "links 5..5 are missing"
    assert "after the last stored are missing" in reasons[last]
    assert reasons[view].startswith(f"command {executed.command_id}: column status is 'failed'")
    assert reasons[oldest] == "links 1..2 are missing"
    assert len(result.breaks) == 4


def old_event(edge: str, at: datetime, n: int) -> bytes:
    event = Authorized(
        at=int(at.timestamp() * 1000),
        event_id=new_event_id(),
        command_id=f"old_{n}",
        edge_id=edge,
        actor="user:old",
        grant="grant:can_control:*",
    )
    return msgspec.json.encode(event)


async def test_retention_drops_old_days_and_verify_accepts_the_cut(
    ledger: Ledger, settings: Settings
) -> None:
    edge = "edge_00"
    stream = ledger.keys.log(ledger.keys.partition(edge))
    old_day = datetime.now(UTC) - timedelta(days=10)
    for n in range(5):  # appended first: the oldest links of the edge's chain
        await ledger.redis.xadd(stream, {"e": old_event(edge, old_day, n)})
    plans = await loadgen.generate(ledger, range(40))
    async with running(ledger, settings, retention_days=5):
        await wait_caught_up(settings, ledger.redis, ledger.keys)
    s = settings.namespace
    old = "SELECT count(*) FROM {s}.events WHERE at < now() - interval '5 days'"
    conn = await Database(settings.database_url, roles(settings)).connect_writer("test")
    try:
        assert await scalar(conn, old, schema=s) == 5
        before = await scalar(conn, "SELECT count(*) FROM {s}.events", schema=s)
        # The old events' commands are projected too (issued ten days ago).
        commands = "SELECT count(*) FROM {s}.commands"
        assert await scalar(conn, commands, schema=s) == len(plans) + 5
        # The writer role runs the policy through its SECURITY DEFINER function: one whole
        # day (a partition, or a chunk) goes, whatever the storage.
        assert await schema.sweep_retention(conn, s) == 1
        assert await scalar(conn, old, schema=s) == 0
        assert await scalar(conn, "SELECT count(*) FROM {s}.events", schema=s) == before - 5
        assert await scalar(conn, commands, schema=s) == len(plans)
        cut = await conn.execute(
            sql.SQL("SELECT chain, seq FROM {}.chain_cuts").format(sql.Identifier(s))
        )
        assert await cut.fetchall() == [(edge, 5)]
        sweeps = await conn.execute(
            sql.SQL(
                "SELECT parts_dropped, commands_deleted, horizon > %s FROM {}.retention_cuts"
            ).format(sql.Identifier(s)),
            (old_day,),
        )
        assert await sweeps.fetchall() == [(1, 5, True)]
        result = await verify(conn, s, commands=True)
        assert result.ok, result.breaks
        assert result.commands == len(plans)
        # A sweep again changes nothing; today's days are untouched.
        assert await schema.sweep_retention(conn, s) == 0
        assert await scalar(conn, "SELECT count(*) FROM {s}.events", schema=s) == before - 5
    finally:
        await conn.close()
    with admin(settings) as sa:
        sa.execute("SET session_replication_role = replica")
        sa.execute(
            sql.SQL("DELETE FROM {}.events WHERE chain = %s AND seq = 6").format(sql.Identifier(s)),
            (edge,),
        )
    conn = await pg(settings)
    try:
        result = await verify(conn, s, chain=edge)
        assert [b.reason for b in result.breaks] == ["links 6..6 are missing"]
    finally:
        await conn.close()


async def test_projector_runs_with_only_the_writer_login(
    ledger: Ledger, settings: Settings, processes: Processes
) -> None:
    migrate = processes.dispatch("migrate", "projector", "--migrate")
    assert migrate.popen.wait(60) == 0, migrate.log()
    writer = roles(settings).writer
    with admin(settings) as conn:
        conn.execute(sql.SQL("ALTER ROLE {} LOGIN").format(sql.Identifier(writer)))
    url = login_url(settings, writer)
    # No admin credentials at all: both URLs are the writer's login.
    processes.dispatch(
        "projector",
        "projector",
        env={"DISPATCH_DATABASE_URL": url, "DISPATCH_PROJECTOR_DATABASE_URL": url},
    )
    plans = await loadgen.generate(ledger, range(200))
    await wait_caught_up(settings, ledger.redis, ledger.keys, timeout_s=60)
    conn = await pg(settings)
    try:
        assert await scalar(
            conn, "SELECT count(*) FROM {s}.commands", schema=settings.namespace
        ) == len(plans)
        users = await scalar(
            conn,
            "SELECT array_agg(DISTINCT usename) FROM pg_stat_activity WHERE application_name"
            " LIKE %s",
            f"dispatch-projector:{settings.namespace}:%",
        )
        assert users == [writer]
        assert (await verify(conn, settings.namespace, commands=True)).ok
    finally:
        await conn.close()
