"""Write a batch of ledger events into the audit tables in one transaction.

The batch, the command rows it changes, the hash-chain heads it extends and the stream
position it reaches commit together, so each event applies once however often the
projector crashes and re-reads (see eventsourcing's projections). The position in
PostgreSQL is the truth: a batch is applied from the stored position on, and entries the
consumer group handed to someone else in between are fetched from the log first, so a
lease that changed hands mid-read can neither skip nor repeat an entry.

Events go in with COPY; commands are re-folded with the same pure state machine the
gateway uses, and the chain is computed in log order, so a rebuild equals the
incremental result byte for byte.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import msgspec
from msgspec import structs
from psycopg import AsyncConnection, sql
from psycopg.errors import UniqueViolation

from ledger import lifecycle
from ledger.records import to_utc as _to_utc
from projections import copy_text, quarantine
from projections import schema as schema_mod
from projections.quarantine import Quarantined
from projections.schema import GENESIS, REFUSALS_CHAIN
from projections.text import pg_text, pg_value
from schemas.events import EVENT_TYPES, AnyEvent, Event, Issued, Status

log = logging.getLogger("projections.writer")
_sha256 = hashlib.sha256
_timestamp = copy_text.timestamp
_NULL = copy_text.NULL
_NO_LINK = (0, GENESIS)

_encode = msgspec.json.Encoder().encode
# Hot path (several calls per event): the tag of each event type, and times by the ms.
_STATUS = {cls: status.value for status, cls in EVENT_TYPES.items()}
to_utc = functools.lru_cache(maxsize=8192)(_to_utc)
STATE_DECODER = msgspec.json.Decoder(dict[Status, AnyEvent])
START = "0-0"  # position before the first entry of any stream


class Entry(msgspec.Struct, frozen=True, gc=False):
    """One decoded log entry (made for every event: built in C, never tracked by the
    cycle collector)."""

    stream: str
    entry_id: str
    event: Event
    raw: bytes


@dataclass(frozen=True, slots=True)
class Gap:
    """Log entries read to close a gap; `reached` is the last entry id examined."""

    entries: list[Entry]
    complete: bool
    reached: str
    ids: list[str] = field(default_factory=list)  # every entry examined, decodable or not
    bad: list[Quarantined] = field(default_factory=list)  # undecodable ones among them


# Entries of `stream` strictly after `after` and strictly before `before` ('+': the end).
Fetch = Callable[[str, str, str], Awaitable[Gap]]


def entry_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def link_hash(
    prev: str, chain: str, seq: int, *, stream: str, entry_id: str, payload: bytes
) -> str:
    """The hash of one chain link: the previous hash, the event's place and its bytes."""
    return _sha256(f"{prev}\n{chain}\n{seq}\n{stream}\n{entry_id}\n".encode() + payload).hexdigest()


@functools.lru_cache(maxsize=4096)
def _chain_in(edge_id: str, refusals: bool, stream: str) -> tuple[str, bool]:
    """The chain of an event of `edge_id` read from `stream` (an edge's events form one
    chain; gateway refusals, of any or no edge, another), and whether the chain and the
    stream need no COPY escape. Cached: a few edges, thousands of events per batch."""
    chain = REFUSALS_CHAIN if refusals else pg_text(edge_id)
    return chain, copy_text.clean(chain, stream)


@dataclass(frozen=True, slots=True)
class Applied:
    new: int  # events stored by this batch
    position: str  # the stream position now stored
    filled: int = 0  # entries fetched from the log to close a gap
    quarantined: list[Quarantined] = field(default_factory=list)


def _q(statement: str, schema: str) -> sql.Composed:
    return sql.SQL(statement).format(s=sql.Identifier(schema))


EVENT_FIELDS = (
    "event_id, at, chain, seq, command_id, edge_id, status, actor, error_code, stream,"
    " entry_id, payload, prev_hash, hash"
)
COMMAND_FIELDS = (
    "command_id, edge_id, command_type, device_id, channel, value, unit, priority,"
    " duration_sec, expiry_sec, client_timestamp, source, actor, grant_basis, status, final,"
    " error_code, error_message, late, deliveries, issued_at, routed_at, delivered_at,"
    " finished_at, executed_at, expires_at, state"
)
_UPDATE_COMMAND = ", ".join(
    f"{c.strip()} = EXCLUDED.{c.strip()}" for c in COMMAND_FIELDS.split(",")[1:]
)

_prepared: weakref.WeakSet[AsyncConnection] = weakref.WeakSet()


@dataclass
class Writer:
    """Applies batches for one schema over one connection (the projector's writer role)."""

    conn: AsyncConnection
    schema: str
    storage: str
    days: set[date] = field(default_factory=set)

    async def apply(
        self,
        stream: str,
        entries: Sequence[Entry],
        fetch: Fetch,
        *,
        refusals: bool = False,
        bad: Sequence[Quarantined] = (),
    ) -> Applied:
        """Project `entries` of `stream` (in any order) from the stored position on;
        `bad` entries go to the quarantine table in the same transaction."""
        applied = await self._apply(stream, entries, fetch, refusals, bad=bad)
        quarantine.alarm(applied.quarantined)
        return applied

    async def catch_up(self, stream: str, fetch: Fetch, *, refusals: bool = False) -> Applied:
        """Project what the log holds after the stored position (one bounded step)."""
        applied = await self._apply(stream, (), fetch, refusals, to_end=True)
        quarantine.alarm(applied.quarantined)
        return applied

    async def position(self, stream: str) -> str:
        """The stream's stored position (no lock)."""
        cur = await self.conn.execute(
            _q("SELECT entry_id FROM {s}.positions WHERE stream = %s", self.schema), (stream,)
        )
        row = await cur.fetchone()
        return str(row[0]) if row else START

    async def _apply(
        self,
        stream: str,
        entries: Sequence[Entry],
        fetch: Fetch,
        refusals: bool,
        *,
        to_end: bool = False,
        bad: Sequence[Quarantined] = (),
    ) -> Applied:
        conn, s = self.conn, self.schema
        await self._prepare()
        async with conn.transaction():
            done = await self._lock_position(stream)
            after = entry_key(done)
            keyed = [(k, e) for e in entries if (k := entry_key(e.entry_id)) > after]
            keyed.sort(key=_first)
            fresh = [e for _, e in keyed]
            held = sorted(
                (q for q in bad if entry_key(q.entry_id) > after),
                key=lambda q: entry_key(q.entry_id),
            )
            # Both are sorted: their first and last entries bound the batch.
            ends = [x.entry_id for x in (*fresh[:1], *fresh[-1:])]
            ends += [q.entry_id for q in (*held[:1], *held[-1:])]
            if not ends and not to_end:
                return Applied(0, done)
            first = min(ends, key=entry_key) if ends else "+"
            gap = await fetch(stream, done, first)
            if gap.reached == done and not ends:
                return Applied(0, done)
            if gap.entries and fresh:
                log.info(
                    "projector.gap.filled stream=%s after=%s count=%d",
                    stream,
                    done,
                    len(gap.entries),
                )
            # A long gap is applied on its own; the rest follows in the next batch.
            whole = gap.complete and bool(ends)
            last = max(ends, key=entry_key) if whole else gap.reached
            batch = _unique([*gap.entries, *fresh] if whole else gap.entries)
            quarantined = [*gap.bad, *held] if whole else gap.bad
            await quarantine.store(conn, s, quarantined)
            days = await self._ensure_days(batch)
            stored = await self._store_events(stream, batch, refusals)
            if not refusals:
                await self._fold_commands(stored)
            await conn.execute(
                _q(
                    "UPDATE {s}.positions SET entry_id = %s, updated_at = now() WHERE stream = %s",
                    s,
                ),
                (last, stream),
            )
        self.days |= days  # only once the partitions are committed
        return Applied(len(stored), last, len(gap.entries), quarantined)

    async def _lock_position(self, stream: str) -> str:
        """The stream's stored position, row-locked: one writer per stream at a time."""
        select = _q("SELECT entry_id FROM {s}.positions WHERE stream = %s FOR UPDATE", self.schema)
        row = await (await self.conn.execute(select, (stream,))).fetchone()
        if row is None:
            # First batch of this stream: a concurrent first writer makes this wait.
            await self.conn.execute(
                _q(
                    "INSERT INTO {s}.positions (stream, entry_id) VALUES (%s, %s)"
                    " ON CONFLICT DO NOTHING",
                    self.schema,
                ),
                (stream, START),
            )
            row = await (await self.conn.execute(select, (stream,))).fetchone()
        return str(row[0]) if row else START

    async def _prepare(self) -> None:
        if self.conn in _prepared:
            return
        # Session-private staging table for the commands upsert (emptied at each commit).
        await self.conn.execute(
            _q(
                "CREATE TEMP TABLE IF NOT EXISTS incoming_commands"
                " (LIKE {s}.commands INCLUDING DEFAULTS) ON COMMIT DELETE ROWS",
                self.schema,
            )
        )
        _prepared.add(self.conn)

    async def _ensure_days(self, batch: Sequence[Entry]) -> set[date]:
        # The distinct ms values first: a batch holds far fewer of them than events.
        days = {schema_mod.utc_day(to_utc(at)) for at in {e.event.at for e in batch}} - self.days
        for day in sorted(days):
            # Inside the batch's transaction: a new partition commits with its rows.
            await schema_mod.ensure_day(self.conn, self.schema, self.storage, day)
        return days

    async def _store_events(self, stream: str, batch: list[Entry], refusals: bool) -> list[Entry]:
        """COPY the batch, extending each chain; returns the entries actually stored."""
        conn, s = self.conn, self.schema
        chains = sorted({_chain_in(e.event.edge_id, refusals, stream)[0] for e in batch})
        cur = await conn.execute(
            _q("SELECT chain, seq, hash FROM {s}.chains WHERE chain = ANY(%s) FOR UPDATE", s),
            (chains,),
        )
        heads: dict[str, tuple[int, str]] = {c: (int(n), h) for c, n, h in await cur.fetchall()}
        while True:
            links = dict(heads)
            # One write of the whole batch in COPY text (projections/copy_text.py).
            data = "".join([_event_line(e, refusals, links) for e in batch]).encode()
            try:
                # Straight into the partitioned table; a savepoint undoes the lot if an
                # event id is stored already (then those events are dropped and it retries).
                async with (
                    conn.transaction(),
                    conn.cursor().copy(
                        _q("COPY {s}.events (" + EVENT_FIELDS + ") FROM STDIN", s)
                    ) as copy,
                ):
                    await copy.write(data)
            except UniqueViolation:
                batch = await self._without_stored(batch)
                continue
            break
        if links:
            names = sorted(links)
            await conn.execute(
                _q(
                    "INSERT INTO {s}.chains (chain, seq, hash)"
                    " SELECT * FROM unnest(%s::text[], %s::bigint[], %s::text[])"
                    " ON CONFLICT (chain) DO UPDATE SET seq = EXCLUDED.seq,"
                    " hash = EXCLUDED.hash, updated_at = now()",
                    s,
                ),
                (names, [links[c][0] for c in names], [links[c][1] for c in names]),
            )
        return batch

    async def _without_stored(self, batch: list[Entry]) -> list[Entry]:
        """Drop events whose id is stored already: idempotent by event id, chain intact."""
        ats = [to_utc(e.event.at) for e in batch]
        cur = await self.conn.execute(
            _q(
                "SELECT event_id FROM {s}.events WHERE event_id = ANY(%s) AND at BETWEEN %s AND %s",
                self.schema,
            ),
            ([e.event.event_id for e in batch], min(ats), max(ats)),
        )
        known = {r[0] for r in await cur.fetchall()}
        log.warning("projector.events.already_stored count=%d", len(known))
        return [e for e in batch if e.event.event_id not in known]

    async def _fold_commands(self, batch: Sequence[Entry]) -> None:
        conn, s = self.conn, self.schema
        ids = sorted({pg_text(e.event.command_id) for e in batch if e.event.command_id})
        if not ids:
            return
        cur = await conn.execute(
            _q(
                "SELECT command_id, state::text, deliveries FROM {s}.commands"
                " WHERE command_id = ANY(%s)",
                s,
            ),
            (ids,),
        )
        states: dict[str, lifecycle.CommandState] = {}
        stored_ids: set[str] = set()
        for command_id, stored, deliveries in await cur.fetchall():
            stored_ids.add(command_id)
            folded = lifecycle.replay(STATE_DECODER.decode(stored).values())
            if folded is not None:
                # `firsts` keeps one event per status: the redelivery count lives apart.
                states[command_id] = structs.replace(
                    folded, deliveries=max(folded.deliveries, int(deliveries))
                )
        for e in batch:
            ev = e.event
            if not ev.command_id:
                continue
            key = pg_text(ev.command_id)  # the stored (escaped) id
            state = states.get(key) or lifecycle.CommandState(
                command_id=ev.command_id, edge_id=ev.edge_id
            )
            states[key] = lifecycle.fold(state, ev)
        fresh: list[str] = []
        known: list[str] = []
        for key, st in states.items():
            if st.status is not None:
                (known if key in stored_ids else fresh).append(_command_line(st))
        if fresh and not await self._insert_commands("".join(fresh)):
            known += fresh
        if known:
            await self._upsert_commands("".join(known))

    async def _insert_commands(self, rows: str) -> bool:
        """COPY rows of commands not stored yet straight into the table (no staging, no
        conflict check); False, with nothing written, when one is stored after all."""
        try:
            async with (
                self.conn.transaction(),
                self.conn.cursor().copy(
                    _q("COPY {s}.commands (" + COMMAND_FIELDS + ") FROM STDIN", self.schema)
                ) as copy,
            ):
                await copy.write(rows.encode())
        except UniqueViolation:
            log.warning("projector.commands.already_stored; upserting the batch's new ones")
            return False
        return True

    async def _upsert_commands(self, rows: str) -> None:
        conn, s = self.conn, self.schema
        async with conn.cursor().copy(
            "COPY incoming_commands (" + COMMAND_FIELDS + ") FROM STDIN"
        ) as copy:
            await copy.write(rows.encode())
        await conn.execute(
            _q(
                "INSERT INTO {s}.commands ("
                + COMMAND_FIELDS
                + ") SELECT "
                + COMMAND_FIELDS
                + " FROM incoming_commands ON CONFLICT (command_id) DO UPDATE SET "
                + _UPDATE_COMMAND
                + ", updated_at = now()",
                s,
            )
        )


def _first(pair: tuple[tuple[int, int], Entry]) -> tuple[int, int]:
    return pair[0]


def _unique(entries: list[Entry]) -> list[Entry]:
    seen: set[str] = set()
    out: list[Entry] = []
    for e in entries:
        if e.event.event_id in seen:
            log.warning(
                "projector.event.repeated event_id=%s entry=%s", e.event.event_id, e.entry_id
            )
            continue
        seen.add(e.event.event_id)
        out.append(e)
    return out


def _event_line(e: Entry, refusals: bool, links: dict[str, tuple[int, str]]) -> str:
    """One `events` row (EVENT_FIELDS order) in COPY text, extending its chain in `links`."""
    ev = e.event
    stream, raw = e.stream, e.raw
    chain, clean = _chain_in(ev.edge_id, refusals, stream)
    seq, prev = links.get(chain, _NO_LINK)
    seq += 1
    digest = link_hash(prev, chain, seq, stream=stream, entry_id=e.entry_id, payload=raw)
    links[chain] = (seq, digest)
    err = getattr(ev, "error", None)
    code = err.code if err is not None else None
    if clean and b"\\" not in raw:
        # Without an escape in the event's JSON none of its texts needs one in COPY.
        texts: tuple[str, ...] = (ev.event_id, chain, ev.command_id, ev.edge_id, ev.actor, stream)
    else:
        # Rare: the JSON escapes something (a control character, NUL, backslash, quote...).
        texts = tuple(
            copy_text.text(v)
            for v in (ev.event_id, chain, ev.command_id, ev.edge_id, ev.actor, stream)
        )
        code = copy_text.text(code) if code is not None else None
    event_id, chain_text, command_id, edge_id, actor, stream_text = texts
    # `payload` keeps the ledger's bytes (valid JSON holds no NUL byte: its escapes stay).
    return (
        f"{event_id}\t{_timestamp(ev.at)}\t{chain_text}\t{seq}\t{command_id}\t"
        f"{edge_id}\t{_STATUS[ev.__class__]}\t{actor}\t{_NULL if code is None else code}"
        f"\t{stream_text}\t{e.entry_id}\t{copy_text.json_text(raw)}\t{prev}\t{digest}\n"
    )


def _storable(row: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(pg_text(v) if isinstance(v, str) else v for v in row)


def _ts(state: lifecycle.CommandState, status: Status | None, stamp: Stamp) -> Any:
    at = state.at(status) if status is not None else None
    return stamp(at) if at is not None else None


Stamp = Callable[[int], Any]  # a ledger time (ms) as a row value


def command_row(state: lifecycle.CommandState, *, stamp: Stamp = to_utc) -> tuple[Any, ...]:
    """One `commands` row (COMMAND_FIELDS order) from the folded state; the ledger's
    times (ms) as `stamp` renders them (a datetime, or COPY text)."""
    cmd = state.command
    err = state.error
    status = state.status
    final = status if status in lifecycle.TERMINAL else None
    authorized = state.firsts.get(Status.AUTHORIZED)
    outcome = state.firsts.get(status) if status is not None else None
    # Without its `issued` event (a log trimmed before a rebuild) the earliest event stands in.
    issued_ms = state.at(Status.ISSUED) or min(e.at for e in state.firsts.values())
    value = _encode(cmd.value).decode() if cmd else None
    folded = _encode(dict(sorted(state.firsts.items()))).decode()  # keys as their values
    row = (
        state.command_id,
        state.edge_id,
        cmd.command_type.value if cmd else None,
        cmd.target.device_id if cmd else None,
        cmd.target.channel if cmd else None,
        value,
        cmd.unit if cmd else None,
        cmd.priority if cmd else None,
        cmd.duration_sec if cmd else None,
        cmd.expiry_sec if cmd else None,
        cmd.timestamp if cmd else None,
        cmd.source if cmd else None,
        cmd.actor if cmd else None,
        getattr(authorized, "grant", None),
        status.value if status else None,
        final is not None,
        err.code if err else None,
        err.message if err else None,
        state.late,
        state.deliveries,
        stamp(issued_ms),
        _ts(state, Status.ROUTED, stamp),
        _ts(state, Status.DELIVERED, stamp),
        _ts(state, final, stamp),
        getattr(outcome, "executed_at", None),
        cmd.expires_at if cmd else None,
        folded,
    )
    # Every text of the command is in its folded state: one search finds an escaped NUL.
    if "\\u0000" not in folded:
        return row
    row = _storable(row)
    return (*row[:5], _pg_json(value), *row[6:-1], _pg_json(folded))


def _command_line(state: lifecycle.CommandState) -> str:
    """`command_row` in COPY text (one per command per batch: written out directly; the
    general path for a command without its `issued` event or with texts to escape)."""
    firsts = state.firsts
    issued = firsts.get(Status.ISSUED)
    folded = _encode(dict(sorted(firsts.items()))).decode()
    # Every text of the row is in the folded state's JSON, where a character COPY must
    # escape (backslash, TAB, LF, CR) or cannot hold (NUL) always shows as an escape.
    if not isinstance(issued, Issued) or "\\" in folded:
        row = command_row(state, stamp=copy_text.timestamp)
        return copy_text.row(row, clean="\\" not in row[-1])
    cmd = issued.command
    status = state.status
    final = status if status in lifecycle.TERMINAL else None
    authorized = firsts.get(Status.AUTHORIZED)
    grant = getattr(authorized, "grant", None)
    outcome = firsts.get(status) if status is not None else None
    executed_at = getattr(outcome, "executed_at", None)
    err = state.error
    n = _NULL
    return (
        f"{state.command_id}\t{state.edge_id}\t{cmd.command_type}\t{cmd.target.device_id}\t"
        f"{cmd.target.channel}\t{_encode(cmd.value).decode()}\t"
        f"{n if cmd.unit is None else cmd.unit}\t{cmd.priority}\t"
        f"{n if cmd.duration_sec is None else cmd.duration_sec}\t{cmd.expiry_sec}\t"
        f"{cmd.timestamp.isoformat()}\t{cmd.source}\t{cmd.actor}\t{n if grant is None else grant}\t"
        f"{n if status is None else status}\t{'f' if final is None else 't'}\t"
        f"{n if err is None else err.code}\t{n if err is None else err.message}\t"
        f"{'t' if state.late else 'f'}\t{state.deliveries}\t{_timestamp(issued.at)}\t"
        f"{_stamp_of(firsts, Status.ROUTED)}\t{_stamp_of(firsts, Status.DELIVERED)}\t"
        f"{n if final is None else _stamp_of(firsts, final)}\t"
        f"{n if executed_at is None else executed_at.isoformat()}\t"
        f"{cmd.expires_at.isoformat()}\t{folded}\n"
    )


def _stamp_of(firsts: dict[Status, Event], status: Status) -> str:
    event = firsts.get(status)
    return _NULL if event is None else _timestamp(event.at)


def _pg_json(text: str | None) -> str | None:
    """JSON whose strings hold NUL, with those escaped as in text columns (jsonb refuses
    `\\u0000`)."""
    return None if text is None else _encode(pg_value(msgspec.json.decode(text))).decode()
