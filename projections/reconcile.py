"""Reconciliation: find events the audit tables hold that the ledger has lost.

Redis is the source of truth, but it can lose acknowledged writes: an AOF tail cut
short (`aof-load-truncated yes` loads what precedes the cut) or a failover to a replica
that had not received the last writes. The projector may already have stored those
events in PostgreSQL, and the edge may have acted on them. Nothing else compares the
two sides, so this module does, per partition log:

* the ledger side: the log's first retained entry, its last generated id and the
  projector group's last delivered id;
* the audit side: the stored position and every chain link projected from that log.

A link must still be in the log when its entry id is at or after the log's first
retained entry (retention trims from the front only, docs/operations.md). A link that
is not is an event the ledger lost: a *ledger regression*. It is logged once as
`ledger.reconcile.gap`, counted in the `dispatch_ledger_missing_events` gauge, recorded
in `ledger_gaps` (so `dispatch audit verify` explains those links) and reported with
each affected command's last status on both sides.

The hash chains are not touched: they live in PostgreSQL only and the writer extends
each from the head it stored, so events the ledger appends after the regression link
after the lost ones and every chain stays whole. What the lost links mean is what
`ledger_gaps` records.

The projector runs it (projections/reconcile_loop.py) in full at start and whenever
the Redis server changed (its `run_id`: a restart or a failover, the only ways to lose
data), and incrementally (what was stored and appended since) every `interval_s`;
`dispatch audit reconcile` runs a full check and reports. projections/ledger_gaps.py
keeps what was found.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from psycopg import AsyncConnection, sql

from ledger.keys import PROJECTOR_GROUP, Keys, UnsafeKeyPart
from projections.schema import REFUSALS_CHAIN
from projections.writer import START, entry_key

log = logging.getLogger("projections.reconcile")

PAGE = 1000  # links read per query
SWEEP = 5000  # log entries read per XRANGE
SHOWN_COMMANDS = 20  # commands named in one alarm line
ACTION = (
    "Redis lost events it had acknowledged (truncated AOF tail or failover to a lagging "
    "replica); the audit keeps them. Check the named commands on their devices, run "
    "`dispatch audit reconcile` for the report, and run Redis with appendfsync always "
    "(docs/guarantees.md)"
)


@dataclass(frozen=True, slots=True)
class Link:
    """One stored chain link, as reconciliation needs it."""

    chain: str
    seq: int
    entry_id: str
    event_id: str
    command_id: str
    status: str


@dataclass(frozen=True, slots=True)
class Affected:
    """A command with lost events: its last status in the audit and in the ledger."""

    command_id: str
    edge_id: str
    audit: str
    ledger: str  # `gone` when the ledger has no record of it any more

    def line(self) -> str:
        return f"command {self.command_id} (edge {self.edge_id}): audit {self.audit}, ledger {self.ledger}"


@dataclass
class StreamCheck:
    """One log compared with what the audit holds of it."""

    stream: str
    partition: str  # the partition number, or `audit` for the refusals stream
    ledger_first: str | None  # first retained entry (None: empty or no log)
    ledger_last: str  # last generated entry id ('0-0': no log)
    group: str | None  # the projector group's last delivered id
    position: str  # the audit's stored position
    checked: int = 0  # audit links compared with the log
    missing: list[Link] = field(default_factory=list)
    affected: list[Affected] = field(default_factory=list)
    # Ledger entries at or before the stored position that the audit never stored (nor
    # quarantined): appended after a regression with ids the projector had passed (a
    # promoted replica whose clock is behind). The projector rewinds its position.
    unprojected: list[str] = field(default_factory=list)

    @property
    def regressed(self) -> bool:
        """The audit stored entries past the last id the log ever generated."""
        return entry_key(self.position) > entry_key(self.ledger_last)

    def runs(self) -> list[tuple[str, int, int, list[Link]]]:
        """The missing links as (chain, first seq, last seq, links) runs of consecutive seqs."""
        out: list[tuple[str, int, int, list[Link]]] = []
        for link in sorted(self.missing, key=lambda x: (x.chain, x.seq)):
            if out and out[-1][0] == link.chain and out[-1][2] + 1 == link.seq:
                chain, first, _, links = out[-1]
                out[-1] = (chain, first, link.seq, [*links, link])
            else:
                out.append((link.chain, link.seq, link.seq, [link]))
        return out

    def alarm(self) -> str:
        ids = sorted((x.entry_id for x in self.missing), key=entry_key)
        commands = sorted({x.command_id for x in self.missing if x.command_id})
        shown = ",".join(commands[:SHOWN_COMMANDS])
        if len(commands) > SHOWN_COMMANDS:
            shown += f",+{len(commands) - SHOWN_COMMANDS} more"
        chains = ",".join(f"{c}:{a}..{b}" for c, a, b, _ in self.runs())
        return (
            f"ledger.reconcile.gap partition={self.partition} stream={self.stream} "
            f"missing={len(self.missing)} first={ids[0]} last={ids[-1]} "
            f"ledger_last={self.ledger_last} audit_position={self.position} "
            f"chains={chains} commands={shown or '-'} action={ACTION}"
        )


@dataclass
class Reconciliation:
    streams: list[StreamCheck] = field(default_factory=list)
    full: bool = True

    @property
    def gaps(self) -> list[StreamCheck]:
        return [s for s in self.streams if s.missing]

    @property
    def skipped(self) -> list[StreamCheck]:
        return [s for s in self.streams if s.unprojected]

    @property
    def missing(self) -> int:
        return sum(len(s.missing) for s in self.streams)


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _q(statement: str, schema: str) -> sql.Composed:
    return sql.SQL(statement).format(s=sql.Identifier(schema))


class Reconciler:
    """Compares the ledger's logs with the audit tables of one namespace."""

    def __init__(self, redis: Any, keys: Keys, schema: str, *, retain_log_s: int) -> None:
        self.redis = redis
        self.keys = keys
        self.schema = schema
        self.retain_log_s = retain_log_s
        self.server = ""  # run_id of the Redis server the marks below were checked against
        self.verified: dict[str, int] = {}  # chain -> highest seq known present or recorded
        self.found: dict[str, dict[str, Link]] = {}  # stream -> entry id -> lost link
        self.checked_to: dict[str, str] = {}  # stream -> the log's last id at the last check

    def stream_of(self, chain: str) -> str:
        if chain == REFUSALS_CHAIN:
            return self.keys.audit()
        return self.keys.log(self.keys.partition(chain))

    def _label(self, stream: str) -> str:
        if stream == self.keys.audit():
            return "audit"
        return stream.rsplit("{p", 1)[-1].split("}", 1)[0]

    async def server_id(self) -> str:
        try:
            info = await self.redis.info("server")
        except Exception:  # a cluster client answers per node: always check in full
            return ""
        return _s(info.get("run_id", "")) if isinstance(info, dict) else ""

    async def check(
        self, conn: AsyncConnection, streams: Iterable[str] | None = None, *, full: bool = False
    ) -> Reconciliation:
        """Compare `streams` (default: every log the audit holds links of)."""
        server = await self.server_id()
        if full or not server or server != self.server:
            # Everything is looked at again, against this server: nothing carried over.
            self.verified.clear()
            self.checked_to.clear()
            self.found.clear()
            full = True
        heads = await self._heads(conn)
        positions = await self._positions(conn)
        by_stream: dict[str, list[str]] = {}
        for chain in heads:
            by_stream.setdefault(self.stream_of(chain), []).append(chain)
        wanted = sorted(set(streams) if streams is not None else set(by_stream) | set(positions))
        result = Reconciliation(full=full)
        for stream in wanted:
            check = await self._check_stream(
                conn, stream, by_stream.get(stream, []), heads, positions.get(stream, START)
            )
            result.streams.append(check)
        self.server = server
        return result

    async def _heads(self, conn: AsyncConnection) -> dict[str, int]:
        cur = await conn.execute(_q("SELECT chain, seq FROM {s}.chains", self.schema))
        return {str(c): int(n) for c, n in await cur.fetchall()}

    async def _positions(self, conn: AsyncConnection) -> dict[str, str]:
        cur = await conn.execute(_q("SELECT stream, entry_id FROM {s}.positions", self.schema))
        return {str(s): str(e) for s, e in await cur.fetchall()}

    async def _ledger(self, stream: str) -> tuple[str | None, str, str | None]:
        """(first retained entry, last generated id, projector group position) of a log."""
        try:
            info = await self.redis.xinfo_stream(stream)
        except Exception as exc:
            if "no such key" in str(exc).lower():
                return None, START, None
            raise
        first = info.get("first-entry")
        last = _s(info.get("last-generated-id", START))
        group: str | None = None
        for g in await self.redis.xinfo_groups(stream):
            if _s(g.get("name")) == PROJECTOR_GROUP:
                group = _s(g.get("last-delivered-id"))
        return (_s(first[0]) if first else None), last, group

    def _floor(self, first: str | None, last: str, exists: bool) -> tuple[tuple[int, int], bool]:
        """The lowest entry key a stored link must still be found at, and whether that key
        itself counts. Retention trims from the front: everything from the first retained
        entry on is kept; an empty log keeps nothing up to its last id; a log that does
        not exist at all kept (at least) its retention window."""
        if first is not None:
            return entry_key(first), True
        if exists:
            return entry_key(last), False
        return (int(time.time() * 1000) - self.retain_log_s * 1000, 0), True

    async def _check_stream(
        self,
        conn: AsyncConnection,
        stream: str,
        chains: list[str],
        heads: dict[str, int],
        position: str,
    ) -> StreamCheck:
        first, last, group = await self._ledger(stream)
        exists = first is not None or last != START
        check = StreamCheck(stream, self._label(stream), first, last, group, position)
        floor, inclusive = self._floor(first, last, exists)
        candidates: list[Link] = []
        for chain in chains:
            candidates += await self._links(conn, stream, chain, heads[chain], floor, inclusive)
        check.checked = len(candidates)
        # Entries appended since the last check have ids above the log's last id then
        # (stream ids only grow), whatever the server's clock: only those can have been
        # passed over since.
        since = self.checked_to.get(stream)
        low = (entry_key(since), False) if since is not None else (floor, inclusive)
        # One sweep of the log covers both questions (cheaper than a look-up per link).
        ledger = await self._sweep(stream, low, position, candidates)
        # Same entry id and same event: after a regression the log may reuse an id (the
        # same millisecond, or a clock behind) for a different event.
        lost = [x for x in candidates if ledger.get(x.entry_id) != x.event_id]
        if lost:
            # Trimmed meanwhile (older than the retention window and stored) is not lost.
            first_now, _, _ = await self._ledger(stream)
            if first_now is not None:
                lost = [x for x in lost if entry_key(x.entry_id) >= entry_key(first_now)]
        known = self.found.setdefault(stream, {})
        for link in lost:
            known[link.entry_id] = link
        for entry_id in [e for e in known if not _kept(entry_key(e), floor, inclusive)]:
            del known[entry_id]  # the log's retained range has moved past it
        for chain in chains:
            self.verified[chain] = heads[chain]
        check.missing = sorted(known.values(), key=lambda x: entry_key(x.entry_id))
        if check.missing:
            check.affected = await self._affected(conn, check.missing)
        stored = {x.entry_id: x.event_id for x in candidates}
        in_window = {
            e: ev
            for e, ev in ledger.items()
            if _kept(entry_key(e), *low) and entry_key(e) <= entry_key(position)
        }
        check.unprojected = await self._unprojected(conn, stream, in_window, stored)
        self.checked_to[stream] = last
        return check

    async def _sweep(
        self,
        stream: str,
        low: tuple[tuple[int, int], bool],
        position: str,
        candidates: list[Link],
    ) -> dict[str, str]:
        """entry id -> event id of the log's entries from `low` (or the oldest candidate
        link) up to `position` (or the newest candidate link)."""
        keys = [entry_key(x.entry_id) for x in candidates]
        (ms, seq), inclusive = low
        start = f"{ms}-{seq}" if inclusive else f"({ms}-{seq}"
        if keys and min(keys) <= (ms, seq):
            start = "{}-{}".format(*min(keys))
        end = max([entry_key(position), *keys])
        found: dict[str, str] = {}
        while True:
            rows: Any = await self.redis.xrange(stream, start, "{}-{}".format(*end), count=SWEEP)
            for raw_id, fields in rows:
                found[_s(raw_id)] = _event_id(fields)
            if len(rows) < SWEEP:
                return found
            start = f"({_s(rows[-1][0])}"

    async def _unprojected(
        self, conn: AsyncConnection, stream: str, window: dict[str, str], stored: dict[str, str]
    ) -> list[str]:
        """Entries of `window` (the log up to the stored position) that the audit neither
        stored nor quarantined, and whose event id it does not hold from another entry."""
        unseen = {e: ev for e, ev in window.items() if stored.get(e) != ev}
        if not unseen:
            return []
        cur = await conn.execute(
            _q("SELECT entry_id FROM {s}.quarantine WHERE stream = %s", self.schema), (stream,)
        )
        held = {str(r[0]) for r in await cur.fetchall()}
        cur = await conn.execute(
            _q("SELECT event_id FROM {s}.events WHERE event_id = ANY(%s)", self.schema),
            (sorted({e for e in unseen.values() if e}),),
        )
        known = {str(r[0]) for r in await cur.fetchall()}
        return sorted(
            (e for e, ev in unseen.items() if e not in held and ev not in known), key=entry_key
        )

    async def _links(
        self,
        conn: AsyncConnection,
        stream: str,
        chain: str,
        head: int,
        floor: tuple[int, int],
        inclusive: bool,
    ) -> list[Link]:
        """The chain's links from `stream` that the log must still hold, newest first,
        down to the last verified one."""
        done = self.verified.get(chain, 0)
        out: list[Link] = []
        upper = head
        while upper > done:
            cur = await conn.execute(
                _q(
                    "SELECT seq, entry_id, event_id, command_id, status, stream FROM {s}.events"
                    " WHERE chain = %s AND seq > %s AND seq <= %s ORDER BY seq DESC LIMIT %s",
                    self.schema,
                ),
                (chain, max(done, upper - PAGE), upper, PAGE),
            )
            rows = await cur.fetchall()
            if not rows:
                break  # stored links are contiguous up to the head: none lower either
            below = False
            for seq, entry_id, event_id, command_id, status, from_stream in rows:
                if str(from_stream) != stream:
                    continue
                if not _kept(entry_key(str(entry_id)), floor, inclusive):
                    below = True
                    break
                out.append(
                    Link(chain, int(seq), str(entry_id), str(event_id), str(command_id), status)
                )
            if below:
                break
            upper = int(rows[-1][0]) - 1
        return out

    async def _affected(self, conn: AsyncConnection, lost: list[Link]) -> list[Affected]:
        edges = {x.command_id: x.chain for x in lost if x.command_id and x.chain != REFUSALS_CHAIN}
        if not edges:
            return []
        cur = await conn.execute(
            _q(
                "SELECT command_id, status FROM {s}.commands WHERE command_id = ANY(%s)",
                self.schema,
            ),
            (sorted(edges),),
        )
        audit = {str(c): str(s) for c, s in await cur.fetchall()}
        out: list[Affected] = []
        for command_id, edge in sorted(edges.items()):
            try:
                key = self.keys.command(edge, command_id)
            except UnsafeKeyPart:  # an id the ledger could never have keyed: no record
                key = ""
            status = await self.redis.hget(key, "status") if key else None
            out.append(
                Affected(
                    command_id,
                    edge,
                    audit.get(command_id, "-"),
                    _s(status) if status is not None else "gone",
                )
            )
        return out


def _event_id(fields: Any) -> str:
    """The event id in a log entry's `e` field ('' when it has none or is not JSON)."""
    raw = fields.get(b"e", fields.get("e")) if isinstance(fields, dict) else None
    if raw is None:
        return ""
    try:
        return str(_EVENT_ID.decode(raw).event_id)
    except msgspec.DecodeError:
        return ""


class _EventId(msgspec.Struct):
    event_id: str = ""


_EVENT_ID = msgspec.json.Decoder(_EventId)


def _kept(key: tuple[int, int], floor: tuple[int, int], inclusive: bool) -> bool:
    return key >= floor if inclusive else key > floor


def report(result: Reconciliation, schema: str) -> list[str]:
    """`dispatch audit reconcile`'s text: one line per log with a gap, its runs of lost
    links and the affected commands, then what to do."""
    checked = sum(s.checked for s in result.streams)
    scope = f"{len(result.streams)} logs, {checked} retained links of schema {schema}"
    if not result.gaps:
        lines = [f"ledger reconciled: the ledger holds every event the audit has ({scope})"]
    else:
        lines = [
            f"ledger REGRESSION: {result.missing} events stored in the audit are missing "
            f"from the ledger in {len(result.gaps)} log(s) ({scope} compared)"
        ]
    for check in result.skipped:
        lines.append(
            f"ledger entries NOT PROJECTED: partition {check.partition} ({check.stream}): "
            f"{len(check.unprojected)} entries {check.unprojected[0]}..{check.unprojected[-1]} "
            f"are at or before the audit position {check.position} but not in the audit; a "
            "running projector rewinds its position and reads them"
        )
    for check in result.streams:
        if not check.missing and not check.regressed:
            continue
        lines.append(
            f"  partition {check.partition} ({check.stream}): {len(check.missing)} missing; "
            f"ledger last entry {check.ledger_last}, projector group at {check.group or '-'}, "
            f"audit position {check.position}"
        )
        for chain, first, last, links in check.runs():
            lines.append(
                f"    chain {chain}: seq {first}..{last}, entries "
                f"{links[0].entry_id}..{links[-1].entry_id}"
            )
        lines += [f"    {a.line()}" for a in check.affected]
    if result.gaps:
        lines.append(f"what to do: {ACTION}")
    return lines
