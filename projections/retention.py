"""The retention loop of the projector process: trim what is stored, sweep what vanished.

It runs for the partitions this process holds a lease on (trimming is atomic and
idempotent, the lease only avoids doing the same work twice) and reads the stored
stream positions from PostgreSQL on a connection of its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from psycopg import AsyncConnection, errors, sql

from config.ledger import RetentionConfig
from ledger.retention import Retention
from ledger.store import Ledger

log = logging.getLogger("projections.retention")


async def stored_positions(conn: AsyncConnection, schema: str) -> dict[str, str]:
    """Stream -> last entry id the projector committed (empty before the first batch)."""
    try:
        cur = await conn.execute(
            sql.SQL("SELECT stream, entry_id FROM {s}.positions").format(s=sql.Identifier(schema))
        )
    except errors.UndefinedTable:
        return {}
    return {str(stream): str(entry_id) for stream, entry_id in await cur.fetchall()}


class RetentionLoop:
    def __init__(
        self,
        ledger: Ledger,
        database_url: str,
        held: Callable[[], set[int]],
        config: RetentionConfig,
        *,
        actor: str,
    ) -> None:
        self.retention = Retention(ledger, config, actor=actor)
        self.database_url = database_url
        self.held = held
        self.config = config
        self.schema = ledger.config.namespace

    async def tick(self, conn: AsyncConnection) -> int:
        """One pass over the held partitions; returns the entries trimmed."""
        held = sorted(self.held())
        if not held:
            return 0
        stored = await stored_positions(conn, self.schema)
        trimmed = 0
        for p in held:
            report = await self.retention.partition(p, stored)
            trimmed += report.entries_trimmed
        if 0 in held:
            trimmed += (await self.retention.audit(stored)).trimmed
        return trimmed

    async def run(self) -> None:
        conn: AsyncConnection | None = None
        try:
            while True:
                await asyncio.sleep(self.config.interval_s)
                try:
                    if conn is None or conn.closed:
                        conn = await AsyncConnection.connect(self.database_url, autocommit=True)
                    await self.tick(conn)
                except Exception as exc:  # keep the projector alive; the next pass retries
                    log.warning("projector.retention.failed error=%s", exc)
                    if conn is not None:
                        await conn.close()
                    conn = None
        finally:
            if conn is not None:
                await conn.close()
