"""Quarantine: log entries the projector cannot decode or store, kept instead of lost.

An entry goes here (raw bytes, reason, stream, entry id, time) in the same transaction
that moves the stream's position past it, so it is neither projected twice nor skipped
in silence: the projector logs `projector.event.quarantined`, counts it in
`dispatch_projector_quarantined_total`, and `dispatch audit verify` names it as a gap.
Only failures an entry can cause are blamed on it (bad data, values out of range); a
database that is down or refuses the writer role is retried, never quarantined.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec
import psycopg
from prometheus_client import CollectorRegistry, start_http_server
from psycopg import AsyncConnection, sql

from config.metrics import Declare
from projections.schema import has_table
from projections.text import pg_text

log = logging.getLogger("projections.quarantine")

REGISTRY = CollectorRegistry(auto_describe=True)
declare = Declare(REGISTRY)
QUARANTINED = declare.counter(
    "dispatch_projector_quarantined",
    "Log entries this projector could not decode or store and quarantined, by kind",
    "kind",
)

UNDECODABLE = "undecodable"
UNSTORABLE = "unstorable"


class Quarantined(msgspec.Struct, frozen=True):
    """One log entry held back: its stream and id, its raw fields, which kind and why."""

    stream: str
    entry_id: str
    raw: bytes
    kind: str
    reason: str


@dataclass(frozen=True, slots=True)
class Held:
    """A quarantined entry as `dispatch audit verify` reports it."""

    stream: str
    entry_id: str
    kind: str
    reason: str
    quarantined_at: datetime
    size: int

    def line(self) -> str:
        return (
            f"stream {self.stream} entry {self.entry_id} ({self.kind}, {self.size} bytes, "
            f"quarantined {self.quarantined_at.isoformat(timespec='seconds')}): {self.reason}"
        )


def raw_fields(fields: Any) -> bytes:
    """The bytes to keep of an entry: its `e` field, else all its fields as name=value lines."""
    if not fields:
        return b""
    raw = fields.get(b"e")
    if raw is not None:
        return bytes(raw)
    return b"\n".join(bytes(k) + b"=" + bytes(v) for k, v in fields.items())


def undecodable(stream: str, entry_id: str, fields: Any, exc: BaseException | str) -> Quarantined:
    return Quarantined(stream, entry_id, raw_fields(fields), UNDECODABLE, reason_of(exc))


def reason_of(exc: BaseException | str) -> str:
    if isinstance(exc, str):
        return pg_text(exc)
    text = str(exc).strip().splitlines()
    return pg_text(f"{type(exc).__name__}: {text[0] if text else ''}"[:500])


# Errors an entry's content can cause. Anything else (connection lost, permission
# refused, a missing table) is the database's fault: retry, do not quarantine.
_BLAMED = (
    psycopg.DataError,
    psycopg.IntegrityError,
    msgspec.MsgspecError,
    ValueError,
    TypeError,
    OverflowError,
    KeyError,
    AttributeError,
)


def blames_entry(exc: BaseException) -> bool:
    if isinstance(exc, psycopg.errors.UniqueViolation):
        return False  # handled by the writer (an event id stored already)
    return isinstance(exc, _BLAMED)


async def store(conn: AsyncConnection, schema: str, held: Sequence[Quarantined]) -> None:
    """Insert inside the caller's transaction (with the position that passes them)."""
    if not held:
        return
    async with conn.cursor() as cur:
        await cur.executemany(
            sql.SQL(
                "INSERT INTO {}.quarantine (stream, entry_id, raw, kind, reason)"
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING"
            ).format(sql.Identifier(schema)),
            [(q.stream, q.entry_id, q.raw, q.kind, q.reason) for q in held],
        )


async def count(conn: AsyncConnection, schema: str) -> int | None:
    """Entries held in `schema`'s quarantine; None when the schema has no such table."""
    if not await has_table(conn, schema, "quarantine"):
        return None
    cur = await conn.execute(
        sql.SQL("SELECT count(*) FROM {}.quarantine").format(sql.Identifier(schema))
    )
    row = await cur.fetchone()
    return int(row[0]) if row else None


def alarm(held: Sequence[Quarantined]) -> None:
    """After the commit: one alarm line and one count per quarantined entry."""
    for q in held:
        QUARANTINED.labels(q.kind).inc()
        log.error(
            "projector.event.quarantined stream=%s entry=%s kind=%s bytes=%d reason=%s",
            q.stream,
            q.entry_id,
            q.kind,
            len(q.raw),
            q.reason,
        )


async def held(conn: AsyncConnection, schema: str) -> list[Held]:
    """Every quarantined entry, oldest first (none when the table does not exist yet)."""
    if not await has_table(conn, schema, "quarantine"):
        return []
    cur = await conn.execute(
        sql.SQL(
            "SELECT stream, entry_id, kind, reason, quarantined_at, length(raw)"
            " FROM {}.quarantine ORDER BY quarantined_at, stream, entry_id"
        ).format(sql.Identifier(schema))
    )
    return [Held(*r) for r in await cur.fetchall()]


def serve_metrics(port: int, host: str = "127.0.0.1") -> None:
    """Serve this process's counters at http://host:port/metrics (Prometheus text)."""
    start_http_server(port, addr=host, registry=REGISTRY)
    log.info("projector.metrics.serving address=%s:%d", host, port)
