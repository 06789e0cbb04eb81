"""The projector formats its COPY text itself: every character a text can hold arrives
in the audit tables exactly as it would through psycopg's own row dumping."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
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
from schemas.events import Authorized, Failed, Issued

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
