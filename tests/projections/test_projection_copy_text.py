"""The projector formats its COPY text itself: every character a text can hold arrives
in the audit tables exactly as it would through psycopg's own row dumping."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st
from projection_support import pg, record_refusal, running, wait_caught_up
from psycopg import sql

from config.settings import Settings
from ledger import lifecycle
from ledger.store import Ledger
from projections import copy_text, loadgen
from projections.text import pg_text
from projections.verify import verify
from projections.writer import _command_line, command_row
from schemas.commands import Ack, Command, CommandType, EdgeCommand, Target
from schemas.errors import ErrorCode, error
from schemas.events import (
    Authorized,
    Delivered,
    Executed,
    Failed,
    Issued,
    Rejected,
    Routed,
    TimedOut,
)

# What COPY TEXT must escape (backslash, TAB, LF, CR), what PostgreSQL cannot hold (NUL),
# JSON's own escapes (quote), and text that needs nothing (non-ASCII, U+2028, controls).
NASTY = 'a\tb\\c\nd\re"f\x00g žluť\u2028\x01 \\N \\.'


def _command(command_id: str, edge_id: str, source: str) -> Command:
    return Command(
        command_id=command_id,
        command_type=CommandType.SETPOINT,
        target=Target(edge_id=edge_id, device_id="bms_main", channel="ch1"),
        value=5,
        unit="k\tW",
        expiry_sec=3600,
        source=source,
        timestamp=datetime.now(UTC),
    )


@pytest.mark.parametrize("text", ["plain", "\\", "\t\n\r", NASTY, "\\N", "x\\"])
def test_copy_text_escapes_only_what_copy_needs(text: str) -> None:
    escaped = copy_text.text(text)
    assert "\t" not in escaped and "\n" not in escaped and "\r" not in escaped
    # Undoing COPY's escapes gives the storable text back.
    undone = escaped.replace("\\\\", "\x00").replace("\\t", "\t").replace("\\n", "\n")
    undone = undone.replace("\\r", "\r").replace("\x00", "\\")
    assert undone == pg_text(text)


async def test_texts_of_every_kind_are_stored_as_written(
    ledger: Ledger, settings: Settings
) -> None:
    await loadgen.connect(ledger, ["edge_00"], 0)
    command_id = "cmd_copy_text"
    await ledger.submit(
        _command(command_id, "edge_00", NASTY),
        actor="user:alice",
        grant="grant:can_control:*",
        gateway_id="test",
    )
    await ledger.acknowledge("edge_00", Ack(command_id=command_id, status="accepted"))
    await ledger.acknowledge(
        "edge_00",
        Ack(command_id=command_id, status="failed", error=error(ErrorCode.DEVICE_ERROR, NASTY)),
    )
    await record_refusal(ledger, f"anonymous {NASTY}", NASTY, excerpt=NASTY)
    async with running(ledger, settings):
        await wait_caught_up(settings, ledger.redis, ledger.keys)
    s = sql.Identifier(settings.namespace)
    conn = await pg(settings)
    try:
        cur = await conn.execute(
            sql.SQL(
                "SELECT source, unit, channel, error_message, status FROM {}.commands"
                " WHERE command_id = %s"
            ).format(s),
            (command_id,),
        )
        assert await cur.fetchone() == (
            pg_text(NASTY),
            "k\tW",
            "ch1",
            pg_text(NASTY),
            "failed",
        )
        cur = await conn.execute(
            sql.SQL(
                "SELECT actor, error_code, payload FROM {}.events WHERE chain = '#refusals'"
            ).format(s)
        )
        actor, code, payload = (await cur.fetchall())[0]
        assert (actor, code) == (pg_text(f"anonymous {NASTY}"), "malformed_json")
        # The payload is the ledger's bytes exactly (the hash chain covers them).
        logged = await ledger.redis.xrange(ledger.keys.audit(), "-", "+")
        assert payload.encode() == logged[0][1][b"e"]
        cur = await conn.execute(
            sql.SQL("SELECT payload FROM {}.events WHERE command_id = %s ORDER BY seq").format(s),
            (command_id,),
        )
        stored = [row[0].encode() for row in await cur.fetchall()]
        log = await ledger.redis.xrange(ledger.keys.log(ledger.keys.partition("edge_00")))
        assert stored == [fields[b"e"] for _, fields in log]
        result = await verify(conn, settings.namespace, commands=True)
        assert result.breaks == []
    finally:
        await conn.close()


def test_command_line_is_the_command_row_in_copy_text() -> None:
    """`_command_line` (the fast path) and `command_row` (what verify compares) agree."""
    for text in ("plain", NASTY, "tab\there"):
        edge_cmd = EdgeCommand(
            command_id="cmd_1",
            command_type=CommandType.SETPOINT,
            target=Target(edge_id="edge_00", device_id="bms_main", channel="ch1"),
            value=text,
            unit=text,
            expiry_sec=3600,
            source=text,
            timestamp=datetime(2026, 11, 30, tzinfo=UTC),
            expires_at=datetime(2026, 11, 30, 1, tzinfo=UTC),
        )
        head = {"command_id": "cmd_1", "edge_id": "edge_00", "actor": "user:a"}
        events = [
            Issued(at=1_795_000_000_000, event_id="e1", command=edge_cmd, digest="d", **head),
            Authorized(at=1_795_000_000_001, event_id="e2", grant=f"g {text}", **head),
            Failed(
                at=1_795_000_000_002,
                event_id="e3",
                error=error(ErrorCode.DEVICE_ERROR, text),
                executed_at=datetime(2026, 11, 30, 0, 0, 1, tzinfo=UTC),
                **head,
            ),
        ]
        state = lifecycle.replay(events)
        assert state is not None
        assert _command_line(state) == copy_text.row(command_row(state))


# Mostly texts COPY takes as they are (the direct path), sometimes any text at all.
_TEXT = st.sampled_from(["", "plain", "žluť 5"]) | st.text(max_size=12)
_AT = 1_795_000_000_000


@st.composite
def _states(draw: st.DrawFn) -> lifecycle.CommandState:
    """Folded states of every shape `_command_line` writes directly or hands over."""
    text = draw(_TEXT)
    edge_cmd = EdgeCommand(
        command_id="cmd_1",
        command_type=draw(st.sampled_from(list(CommandType))),
        target=Target(edge_id="edge_00", device_id="bms_main", channel=draw(_TEXT)),
        value=draw(st.one_of(st.booleans(), st.integers(), st.floats(allow_nan=False), _TEXT)),
        unit=draw(st.none() | _TEXT),
        expiry_sec=draw(st.integers(1, 86400)),
        source=text,
        timestamp=datetime(2026, 11, 30, tzinfo=UTC),
        priority=draw(st.sampled_from(["normal", "emergency"])),
        duration_sec=draw(st.none() | st.integers(1, 86400)),
        expires_at=datetime(2026, 11, 30, 1, tzinfo=UTC),
        actor=draw(_TEXT),
    )
    head = {"command_id": "cmd_1", "edge_id": "edge_00", "actor": "user:a"}
    err = error(ErrorCode.DEVICE_ERROR, draw(_TEXT))
    done = datetime(2026, 11, 30, 0, 0, 1, tzinfo=UTC)
    possible = [
        Issued(at=_AT, event_id="e1", command=edge_cmd, digest="d", **head),
        Authorized(at=_AT + 1, event_id="e2", grant=draw(_TEXT), **head),
        Routed(at=_AT + 2, event_id="e3", gateway="gw", delivery=draw(st.integers(1, 3)), **head),
        Delivered(at=_AT + 3, event_id="e4", **head),
        Executed(at=_AT + 4, event_id="e5", executed_at=draw(st.none() | st.just(done)), **head),
        Failed(at=_AT + 5, event_id="e6", error=err, executed_at=done, **head),
        Rejected(at=_AT + 6, event_id="e7", error=err, **head),
        TimedOut(at=_AT + 7, event_id="e8", error=err, routed_at=_AT + 2, **head),
    ]
    events = draw(st.lists(st.sampled_from(possible[1:]), unique_by=id))
    if draw(st.integers(0, 9)):  # nearly always with its `issued` event
        events.append(possible[0])
    if not events:
        events.append(possible[1])
    state = lifecycle.replay(events)
    assert state is not None
    return state


@given(_states())
def test_command_line_is_the_command_row_for_every_shape(state: lifecycle.CommandState) -> None:
    assert _command_line(state) == copy_text.row(command_row(state))
