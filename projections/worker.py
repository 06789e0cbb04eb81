"""The projector process: audit tables from the partition logs, and timeout verdicts.

For every partition it holds a lease on, it reads the lifecycle log with the
`projector` consumer group (pending entries first, after a crash), writes each batch in
one PostgreSQL transaction from the stored position on, then acknowledges it. The audit
stream (refused inputs) is projected by whichever process holds partition 0, which also
runs the audit tables' retention sweep. Verdicts (`timed_out`, `expired`) are reached
for every partition by atomic ledger scripts (ledger/verdicts.py; every gateway runs them too), so each command
gets exactly one; they need Redis only and go on while PostgreSQL is away. The Redis
streams are trimmed below what is stored (projections/retention.py) for held partitions.
No entry can stop it: one it cannot decode or store is quarantined (projections/
quarantine.py, projections/isolation.py) and it goes on with the next.

It connects twice: once as the admin (DISPATCH_DATABASE_URL) to apply migrations, then
as the writer role for everything else: DISPATCH_PROJECTOR_DATABASE_URL when set,
otherwise the admin URL followed by `SET ROLE <prefix>_projector`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import AsyncConnection, sql
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from config.ledger import RetentionConfig
from ledger.connection import is_cluster
from ledger.keys import PROJECTOR_GROUP
from ledger.store import Ledger
from ledger.tasks import run_together
from ledger.verdicts import VerdictConfig, VerdictLoop
from projections import isolation, quarantine, schema
from projections.leases import Leases
from projections.logs import LogReader, decode, raw_reads, stream_rows
from projections.retention import RetentionLoop
from projections.schema import Roles
from projections.writer import Gap, Writer

log = logging.getLogger("projections.worker")

CONSUMER = "owner"  # one shared name: a partition's new lease holder inherits its pending
RETRY_INITIAL_S = 0.5
RETRY_MAX_S = 10.0


@dataclass(frozen=True, slots=True)
class ProjectorConfig:
    batch: int = 2000  # per stream and transaction; only a backlog fills a batch
    block_ms: int = 500
    # At a trickle, wait this long before reading again: most of a transaction's cost is
    # per transaction. 0.25 s took the audit's CPU per saturated command from 378-495 to
    # 264-294 µs against 0.1 s (docs/performance.md); the tables lag that much more.
    linger_s: float = 0.25
    # Writers per process, each with its own PostgreSQL connection and a share of the
    # held streams: while one waits on PostgreSQL another formats its batch, so one
    # process keeps about a core of Python and a core of PostgreSQL busy.
    lanes: int = 2
    verdict_interval_s: float = 0.1
    rebalance_interval_s: float = 2.0
    retention_days: int = schema.DEFAULT_RETENTION_DAYS
    retention_interval_s: float = 3600.0
    partition_days_ahead: int = 3
    metrics_port: int = 0  # serve the quarantine counter at 127.0.0.1:PORT/metrics (0: off)


@dataclass(frozen=True, slots=True)
class Database:
    """Where the audit tables live and who writes them."""

    admin_url: str
    roles: Roles
    writer_url: str = ""  # a login of the writer role; else admin_url + SET ROLE

    async def connect_writer(self, application: str) -> AsyncConnection:
        url = self.writer_url or self.admin_url
        conn = await AsyncConnection.connect(url, autocommit=True, application_name=application)
        if not self.writer_url:
            await conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(self.roles.writer)))
        return conn


@dataclass
class _Upkeep:
    partitions_due: float = 0.0
    retention_due: float = 0.0


@dataclass
class Progress:
    projected: int = 0
    batches: int = 0
    positions: dict[str, str] = field(default_factory=dict)


class Projector:
    def __init__(
        self,
        ledger: Ledger,
        database_url: str,
        config: ProjectorConfig | None = None,
        *,
        owner: str = "",
        writer_url: str = "",
        roles: Roles | None = None,
        retention: RetentionConfig | None = None,
    ) -> None:
        self.ledger = ledger
        self.config = config or ProjectorConfig()
        self.owner = owner or f"projector-{uuid.uuid4().hex[:8]}"
        self.schema = ledger.config.namespace
        self.database = Database(
            database_url, roles or Roles.for_prefix(self.schema), writer_url=writer_url
        )
        self.leases = Leases(ledger.redis, ledger.keys, self.owner)  # type: ignore[arg-type]
        self.progress = Progress()
        self.storage = ""
        self._upkeep = _Upkeep()
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

    @property
    def projected(self) -> int:
        return self.progress.projected

    async def migrate(self) -> str:
        """Apply migrations with the admin URL; with a writer login and a current schema,
        the admin URL is not used at all (the least-privilege deployment)."""
        if self.database.writer_url:
            conn = await self.database.connect_writer(
                f"dispatch-projector:{self.schema}:{self.owner}"
            )
            try:
                kind = await schema.storage_of(conn, self.schema)
                if kind is not None and await schema.is_current(conn, self.schema):
                    self.storage = kind
                    return kind
            finally:
                await conn.close()
        admin = await AsyncConnection.connect(self.database.admin_url, autocommit=True)
        try:
            self.storage = await schema.migrate(
                admin,
                self.schema,
                self.database.roles,
                retention_days=self.config.retention_days,
            )
        finally:
            await admin.close()
        return self.storage

    async def run(self) -> None:
        """Project and reach verdicts until cancelled. The verdicts never wait for
        PostgreSQL: while it is unreachable the audit side retries with backoff."""
        if self.config.metrics_port:
            try:
                quarantine.serve_metrics(self.config.metrics_port)
            except OSError as exc:
                log.error("projector.metrics.unavailable error=%s", exc)
        try:
            await run_together(
                self.verdicts.run(), self._audit(), self._rebalance(), self.retention.run()
            )
        finally:
            with contextlib.suppress(Exception):
                await self.leases.release_all()

    async def _audit(self) -> None:
        redis: Any = self.ledger.redis
        # A blocking read gets a connection of its own (standalone); a cluster client
        # routes each per-stream read to its node.
        if is_cluster(redis):
            reader = redis
        else:
            reader = Redis(connection_pool=redis.connection_pool)
            raw_reads(reader)
        delay_s = RETRY_INITIAL_S
        while True:
            conns: list[AsyncConnection] = []
            try:
                if not self.storage:
                    await self.migrate()
                for _ in range(max(1, self.config.lanes)):
                    conns.append(
                        await self.database.connect_writer(
                            f"dispatch-projector:{self.schema}:{self.owner}"
                        )
                    )
                log.info(
                    "projector.started owner=%s storage=%s lanes=%d",
                    self.owner,
                    self.storage,
                    len(conns),
                )
                delay_s = RETRY_INITIAL_S
                await self._lanes(conns, reader)
            except (psycopg.OperationalError, OSError) as exc:
                log.warning(
                    "projector.postgres.unavailable error=%s retry_in_s=%.1f; verdicts go on",
                    _first_line(exc),
                    delay_s,
                )
            except redis_errors.ConnectionError as exc:
                log.warning(
                    "projector.redis.unavailable error=%s retry_in_s=%.1f",
                    _first_line(exc),
                    delay_s,
                )
            except schema.SchemaError as exc:
                log.error("projector.migration.failed error=%s retry_in_s=%.1f", exc, delay_s)
            except Exception as exc:  # whatever it is, the verdicts and the process go on
                log.exception(
                    "projector.audit.failed error=%s retry_in_s=%.1f", _first_line(exc), delay_s
                )
            finally:
                for conn in conns:
                    with contextlib.suppress(Exception):
                        await conn.close()
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, RETRY_MAX_S)

    async def _lanes(self, conns: list[AsyncConnection], reader: Redis) -> None:
        """One `_project` loop per connection; the first to fail stops the others and
        its error is raised (the caller reconnects them all)."""
        await run_together(
            *(
                self._project(Writer(conn, self.schema, self.storage), reader, i, len(conns))
                for i, conn in enumerate(conns)
            )
        )

    async def _rebalance(self) -> None:
        while True:
            try:
                await self.leases.rebalance()
            except Exception as exc:
                log.warning("projector.rebalance.failed error=%s", exc)
            await asyncio.sleep(self.config.rebalance_interval_s)

    def _streams(self, lane: int = 0, lanes: int = 1) -> list[str]:
        """The held streams of one lane: partition p goes to lane p % lanes, so a stream
        stays in its lane while leases come and go; the refusals go with partition 0."""
        keys = self.ledger.keys
        streams = [keys.log(p) for p in sorted(self.leases.held) if p % lanes == lane]
        if 0 in self.leases.held and lane == 0:
            streams.append(keys.audit())
        return streams

    def _is_refusals(self, stream: str) -> bool:
        return stream == self.ledger.keys.audit()

    async def _ensure_groups(self, redis: Redis, streams: list[str]) -> None:
        for stream in streams:
            try:
                await redis.xgroup_create(stream, PROJECTOR_GROUP, id="0", mkstream=True)
            except redis_errors.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def _project(self, writer: Writer, redis: Redis, lane: int = 0, lanes: int = 1) -> None:
        ready: set[str] = set()
        reader = LogReader(
            redis, batch=self.config.batch, gap_limit=max(5000, 2 * self.config.batch)
        )
        quiet_check: dict[str, float] = {}
        while True:
            streams = self._streams(lane, lanes)
            ready &= set(streams)  # a lost lease is re-synchronised when regained
            if not streams:
                await asyncio.sleep(0.2)
                continue
            new = [s for s in streams if s not in ready]
            if new:
                await self._ensure_groups(redis, new)
                for stream in new:
                    # Pending entries first: a crash may have left read-but-unstored ones.
                    await self._drain_pending(writer, redis, reader, stream)
                ready.update(new)
            if lane == 0:
                await self._maintain(writer)
            try:
                reply = await self._read(redis, streams)
            except redis_errors.ResponseError as exc:
                if "NOGROUP" in str(exc):
                    ready.clear()  # the stream was deleted; recreate its group
                    continue
                raise
            seen: set[str] = set()
            largest = 0  # the most entries one stream brought
            for stream_raw, rows in reply:
                if not rows:
                    continue
                largest = max(largest, len(rows))
                seen.add(stream_raw.decode())
                await self._store(writer, redis, reader, stream_raw.decode(), rows)
            now = time.monotonic()
            for stream in streams:
                if stream in seen:
                    quiet_check[stream] = now + self.config.rebalance_interval_s
                elif now >= quiet_check.get(stream, 0.0):
                    # Quiet stream: project what lies between the stored position and the
                    # log's end that the group will not hand out again (acknowledged by
                    # another holder, or a swapped-in rebuild that is behind).
                    quiet_check[stream] = now + self.config.rebalance_interval_s
                    await self._catch_up(writer, redis, reader, stream)
            if 0 < largest < self.config.batch // 4 and self.config.linger_s:
                # A trickle on every stream: let more gather, so that each stream's
                # transaction carries more events (most of its cost is per transaction).
                await asyncio.sleep(self.config.linger_s)

    async def _read(self, redis: Any, streams: list[str]) -> list[Any]:
        """New entries of `streams`: one blocking read, or per stream on a Redis Cluster
        (a multi-key read must stay within one hash slot)."""
        if not is_cluster(redis):
            reply: Any = await redis.xreadgroup(
                PROJECTOR_GROUP,
                CONSUMER,
                dict.fromkeys(streams, ">"),
                count=self.config.batch,
                block=self.config.block_ms,
            )
            return stream_rows(reply)
        replies = await asyncio.gather(
            *(
                redis.xreadgroup(PROJECTOR_GROUP, CONSUMER, {s: ">"}, count=self.config.batch)
                for s in streams
            )
        )
        found = [(s, rows) for r in replies for s, rows in stream_rows(r) if rows]
        if not found:
            await asyncio.sleep(min(self.config.block_ms, 200) / 1000)
        return found

    async def _drain_pending(
        self, writer: Writer, redis: Redis, reader: LogReader, stream: str
    ) -> None:
        start = "0"
        while True:
            pending: Any = await redis.xreadgroup(
                PROJECTOR_GROUP, CONSUMER, {stream: start}, count=self.config.batch
            )
            replies = stream_rows(pending)
            rows = replies[0][1] if replies else []
            if not rows:
                return
            await self._store(writer, redis, reader, stream, rows)
            start = rows[-1][0]

    async def _catch_up(self, writer: Writer, redis: Redis, reader: LogReader, stream: str) -> None:
        while True:
            fetched: list[str] = []
            before = self.progress.positions.get(stream)
            fetch = self._fetcher(reader, fetched)
            refusals = self._is_refusals(stream)
            applied = await isolation.guarded(
                writer,
                reader,
                stream,
                writer.catch_up(stream, fetch, refusals=refusals),
                upto="+",
                refusals=refusals,
            )
            await self._settle(redis, stream, fetched, applied.new, applied.position)
            if not fetched or applied.position == before:
                return

    def _fetcher(self, reader: LogReader, fetched: list[str]) -> Any:
        async def fetch(stream: str, after: str, before: str) -> Gap:
            gap = await reader.fetch(stream, after, before)
            fetched.extend(gap.ids)
            return gap

        return fetch

    async def _store(
        self, writer: Writer, redis: Redis, reader: LogReader, stream: str, rows: list[Any]
    ) -> None:
        batch, ids, bad = decode(stream, rows)
        fetched: list[str] = []
        step = writer.apply(
            stream,
            batch,
            self._fetcher(reader, fetched),
            refusals=self._is_refusals(stream),
            bad=bad,
        )
        upto = ids[-1] if ids else "+"  # a stream read replies in entry id order
        applied = await isolation.guarded(
            writer, reader, stream, step, upto=upto, refusals=self._is_refusals(stream)
        )
        await self._settle(redis, stream, [*fetched, *ids], applied.new, applied.position)

    async def _settle(
        self, redis: Redis, stream: str, ids: list[str], new: int, position: str
    ) -> None:
        self.progress.projected += new
        self.progress.batches += 1 if new else 0
        self.progress.positions[stream] = position
        if ids:
            # After the commit: a crash before this line re-reads, the position skips.
            await redis.xack(stream, PROJECTOR_GROUP, *ids)

    async def _maintain(self, writer: Writer) -> None:
        """Partitions for the coming days, and (holder of partition 0) the retention sweep."""
        now = time.monotonic()
        up = self._upkeep
        try:
            if now >= up.partitions_due:
                up.partitions_due = now + self.config.rebalance_interval_s * 30
                today = datetime.now(UTC).date()
                for offset in range(-1, self.config.partition_days_ahead + 1):
                    day = today + timedelta(days=offset)
                    if day not in writer.days:
                        await schema.ensure_day(writer.conn, self.schema, self.storage, day)
                        writer.days.add(day)
            if now >= up.retention_due and 0 in self.leases.held:
                up.retention_due = now + self.config.retention_interval_s
                await schema.sweep_retention(writer.conn, self.schema, self.storage)
        except Exception as exc:
            log.warning("projector.upkeep.failed schema=%s error=%s", self.schema, exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
