"""Write a batch of ledger events into the audit tables in one transaction.

The batch, the per-command rows it changes and the stream position it reaches commit
together, so each event applies once however often the projector crashes and re-reads
(see eventsourcing's projections). Events go in with COPY; commands are re-folded with
the same pure state machine the gateway uses, so a rebuild equals the incremental result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from psycopg import AsyncConnection, sql
from psycopg.types.json import Jsonb

from ledger import lifecycle
from ledger.store import EVENT_DECODER, to_utc
from schemas.events import Event, Rejected, Status, status_of

_encode = msgspec.json.Encoder().encode
_to_builtins = msgspec.to_builtins


@dataclass(frozen=True, slots=True)
class Entry:
    stream: str
    entry_id: str
    event: Event
    raw: bytes


def entry_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class StreamMoved(RuntimeError):
    """Another projector advanced this stream's position first (lease lost)."""


def _q(statement: str, schema: str) -> sql.Composed:
    return sql.SQL(statement).format(s=sql.Identifier(schema))


async def apply_batch(
    conn: AsyncConnection, schema: str, stream: str, entries: Sequence[Entry]
) -> int:
    """Project `entries` (one stream, in order); returns how many were new."""
    if not entries:
        return 0
    async with conn.transaction():
        cur = await conn.execute(
            _q("SELECT entry_id FROM {s}.positions WHERE stream = %s FOR UPDATE", schema), (stream,)
        )
        row = await cur.fetchone()
        done = entry_key(row[0]) if row else (-1, -1)
        fresh = [e for e in entries if entry_key(e.entry_id) > done]
        if not fresh:
            return 0
        await _copy_events(conn, schema, fresh)
        commands = [
            e for e in fresh if not (isinstance(e.event, Rejected) and e.event.stage == "gateway")
        ]
        if commands:
            await _fold_commands(conn, schema, commands)
        last = fresh[-1].entry_id
        if row is None:
            await conn.execute(
                _q("INSERT INTO {s}.positions (stream, entry_id) VALUES (%s, %s)", schema),
                (stream, last),
            )
        else:
            await conn.execute(
                _q(
                    "UPDATE {s}.positions SET entry_id = %s, updated_at = now() WHERE stream = %s",
                    schema,
                ),
                (last, stream),
            )
    return len(fresh)


async def _copy_events(conn: AsyncConnection, schema: str, entries: Sequence[Entry]) -> None:
    await conn.execute(
        _q(
            "CREATE TEMP TABLE IF NOT EXISTS incoming_events (LIKE {s}.events_template) "
            "ON COMMIT DELETE ROWS",
            schema,
        )
    )
    async with conn.cursor().copy(
        "COPY incoming_events (event_id, at, command_id, edge_id, status, actor, stream,"
        " entry_id, error_code, payload) FROM STDIN"
    ) as copy:
        for e in entries:
            ev = e.event
            err = getattr(ev, "error", None)
            await copy.write_row(
                (
                    ev.event_id,
                    to_utc(ev.at),
                    ev.command_id,
                    ev.edge_id,
                    status_of(ev).value,
                    ev.actor,
                    e.stream,
                    e.entry_id,
                    err.code if err is not None else None,
                    e.raw.decode(),
                )
            )
    await conn.execute(
        _q(
            "INSERT INTO {s}.events SELECT * FROM incoming_events ORDER BY at "
            "ON CONFLICT DO NOTHING",
            schema,
        )
    )


async def _fold_commands(conn: AsyncConnection, schema: str, entries: Sequence[Entry]) -> None:
    ids = sorted({e.event.command_id for e in entries})
    cur = await conn.execute(
        _q(
            "SELECT command_id, state FROM {s}.commands WHERE command_id = ANY(%s) FOR UPDATE",
            schema,
        ),
        (ids,),
    )
    states: dict[str, lifecycle.CommandState] = {}
    for command_id, stored in await cur.fetchall():
        events = [EVENT_DECODER.decode(_encode(v)) for v in stored.values()]
        folded = lifecycle.replay(events)
        if folded is not None:
            states[command_id] = folded
    for e in entries:
        ev = e.event
        state = states.get(ev.command_id) or lifecycle.CommandState(
            command_id=ev.command_id, edge_id=ev.edge_id
        )
        states[ev.command_id] = lifecycle.fold(state, ev)
    rows = [_row(s) for s in states.values() if s.status is not None]
    async with conn.cursor() as cur2:
        await cur2.executemany(_q(UPSERT, schema), rows)


UPSERT = (
    "INSERT INTO {s}.commands (command_id, edge_id, command_type, device_id, channel, value,"
    " unit, priority, source, actor, status, error_code, error_message, late, deliveries,"
    " issued_at, routed_at, delivered_at, finished_at, expires_at, state, updated_at)"
    " VALUES (%(command_id)s, %(edge_id)s, %(command_type)s, %(device_id)s, %(channel)s,"
    " %(value)s, %(unit)s, %(priority)s, %(source)s, %(actor)s, %(status)s, %(error_code)s,"
    " %(error_message)s, %(late)s, %(deliveries)s, %(issued_at)s, %(routed_at)s,"
    " %(delivered_at)s, %(finished_at)s, %(expires_at)s, %(state)s, now())"
    " ON CONFLICT (command_id) DO UPDATE SET"
    " edge_id = EXCLUDED.edge_id, command_type = EXCLUDED.command_type,"
    " device_id = EXCLUDED.device_id, channel = EXCLUDED.channel, value = EXCLUDED.value,"
    " unit = EXCLUDED.unit, priority = EXCLUDED.priority, source = EXCLUDED.source,"
    " actor = EXCLUDED.actor, status = EXCLUDED.status, error_code = EXCLUDED.error_code,"
    " error_message = EXCLUDED.error_message, late = EXCLUDED.late,"
    " deliveries = EXCLUDED.deliveries, issued_at = EXCLUDED.issued_at,"
    " routed_at = EXCLUDED.routed_at, delivered_at = EXCLUDED.delivered_at,"
    " finished_at = EXCLUDED.finished_at, expires_at = EXCLUDED.expires_at,"
    " state = EXCLUDED.state, updated_at = now()"
)


def _ts(state: lifecycle.CommandState, status: Status) -> Any:
    at = state.at(status)
    return to_utc(at) if at is not None else None


def _row(state: lifecycle.CommandState) -> dict[str, Any]:
    cmd = state.command
    err = state.error
    final = state.status if state.status in lifecycle.TERMINAL else None
    return {
        "command_id": state.command_id,
        "edge_id": state.edge_id,
        "command_type": cmd.command_type.value if cmd else None,
        "device_id": cmd.target.device_id if cmd else None,
        "channel": cmd.target.channel if cmd else None,
        "value": Jsonb(cmd.value) if cmd else None,
        "unit": cmd.unit if cmd else None,
        "priority": cmd.priority if cmd else None,
        "source": cmd.source if cmd else None,
        "actor": cmd.actor if cmd else None,
        "status": state.status.value if state.status else None,
        "error_code": err.code if err else None,
        "error_message": err.message if err else None,
        "late": state.late,
        "deliveries": state.deliveries,
        "issued_at": _ts(state, Status.ISSUED),
        "routed_at": _ts(state, Status.ROUTED),
        "delivered_at": _ts(state, Status.DELIVERED),
        "finished_at": _ts(state, final) if final else None,
        "expires_at": cmd.expires_at if cmd else None,
        "state": Jsonb({s.value: _to_builtins(ev) for s, ev in state.firsts.items()}),
    }
