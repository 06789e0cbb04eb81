"""The projector process: audit tables from the partition logs, and timeout verdicts.

For every partition it holds a lease on, it reads the lifecycle log with the
`projector` consumer group (pending entries first, after a crash), writes each batch in
one PostgreSQL transaction, then acknowledges it. The audit stream (refused inputs) is
projected by whichever process holds partition 0. Verdicts (`timed_out`, `expired`) are
reached for every partition by atomic ledger scripts (projections/verdicts.py), so each
command gets exactly one; retention (projections/retention.py) runs for held partitions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from psycopg import AsyncConnection, OperationalError
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from ledger.keys import PROJECTOR_GROUP
from ledger.retention import RetentionConfig
from ledger.store import EVENT_DECODER, Ledger
from projections import schema
from projections.leases import Leases
from projections.retention import RetentionLoop
from projections.verdicts import VerdictConfig, VerdictLoop
from projections.writer import Entry, apply_batch

log = logging.getLogger("projections.worker")

CONSUMER = "owner"  # one shared name: a partition's new lease holder inherits its pending


@dataclass(frozen=True, slots=True)
class ProjectorConfig:
    batch: int = 500
    block_ms: int = 500
    verdict_interval_s: float = 0.1
    rebalance_interval_s: float = 2.0


class Projector:
    def __init__(
        self,
        ledger: Ledger,
        database_url: str,
        config: ProjectorConfig | None = None,
        *,
        owner: str = "",
        retention: RetentionConfig | None = None,
    ) -> None:
        self.ledger = ledger
        self.database_url = database_url
        self.config = config or ProjectorConfig()
        self.owner = owner or f"projector-{uuid.uuid4().hex[:8]}"
        self.schema = ledger.config.namespace
        self.leases = Leases(ledger.redis, ledger.keys, self.owner)  # type: ignore[arg-type]
        self.projected = 0
        self.storage = ""
        actor = f"projector:{self.owner}"
        self.verdicts = VerdictLoop(
            ledger, actor, VerdictConfig(interval_s=self.config.verdict_interval_s)
        )
        self.retention = RetentionLoop(
            ledger,
            database_url,
            lambda: set(self.leases.held),
            retention or RetentionConfig(),
            actor=actor,
        )

    async def run(self) -> None:
        # Verdicts need Redis only: they start at once and go on while PostgreSQL is away.
        verdicts = asyncio.create_task(self.verdicts.run(), name="projector-verdicts")
        try:
            await self._run_projection()
        finally:
            verdicts.cancel()
            await asyncio.gather(verdicts, return_exceptions=True)

    async def _run_projection(self) -> None:
        conn = await self._connect()
        reader = Redis(connection_pool=self.ledger.redis.connection_pool)  # type: ignore[union-attr]
        try:
            self.storage = await schema.migrate(conn, self.schema)
            await schema.ensure_partitions(conn, self.schema, self.storage)
            log.info("projector.started owner=%s storage=%s", self.owner, self.storage)
            await asyncio.gather(
                self._project(conn, reader),
                self.retention.run(),
                self._rebalance(conn),
            )
        finally:
            with contextlib.suppress(Exception):
                await self.leases.release_all()
            await conn.close()

    async def _connect(self) -> AsyncConnection:
        while True:
            try:
                return await AsyncConnection.connect(self.database_url, autocommit=True)
            except OperationalError as exc:
                log.warning(
                    "projector.postgres.unavailable error=%s; verdicts go on, retrying in 2 s",
                    str(exc).strip(),
                )
                await asyncio.sleep(2)

    async def _rebalance(self, conn: AsyncConnection) -> None:
        while True:
            try:
                await self.leases.rebalance()
                await schema.ensure_partitions(conn, self.schema, self.storage)
            except Exception as exc:
                log.warning("projector.rebalance.failed error=%s", exc)
            await asyncio.sleep(self.config.rebalance_interval_s)

    def _streams(self) -> list[str]:
        keys = self.ledger.keys
        streams = [keys.log(p) for p in sorted(self.leases.held)]
        if 0 in self.leases.held:
            streams.append(keys.audit())
        return streams

    async def _ensure_groups(self, redis: Redis, streams: list[str]) -> None:
        for stream in streams:
            try:
                await redis.xgroup_create(stream, PROJECTOR_GROUP, id="0", mkstream=True)
            except redis_errors.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def _project(self, conn: AsyncConnection, redis: Redis) -> None:
        grouped: set[str] = set()
        while True:
            streams = self._streams()
            if not streams:
                await asyncio.sleep(0.2)
                continue
            new = [s for s in streams if s not in grouped]
            if new:
                await self._ensure_groups(redis, new)
                # Pending entries first: a crash may have left read-but-unstored ones.
                for stream in new:
                    await self._drain_pending(conn, redis, stream)
                grouped.update(new)
            try:
                reply: Any = await redis.xreadgroup(
                    PROJECTOR_GROUP,
                    CONSUMER,
                    dict.fromkeys(streams, ">"),
                    count=self.config.batch,
                    block=self.config.block_ms,
                )
            except redis_errors.ResponseError as exc:
                if "NOGROUP" in str(exc):
                    grouped.clear()  # the stream was deleted; recreate its group
                    continue
                raise
            for stream_raw, entries in reply or []:
                await self._store(conn, redis, stream_raw.decode(), entries)

    async def _drain_pending(self, conn: AsyncConnection, redis: Redis, stream: str) -> None:
        start = "0"
        while True:
            pending: Any = await redis.xreadgroup(
                PROJECTOR_GROUP, CONSUMER, {stream: start}, count=self.config.batch
            )
            entries = pending[0][1] if pending else []
            if not entries:
                return
            await self._store(conn, redis, stream, entries)
            start = entries[-1][0]

    async def _store(
        self, conn: AsyncConnection, redis: Redis, stream: str, entries: list[Any]
    ) -> None:
        batch: list[Entry] = []
        ids: list[bytes] = []
        for entry_id, fields in entries:
            ids.append(entry_id)
            raw = fields.get(b"e") if fields else None
            if raw is None:
                continue  # deleted while pending (trimmed); nothing left to project
            try:
                event = EVENT_DECODER.decode(raw)
            except Exception:
                log.exception("projector.entry.undecodable stream=%s entry=%s", stream, entry_id)
                continue
            batch.append(Entry(stream, entry_id.decode(), event, raw))
        self.projected += await apply_batch(conn, self.schema, stream, batch)
        if ids:
            await redis.xack(stream, PROJECTOR_GROUP, *ids)
