"""`ledger_gaps`: the chain links the ledger lost after they were stored here.

Written by the projector's reconciliation (projections/reconcile_loop.py), one row per
run of consecutive links of a chain; read by `dispatch audit verify`, which explains
those links beside the chain check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from psycopg import AsyncConnection, sql

from projections.reconcile import Reconciliation
from projections.schema import REFUSALS_CHAIN, has_table


def _q(statement: str, schema: str) -> sql.Composed:
    return sql.SQL(statement).format(s=sql.Identifier(schema))


async def record(conn: AsyncConnection, schema: str, result: Reconciliation) -> None:
    """Keep each lost run of links in `ledger_gaps` (idempotent: a run found again
    keeps its first detection time and grows if it is longer now)."""
    rows = [
        (
            chain,
            first,
            last,
            check.stream,
            links[0].entry_id,
            links[-1].entry_id,
            len(links),
            sorted({x.command_id for x in links if x.command_id}),
            check.ledger_last,
        )
        for check in result.gaps
        for chain, first, last, links in check.runs()
    ]
    if not rows:
        return
    async with conn.transaction(), conn.cursor() as cur:
        await cur.executemany(
            _q(
                "INSERT INTO {s}.ledger_gaps (chain, first_seq, last_seq, stream, first_entry,"
                " last_entry, missing, commands, ledger_last) VALUES"
                " (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (chain, first_seq) DO UPDATE"
                " SET last_seq = GREATEST({s}.ledger_gaps.last_seq, EXCLUDED.last_seq),"
                " last_entry = EXCLUDED.last_entry, missing = GREATEST({s}.ledger_gaps.missing,"
                " EXCLUDED.missing), commands = EXCLUDED.commands",
                schema,
            ),
            rows,
        )


@dataclass(frozen=True, slots=True)
class RecordedGap:
    """A run of chain links the ledger lost, as `dispatch audit verify` explains it."""

    chain: str
    first_seq: int
    last_seq: int
    stream: str
    first_entry: str
    last_entry: str
    missing: int
    commands: list[str]
    ledger_last: str
    detected_at: Any

    def line(self) -> str:
        edge = "gateway refusals" if self.chain == REFUSALS_CHAIN else f"edge {self.chain}"
        return (
            f"{edge}: seq {self.first_seq}..{self.last_seq} ({self.missing} events, log "
            f"{self.stream} entries {self.first_entry}..{self.last_entry}, detected "
            f"{self.detected_at.isoformat(timespec='seconds')}): stored here, lost by the "
            f"ledger (the log's last id when found: {self.ledger_last}); links after seq "
            f"{self.last_seq} were appended by the ledger afterwards and continue this chain"
        )


async def recorded(conn: AsyncConnection, schema: str) -> list[RecordedGap]:
    """Every recorded ledger regression (none on a schema older than the table)."""
    if not await has_table(conn, schema, "ledger_gaps"):
        return []
    cur = await conn.execute(
        _q(
            "SELECT chain, first_seq, last_seq, stream, first_entry, last_entry, missing,"
            " commands, ledger_last, detected_at FROM {s}.ledger_gaps ORDER BY chain, first_seq",
            schema,
        )
    )
    return [
        RecordedGap(str(c), int(a), int(b), str(s), str(f), str(la), int(m), list(cm), str(ll), d)
        for c, a, b, s, f, la, m, cm, ll, d in await cur.fetchall()
    ]
