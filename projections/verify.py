"""`dispatch audit verify`: recompute the hash chains and name the first broken link.

Each chain (an edge's events, or the gateway's refusals) is read in `seq` order. A link
is sound when its hash covers its own bytes and place, it follows the previous link
(seq + 1, `prev_hash` = the previous hash), and the columns queries use (status, actor,
time, ids, error code) say what its stored payload says. The chain head kept by the
projector must be the last link: a shorter chain means rows were deleted at the end.
Retention drops whole days (partitions or chunks, the same on either storage) and records
where it cut each chain (`chain_cuts`): a chain may start later than seq 1 only right
after its recorded cut (the horizon check), so deleting its oldest links is caught.

With `commands=True` the `commands` rows (a mutable current-state view) are also
re-derived from the verified events and compared.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
from psycopg import AsyncConnection, sql

from ledger import lifecycle
from ledger.store import EVENT_DECODER, to_utc
from projections import quarantine
from projections.schema import GENESIS, REFUSALS_CHAIN, storage_of
from projections.text import pg_text
from projections.writer import COMMAND_FIELDS, command_row, link_hash
from schemas.events import Event, status_of

log = logging.getLogger("projections.verify")

ROW_FIELDS = (
    "event_id, at, chain, seq, command_id, edge_id, status, actor, error_code, stream,"
    " entry_id, payload, prev_hash, hash"
)
_COMMAND_COLUMNS = [c.strip() for c in COMMAND_FIELDS.split(",")]
_JSON_COLUMNS = {"value", "state"}


@dataclass(frozen=True, slots=True)
class Break:
    chain: str
    seq: int
    event_id: str
    reason: str

    def line(self) -> str:
        edge = "gateway refusals" if self.chain == REFUSALS_CHAIN else f"edge {self.chain}"
        return f"{edge}: seq {self.seq} (event {self.event_id or '-'}): {self.reason}"


@dataclass
class Verification:
    chains: int = 0
    events: int = 0
    commands: int = 0
    breaks: list[Break] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.breaks


@dataclass
class _Link:
    seq: int
    hash: str


def _derived_mismatch(row: dict[str, Any], event: Event) -> str | None:
    err = getattr(event, "error", None)
    expected = {
        "event_id": event.event_id,
        "at": to_utc(event.at),
        "command_id": event.command_id,
        "edge_id": event.edge_id,
        "status": status_of(event).value,
        "actor": event.actor,
        "error_code": err.code if err is not None else None,
    }
    for column, raw in expected.items():
        # Derived text columns hold NUL escaped (docs/audit.md).
        value = pg_text(raw) if isinstance(raw, str) else raw
        if row[column] != value:
            return f"column {column} is {row[column]!r} but the hashed payload says {value!r}"
    if row["chain"] != REFUSALS_CHAIN and row["chain"] != pg_text(event.edge_id):
        return (
            f"stored in the chain of edge {row['chain']!r} but the payload names {event.edge_id!r}"
        )
    return None


def horizon_problem(seq: int, prev: str, cut: _Link | None) -> str | None:
    """Where a chain's stored links may begin: at seq 1 (genesis), or only right after
    the retention cut recorded for it (rows at or below the cut may linger, e.g. in the
    default partition). Anything later means its oldest links were deleted."""
    if cut is not None and seq == cut.seq + 1:
        return None if prev == cut.hash else "prev_hash does not match the retention cut"
    if cut is not None and seq <= cut.seq:
        return None  # its successors were dropped by the retention sweep
    if cut is None and seq == 1:
        return None if prev == GENESIS else "first link does not start from the genesis hash"
    after = cut.seq if cut is not None else 0
    return f"links {after + 1}..{seq - 1} are missing"


class _ChainCheck:
    """One chain, link by link; remembers only its first break."""

    def __init__(self, chain: str, cut: _Link | None, *, keep: bool = False) -> None:
        self.chain = chain
        self.keep = keep  # keep the decoded events (to re-derive the commands)
        self.cut = cut
        self.last: _Link | None = None
        self.broken: Break | None = None
        self.events: list[Event] = []

    def check(self, row: dict[str, Any]) -> None:
        if self.broken is not None:
            return
        seq, event_id = int(row["seq"]), row["event_id"]
        payload: str = row["payload"]
        recomputed = link_hash(
            row["prev_hash"],
            row["chain"],
            seq,
            stream=row["stream"],
            entry_id=row["entry_id"],
            payload=payload.encode(),
        )
        if recomputed != row["hash"]:
            self._break(seq, event_id, "content altered: its hash does not match its content")
            return
        reason = self._link_problem(seq, row["prev_hash"])
        if reason is not None:
            self._break(seq, event_id, reason)
            return
        try:
            event = EVENT_DECODER.decode(payload)
        except Exception as exc:
            self._break(seq, event_id, f"payload is not a lifecycle event ({exc})")
            return
        mismatch = _derived_mismatch(row, event)
        if mismatch is not None:
            self._break(seq, event_id, mismatch)
            return
        if self.keep:
            self.events.append(event)
        self.last = _Link(seq, row["hash"])

    def _link_problem(self, seq: int, prev: str) -> str | None:
        last, cut = self.last, self.cut
        if last is not None and seq == last.seq:
            return f"seq {seq} appears twice"
        if last is not None and seq == last.seq + 1:
            return None if prev == last.hash else "prev_hash does not match the previous link"
        if last is None or (cut is not None and seq <= cut.seq + 1):
            return horizon_problem(seq, prev, cut)
        return f"links {last.seq + 1}..{seq - 1} are missing"

    def close(self, head: _Link | None) -> None:
        if self.broken is not None or head is None:
            return
        last = self.last
        if last is None:
            if self.cut is None or head.seq > self.cut.seq:
                self._break(head.seq, "", f"the chain head says {head.seq} links, none are stored")
            return
        if head.seq > last.seq:
            self._break(
                last.seq + 1,
                "",
                f"links {last.seq + 1}..{head.seq} after the last stored are missing",
            )
        elif (head.seq, head.hash) != (last.seq, last.hash):
            self._break(last.seq, "", "the chain head does not match the last stored link")

    def _break(self, seq: int, event_id: str, reason: str) -> None:
        self.broken = Break(self.chain, seq, event_id, reason)


async def _rows(
    conn: AsyncConnection, schema: str, chain: str | None
) -> AsyncIterator[dict[str, Any]]:
    from psycopg.rows import dict_row  # noqa: PLC0415

    where = sql.SQL("WHERE chain = %s") if chain is not None else sql.SQL("")
    statement = sql.SQL("SELECT " + ROW_FIELDS + " FROM {s}.events {w} ORDER BY chain, seq").format(
        s=sql.Identifier(schema), w=where
    )
    async with (
        conn.transaction(),
        conn.cursor(name="audit_verify", row_factory=dict_row) as cur,
    ):
        cur.itersize = 2000
        await cur.execute(statement, [chain] if chain is not None else None)
        async for row in cur:
            yield row


async def _links(conn: AsyncConnection, schema: str, table: str) -> dict[str, _Link]:
    cur = await conn.execute(
        sql.SQL("SELECT chain, seq, hash FROM {}.{}").format(
            sql.Identifier(schema), sql.Identifier(table)
        )
    )
    return {c: _Link(int(n), h) for c, n, h in await cur.fetchall()}


async def verify(
    conn: AsyncConnection, schema: str, *, chain: str | None = None, commands: bool = False
) -> Verification:
    """Check every chain (or one edge's); see the module docstring."""
    storage = await storage_of(conn, schema)
    if storage is None:
        raise LookupError(f"schema {schema!r} has no audit tables; start `dispatch projector`")
    heads = await _links(conn, schema, "chains")
    cuts = await _links(conn, schema, "chain_cuts")
    result = Verification()
    current: _ChainCheck | None = None
    seen: set[str] = set()

    async def finish(check: _ChainCheck) -> None:
        check.close(heads.get(check.chain))
        if check.broken is not None:
            result.breaks.append(check.broken)
        elif commands and check.chain != REFUSALS_CHAIN:
            result.commands += await _check_commands(conn, schema, check, result)

    async for row in _rows(conn, schema, chain):
        result.events += 1
        if current is None or row["chain"] != current.chain:
            if current is not None:
                await finish(current)
            current = _ChainCheck(row["chain"], cuts.get(row["chain"]), keep=commands)
            seen.add(current.chain)
            result.chains += 1
        current.check(row)
    if current is not None:
        await finish(current)
    for name in sorted(heads):
        if name not in seen and (chain is None or name == chain):
            check = _ChainCheck(name, cuts.get(name))
            result.chains += 1
            await finish(check)
    for b in result.breaks:
        log.warning(
            "audit.verify.broken chain=%s seq=%d event_id=%s reason=%s",
            b.chain,
            b.seq,
            b.event_id,
            b.reason,
        )
    return result


def _expected(column: str, value: Any) -> Any:
    """A `command_row` value as psycopg reads it back (JSON columns come decoded)."""
    if column in _JSON_COLUMNS and isinstance(value, str):
        return msgspec.json.decode(value)
    return value


async def _check_commands(
    conn: AsyncConnection, schema: str, check: _ChainCheck, result: Verification
) -> int:
    """Compare an edge's `commands` rows with a fold of its verified events."""
    from psycopg.rows import dict_row  # noqa: PLC0415

    by_command: dict[str, list[Event]] = {}
    for event in check.events:
        by_command.setdefault(event.command_id, []).append(event)
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            sql.SQL("SELECT {} FROM {}.commands WHERE edge_id = %s").format(
                sql.SQL(", ").join(map(sql.Identifier, _COMMAND_COLUMNS)), sql.Identifier(schema)
            ),
            [check.chain],
        )
        stored = {r["command_id"]: r for r in await cur.fetchall()}
    checked = 0
    for command_id, events in sorted(by_command.items()):
        state = lifecycle.replay(events)
        if state is None or state.command is None:
            continue  # its `issued` event is past retention: nothing complete to compare
        checked += 1
        row = stored.get(pg_text(command_id))  # stored ids are escaped like all text
        if row is None:
            result.breaks.append(Break(check.chain, 0, "", f"command {command_id} has no row"))
            return checked
        expected = dict(zip(_COMMAND_COLUMNS, command_row(state), strict=True))
        for column in _COMMAND_COLUMNS:
            if _expected(column, expected[column]) != row[column]:
                result.breaks.append(
                    Break(
                        check.chain,
                        0,
                        "",
                        f"command {command_id}: column {column} is {row[column]!r} but its "
                        f"events say {expected[column]!r}",
                    )
                )
                return checked
    return checked


async def quarantine_gaps(conn: AsyncConnection, schema: str) -> list[quarantine.Held]:
    """Log entries the projector quarantined: named gaps in the history, never hidden.

    They break no chain (a quarantined entry never got a link), so they are reported
    beside the chain check rather than as a broken link.
    """
    gaps = await quarantine.held(conn, schema)
    for gap in gaps:
        log.warning(
            "audit.verify.gap stream=%s entry=%s kind=%s reason=%s",
            gap.stream,
            gap.entry_id,
            gap.kind,
            gap.reason,
        )
    return gaps
