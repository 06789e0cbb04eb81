"""The projector's reconciliation loop: checks, alarms, the gauge, and the rewind.

projections/reconcile.py compares; this runs it beside the projector for the logs it
holds, records what it finds (projections/ledger_gaps.py), logs each loss once as
`ledger.reconcile.gap`, sets `dispatch_ledger_missing_events` on the projector's metrics
port, and moves the stored position back over entries a regressed ledger appended
below it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import KW_ONLY, dataclass, field

from psycopg import AsyncConnection, sql

from ledger.keys import Keys
from projections import ledger_gaps
from projections.quarantine import declare
from projections.reconcile import Reconciler, Reconciliation, StreamCheck
from projections.writer import entry_key

log = logging.getLogger("projections.reconcile")


def _q(statement: str, schema: str) -> sql.Composed:
    return sql.SQL(statement).format(s=sql.Identifier(schema))


MISSING = declare.gauge(
    "dispatch_ledger_missing_events",
    "Events the audit tables hold that the ledger (Redis) lost, per partition log "
    "(`audit` = the refusals stream), as found by the projector's last reconciliation; "
    "counted while the log still retains the range they fell in",
    "partition",
)


def before(entry_id: str) -> str:
    """The greatest stream id below `entry_id` (a position that re-reads it)."""
    ms, seq = entry_key(entry_id)
    return f"{ms}-{seq - 1}" if seq > 0 else f"{ms - 1}-18446744073709551615"


async def rewind(conn: AsyncConnection, schema: str, check: StreamCheck) -> str | None:
    """Move the stream's stored position back before its first unprojected entry so the
    projector reads those entries (events it already stores are skipped by id, so the
    chain stays whole). Compare-and-set on the position this check read: a batch that
    committed meanwhile wins, and the next round looks again. Returns the new position."""
    to = before(check.unprojected[0])
    cur = await conn.execute(
        _q(
            "UPDATE {s}.positions SET entry_id = %s, updated_at = now()"
            " WHERE stream = %s AND entry_id = %s",
            schema,
        ),
        (to, check.stream, check.position),
    )
    return to if cur.rowcount == 1 else None


@dataclass(eq=False)
class ReconcileLoop:
    """The projector's reconciliation for the logs it holds: a full check at start and
    within `probe_s` of a Redis restart or failover (a new `run_id`), an incremental one
    (links stored since) every `interval_s`."""

    reconciler: Reconciler
    connect: Callable[[], Awaitable[AsyncConnection]]
    streams: Callable[[], list[str]]
    _: KW_ONLY
    interval_s: float = 30.0
    probe_s: float = 2.0
    runs: int = field(default=0, init=False)
    # Partitions this loop's gauge reports; (stream, entry id) pairs already logged.
    labels: set[str] = field(default_factory=set, init=False)
    alarmed: set[tuple[str, str]] = field(default_factory=set, init=False)

    async def tick(self, conn: AsyncConnection) -> Reconciliation:
        result = await self.reconciler.check(conn, self.streams())
        await ledger_gaps.record(conn, self.reconciler.schema, result)
        self.publish(result)
        for check in result.skipped:
            to = await rewind(conn, self.reconciler.schema, check)
            log.error(
                "ledger.reconcile.unprojected partition=%s stream=%s entries=%d first=%s "
                "last=%s audit_position=%s rewound_to=%s action=%s",
                check.partition,
                check.stream,
                len(check.unprojected),
                check.unprojected[0],
                check.unprojected[-1],
                check.position,
                to or "- (a batch moved the position meanwhile; checked again next round)",
                "the ledger appended entries with ids the projector had passed (a promoted "
                "replica's clock is behind); the projector now reads them. Fix the clock",
            )
            if to is None:  # look at them again next round
                self.reconciler.checked_to[check.stream] = before(check.unprojected[0])
        now = {check.partition for check in result.streams}
        for label in self.labels - now:  # a partition another projector holds now
            with contextlib.suppress(KeyError):
                MISSING.remove(label)
        self.labels = now
        self.runs += 1
        return result

    def publish(self, result: Reconciliation) -> None:
        """Log each newly found loss once, and set the gauge of every log checked."""
        for check in result.streams:
            MISSING.labels(partition=check.partition).set(len(check.missing))
            fresh = [x for x in check.missing if (check.stream, x.entry_id) not in self.alarmed]
            if not fresh:
                continue
            log.error("%s", check.alarm())
            for affected in check.affected:
                log.warning("ledger.reconcile.command %s", affected.line())
            self.alarmed.update((check.stream, x.entry_id) for x in check.missing)

    async def _due(self, next_at: float) -> bool:
        if time.monotonic() >= next_at or not self.reconciler.server:
            return True
        return await self.reconciler.server_id() != self.reconciler.server

    async def run(self) -> None:
        conn: AsyncConnection | None = None
        next_at = 0.0
        failing = False
        while True:
            try:
                if self.streams() and await self._due(next_at):
                    if conn is None or conn.closed:
                        conn = await self.connect()
                    await self.tick(conn)
                    next_at = time.monotonic() + self.interval_s
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis or PostgreSQL away: the next probe retries
                if not failing:  # once per outage, not every probe
                    log.warning(
                        "ledger.reconcile.failed error=%s; retrying every %.0f s",
                        _first_line(exc),
                        self.probe_s,
                    )
                failing = True
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
                conn = None
            await asyncio.sleep(self.probe_s)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def held_streams(keys: Keys, held: Iterable[int]) -> list[str]:
    """The logs a projector holding partitions `held` projects (partition 0: the audit
    stream too)."""
    parts = sorted(held)
    return [keys.log(p) for p in parts] + ([keys.audit()] if 0 in parts else [])
