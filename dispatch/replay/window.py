"""The recorded window: an edge's commands issued in [from, to] and every event they had.

Only reads the live namespace: the edge's partition log (XRANGE), or the projected audit
tables when retention has trimmed the log past the window's start. Both give the same
thing, the window's commands and their lifecycle events in log order, which is what the
schedule derives its order from and the report compares against.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
import psycopg
from psycopg import sql
from redis import exceptions as redis_errors

from dispatch.settings import Settings
from ledger import lifecycle
from ledger.store import EVENT_DECODER, Ledger
from schemas.commands import EdgeCommand
from schemas.events import Event, Issued, status_of

PAGE = 1000


class ReplayError(RuntimeError):
    """The replay cannot run; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class Outcome:
    status: str
    error_code: str | None = None

    def text(self) -> str:
        return f"{self.status} ({self.error_code})" if self.error_code else self.status


@dataclass(frozen=True, slots=True)
class Step:
    """One lifecycle event of a command, as the report shows it."""

    status: str
    at_ms: int
    error_code: str | None = None
    message: str | None = None

    @classmethod
    def of(cls, event: Event) -> Step:
        err = getattr(event, "error", None)
        return cls(
            status_of(event).value,
            event.at,
            getattr(err, "code", None),
            getattr(err, "message", None),
        )


@dataclass(frozen=True, slots=True)
class Recorded:
    command: EdgeCommand
    issued_ms: int
    entry_id: str
    outcome: Outcome
    steps: tuple[Step, ...] = ()


@dataclass(frozen=True, slots=True)
class Window:
    """The window's commands (in issue order) and all their events in log order."""

    commands: list[Recorded]
    timeline: list[Event]
    source: str  # "ledger" or "audit tables"


def outcome_of(events: Iterable[Event]) -> Outcome | None:
    state = lifecycle.replay(events)
    if state is None or state.status is None:
        return None
    err = state.error
    return Outcome(state.status.value, err.code if err else None)


def build(
    rows: Sequence[tuple[str, Event]], edge_id: str, start_ms: int, end_ms: int
) -> tuple[list[Recorded], list[Event]]:
    """The commands issued to the edge in [start, end] and their events, from ordered rows."""
    issued: dict[str, tuple[str, Issued]] = {}
    for entry, event in rows:
        if (
            isinstance(event, Issued)
            and event.edge_id == edge_id
            and start_ms <= event.at <= end_ms
            and event.command_id not in issued
        ):
            issued[event.command_id] = (entry, event)
    timeline = [event for _, event in rows if event.command_id in issued]
    by_command: dict[str, list[Event]] = {cid: [] for cid in issued}
    for event in timeline:
        by_command[event.command_id].append(event)
    commands = []
    for cid, (entry, event) in issued.items():
        events = by_command[cid]
        outcome = outcome_of(events) or Outcome("unknown")
        steps = tuple(Step.of(e) for e in events)
        commands.append(Recorded(event.command, event.at, entry, outcome, steps))
    commands.sort(key=lambda r: (r.issued_ms, r.entry_id))
    return commands, timeline


async def read_ledger(ledger: Ledger, edge_id: str, start_ms: int, end_ms: int) -> Window:
    """The window from the edge's partition log: everything from its start to the log's end."""
    stream = ledger.keys.log(ledger.keys.partition(edge_id))
    rows: list[tuple[str, Event]] = []
    cursor = f"{start_ms}-0"
    while True:
        page: Any = await ledger.redis.xrange(stream, cursor, "+", count=PAGE)
        for entry_raw, fields in page:
            raw = fields.get(b"e")
            if raw is not None:
                rows.append((entry_raw.decode(), EVENT_DECODER.decode(raw)))
        if len(page) < PAGE:
            break
        cursor = "(" + page[-1][0].decode()
    commands, timeline = build(rows, edge_id, start_ms, end_ms)
    return Window(commands, timeline, "ledger")


async def log_covers(ledger: Ledger, edge_id: str, start_ms: int) -> bool:
    """Whether the edge's partition log still holds everything from `start_ms` on.

    Retention trims from the head: the window is intact when nothing was ever removed,
    or when the first entry left is no later than the window's start.
    """
    stream = ledger.keys.log(ledger.keys.partition(edge_id))
    try:
        info: Any = await ledger.redis.xinfo_stream(stream)
    except redis_errors.ResponseError:
        return False  # no such stream (never written, or deleted)
    if int(info.get("entries-added", 0)) == int(info.get("length", 0)):
        return True
    first = info.get("first-entry")
    if not first:
        return False
    entry = first[0].decode() if isinstance(first[0], bytes) else str(first[0])
    return int(entry.partition("-")[0]) <= start_ms


async def read_audit(settings: Settings, edge_id: str, start: datetime, end: datetime) -> Window:
    """The window from the projected history: every stored event of its commands."""
    statement = sql.SQL(
        "SELECT e.entry_id, e.payload FROM {s}.events e WHERE e.command_id IN ("
        " SELECT i.command_id FROM {s}.events i WHERE i.chain = %s AND i.status = 'issued'"
        " AND i.at >= %s AND i.at <= %s) ORDER BY e.seq"
    ).format(s=sql.Identifier(settings.namespace))
    try:
        async with await psycopg.AsyncConnection.connect(
            settings.database_url, autocommit=True
        ) as conn:
            cur = await conn.execute(statement, (edge_id, start, end))
            found = await cur.fetchall()
    except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName):
        found = []  # nothing was ever projected
    except psycopg.Error as exc:
        raise ReplayError(
            f"the ledger's log no longer reaches back to {iso(start)} and the audit tables "
            f"cannot be read ({str(exc).strip()}); check DISPATCH_DATABASE_URL"
        ) from None
    rows = [(str(entry), EVENT_DECODER.decode(_bytes(payload))) for entry, payload in found]
    start_ms = int(start.timestamp() * 1000)
    end_ms = int(end.timestamp() * 1000)
    commands, timeline = build(rows, edge_id, start_ms, end_ms)
    return Window(commands, timeline, "audit tables")


def _bytes(payload: Any) -> bytes:
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload)
    if isinstance(payload, str):
        return payload.encode()
    return msgspec.json.encode(payload)  # a jsonb column arrives decoded


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso_ms(ms: int) -> str:
    return iso(datetime.fromtimestamp(ms / 1000, UTC))
