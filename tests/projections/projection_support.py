"""Helpers for the projection tests: run projectors, wait for them, read logs and tables."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import AsyncConnection, sql
from redis.asyncio import Redis

from config.settings import Settings
from ledger.ids import new_event_id
from ledger.keys import Keys
from ledger.store import Ledger
from projections.schema import Roles
from projections.worker import Projector, ProjectorConfig
from schemas.errors import ErrorCode, error
from schemas.events import Rejected

NATIVE = "native"
TIMESCALE = "timescaledb"


@dataclass(frozen=True)
class StorageServer:
    """Where a parametrised projection test keeps its audit tables."""

    name: str  # NATIVE: the machine's PostgreSQL; TIMESCALE: the private cluster
    url: str  # the admin URL the projector migrates with


def drop_schemas(url: str, ns: str) -> None:
    """The namespace's schemas and roles on a private server (tests/support does the rest)."""
    with psycopg.connect(url, autocommit=True) as conn:
        for (name,) in conn.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname = %s OR nspname LIKE %s",
            (ns, ns + "\\_%"),
        ).fetchall():
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))
        for (role,) in conn.execute(
            "SELECT rolname FROM pg_roles WHERE rolname LIKE %s", (ns + "\\_%",)
        ).fetchall():
            conn.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def at_port(url: str, port: int) -> str:
    """`url` (user, database, options kept) on another port of its host."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@" if userinfo else ""
    return urlunsplit(parts._replace(netloc=f"{netloc}{parts.hostname or '127.0.0.1'}:{port}"))


def streams(keys: Keys) -> list[str]:
    return [keys.log(p) for p in keys.all_partitions()] + [keys.audit()]


async def log_ids(redis: Redis, keys: Keys) -> set[tuple[str, str]]:
    """Every (stream, entry id) the ledger holds."""
    out: set[tuple[str, str]] = set()
    for stream in streams(keys):
        start = "-"
        while True:
            rows: Any = await redis.xrange(stream, start, "+", count=5000)
            out.update((stream, r[0].decode()) for r in rows)
            if len(rows) < 5000:
                break
            start = "(" + rows[-1][0].decode()
    return out


async def log_ends(redis: Redis, keys: Keys) -> dict[str, str]:
    ends = {}
    for stream in streams(keys):
        rows: Any = await redis.xrevrange(stream, "+", "-", count=1)
        if rows:
            ends[stream] = rows[0][0].decode()
    return ends


def _key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


async def pg(settings: Settings) -> AsyncConnection:
    return await AsyncConnection.connect(settings.database_url, autocommit=True)


async def scalar(conn: AsyncConnection, statement: str, *args: Any, schema: str = "") -> Any:
    query = sql.SQL(statement).format(s=sql.Identifier(schema)) if schema else statement
    cur = await conn.execute(query, args or None)  # type: ignore[arg-type]
    row = await cur.fetchone()
    return row[0] if row else None


async def positions(conn: AsyncConnection, schema: str) -> dict[str, str]:
    try:
        cur = await conn.execute(
            sql.SQL("SELECT stream, entry_id FROM {}.positions").format(sql.Identifier(schema))
        )
    except psycopg.errors.UndefinedTable:
        return {}
    return {s: e for s, e in await cur.fetchall()}


async def wait_caught_up(
    settings: Settings, redis: Redis, keys: Keys, *, schema: str = "", timeout_s: float = 60
) -> None:
    """Until every stream's stored position reaches its log's last entry (as of now)."""
    schema = schema or settings.namespace
    ends = await log_ends(redis, keys)
    conn = await pg(settings)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            stored = await positions(conn, schema)
            if all(s in stored and _key(stored[s]) >= _key(e) for s, e in ends.items()):
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"projection not caught up after {timeout_s} s: {stored} vs {ends}")
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def running(
    ledger: Ledger, settings: Settings, count: int = 1, **config: Any
) -> AsyncIterator[list[Projector]]:
    """`count` in-process projectors sharing the namespace's partitions."""
    projectors = [
        Projector(
            ledger,
            settings.database_url,
            ProjectorConfig(rebalance_interval_s=0.3, **config),
            owner=f"test-projector-{i}",
        )
        for i in range(count)
    ]
    tasks = [asyncio.create_task(p.run()) for p in projectors]
    try:
        yield projectors
    finally:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for r in results:
            if isinstance(r, Exception) and not isinstance(r, asyncio.CancelledError):
                raise r


def roles(settings: Settings) -> Roles:
    return Roles.for_prefix(settings.namespace)


async def record_refusal(ledger: Ledger, actor: str, message: str, *, excerpt: str = "") -> None:
    """One gateway refusal of malformed input (chain `#refusals`), at a fixed time."""
    await ledger.record_rejection(
        Rejected(
            event_id=new_event_id(),
            at=1_795_000_000_000,
            command_id="",
            edge_id="",
            actor=actor,
            error=error(ErrorCode.MALFORMED_JSON, message),
            stage="gateway",
            input_excerpt=excerpt,
        )
    )
