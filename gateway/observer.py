"""A periodic task that reads Redis (and, best effort, the audit database) for the fleet gauges.

Queue sizes, edges online, projector lag, overdue verdicts and reachability live in
Redis, not in this process: every `interval_s` the observer reads them in a few
pipelined round trips and sets the gauges of gateway/metrics.py. It never raises: a
failed probe sets `dispatch_redis_up 0` (or counts in `dispatch_observer_errors_total`)
and the next round tries again. Nothing here is on a command's path.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

from prometheus_client import Gauge

from gateway import metrics
from gateway.lifecycle_metrics import CLOCK_OFFSETS
from ledger.connection import AnyRedis
from ledger.keys import EDGE_GROUP, PROJECTOR_GROUP, Keys
from ledger.tasks import cancel_and_wait

log = logging.getLogger("gateway.observer")
PROBE_TIMEOUT_S = 2.0
# The audit database as the gateway sees it: answers within the timeout with the count of
# quarantined log entries (None: this deployment has no quarantine table), or raises.
AuditProbe = Callable[[float], Awaitable[int | None]]
CHUNK = 1000  # edges per pipelined round trip


@dataclass(frozen=True, slots=True)
class ObserverConfig:
    interval_s: float = 15.0
    top_edges: int = 0  # > 0: per-edge gauges for the N longest queues and clock offsets


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _field(info: dict[Any, Any], name: str) -> Any:
    return info.get(name, info.get(name.encode()))


def entry_ms(entry_id: str) -> int:
    """The Redis time (ms) an auto-generated stream entry id was added at."""
    return int(entry_id.split("-", 1)[0])


@dataclass(frozen=True, slots=True)
class GroupLag:
    """Where a consumer group stands on one stream."""

    lag: int  # entries added after the group's last delivered one
    pending: int  # delivered to the group but not acknowledged
    oldest_id: str  # the oldest entry not yet acknowledged ('' if none)
    last_delivered: str = ""  # the group's last delivered id


@dataclass(eq=False)
class Observer:
    redis: AnyRedis
    keys: Keys
    config: ObserverConfig
    _: KW_ONLY
    audit: AuditProbe | None = None
    connected_edges: Callable[[], Iterable[str]] = tuple
    rounds: int = field(default=0, init=False)
    _task: asyncio.Task[None] | None = field(default=None, init=False, repr=False)
    # id(gauge) -> edge ids published
    _edge_labels: dict[int, set[str]] = field(default_factory=dict, init=False, repr=False)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="metrics-observer")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])

    async def _run(self) -> None:
        while True:
            await self.observe_once()
            await asyncio.sleep(self.config.interval_s)

    async def observe_once(self) -> None:
        """One round of every probe; each failure is counted and logged, never raised."""
        # Reachability answers within PROBE_TIMEOUT_S or counts as down; reading the
        # fleet may take longer on a large one (it is not a health check).
        fleet_timeout_s = max(self.config.interval_s, 10.0)
        for name, probe, timeout_s in (
            ("redis", self._redis, PROBE_TIMEOUT_S),
            ("ledger", self._ledger, fleet_timeout_s),
            ("postgres", self._postgres, PROBE_TIMEOUT_S * 2),
            ("clock_offsets", self._clock_offsets, PROBE_TIMEOUT_S),
        ):
            try:
                await asyncio.wait_for(probe(), timeout=timeout_s)
            except Exception as exc:
                metrics.OBSERVER_ERRORS.labels(name).inc()
                log.warning("gateway.observer.failed probe=%s error=%s", name, exc or type(exc))
                if name == "redis":
                    metrics.REDIS_UP.set(0)
                elif name == "postgres":
                    metrics.POSTGRES_UP.set(0)
        self.rounds += 1

    # -- Redis -----------------------------------------------------------------------------
    async def _redis(self) -> None:
        await self.redis.ping()
        metrics.REDIS_UP.set(1)

    async def _ledger(self) -> None:
        seconds, micros = await self.redis.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        await self._partitions(now_ms)
        await self._edges()

    async def _partitions(self, now_ms: int) -> None:
        k = self.keys
        pipe = self.redis.pipeline(transaction=False)
        for p in k.all_partitions():
            pipe.zcard(k.expiries(p))
            pipe.zrange(k.expiries(p), 0, 0, withscores=True)
            pipe.zrange(k.deadlines(p), 0, 0, withscores=True)
            pipe.xinfo_groups(k.log(p))
            pipe.xpending(k.log(p), PROJECTOR_GROUP)
            pipe.xinfo_stream(k.log(p))
        replies = await pipe.execute(raise_on_error=False)
        queued = 0
        overdue = {"expired": 0.0, "timed_out": 0.0}
        lags: dict[int, GroupLag | None] = {}
        for i, p in enumerate(k.all_partitions()):
            count, first_expiry, first_deadline, groups, pending, stream = replies[
                i * 6 : i * 6 + 6
            ]
            queued += int(count) if isinstance(count, int) else 0
            for verdict, first in (("expired", first_expiry), ("timed_out", first_deadline)):
                if isinstance(first, list) and first:
                    due_ms = float(first[0][1])
                    overdue[verdict] = max(overdue[verdict], (now_ms - due_ms) / 1000)
            lags[p] = _group_lag(groups, pending, stream)
        metrics.QUEUED.set(queued)
        for verdict, seconds in overdue.items():
            metrics.VERDICTS_OVERDUE.labels(verdict).set(max(seconds, 0.0))
        await self._projector_lag(lags, now_ms)

    async def _projector_lag(self, lags: dict[int, GroupLag | None], now_ms: int) -> None:
        # The oldest unprojected entry is the oldest pending one, else the first after the
        # group's last delivered id: one more pipelined round for the partitions behind.
        behind = {p: g for p, g in lags.items() if g is not None and g.lag and not g.oldest_id}
        firsts: dict[int, str] = {}
        if behind:
            pipe = self.redis.pipeline(transaction=False)
            for p, group in behind.items():
                pipe.xrange(self.keys.log(p), min=f"({group.last_delivered}", count=1)
            for p, reply in zip(behind, await pipe.execute(raise_on_error=False), strict=True):
                if isinstance(reply, list) and reply:
                    firsts[p] = _text(reply[0][0])
        for p, lag in lags.items():
            label = str(p)
            if lag is None:
                metrics.PROJECTOR_LAG_ENTRIES.labels(label).set(0)
                metrics.PROJECTOR_LAG_SECONDS.labels(label).set(0)
                continue
            oldest = lag.oldest_id or firsts.get(p, "")
            metrics.PROJECTOR_LAG_ENTRIES.labels(label).set(lag.lag + lag.pending)
            age_s = max(now_ms - entry_ms(oldest), 0) / 1000 if oldest else 0.0
            metrics.PROJECTOR_LAG_SECONDS.labels(label).set(age_s)

    async def _edges(self) -> None:
        """Edges online (fleet-wide, from presence keys), and queues of offline edges."""
        k = self.keys
        enrolled = sorted(_text(e) for e in await self.redis.smembers(k.edges()))
        online = 0
        offline: list[str] = []
        for start in range(0, len(enrolled), CHUNK):
            chunk = enrolled[start : start + CHUNK]
            pipe = self.redis.pipeline(transaction=False)
            for edge_id in chunk:
                pipe.exists(k.presence(edge_id))
            for edge_id, present in zip(chunk, await pipe.execute(), strict=True):
                if present:
                    online += 1
                else:
                    offline.append(edge_id)
        metrics.EDGES_ONLINE.set(online)
        waiting: dict[str, int] = {}
        for start in range(0, len(offline), CHUNK):
            chunk = offline[start : start + CHUNK]
            pipe = self.redis.pipeline(transaction=False)
            for edge_id in chunk:
                pipe.xinfo_groups(k.edge_stream(edge_id))
            for edge_id, groups in zip(
                chunk, await pipe.execute(raise_on_error=False), strict=True
            ):
                unread = _unread(groups, EDGE_GROUP)
                if unread:
                    waiting[edge_id] = unread
        metrics.EDGES_OFFLINE_QUEUED.set(len(waiting))
        if self.config.top_edges > 0:
            top = heapq.nlargest(self.config.top_edges, waiting.items(), key=lambda kv: kv[1])
            self._publish_edges(metrics.QUEUED_BY_EDGE, {e: float(n) for e, n in top})

    def _publish_edges(self, gauge: Gauge, values: dict[str, float]) -> None:
        """Set per-edge series and remove those that dropped out (bounded label set)."""
        for edge_id, value in values.items():
            gauge.labels(edge_id).set(value)
        name = id(gauge)
        for edge_id in self._edge_labels.get(name, set()) - set(values):
            with contextlib.suppress(KeyError):
                gauge.remove(edge_id)
        self._edge_labels[name] = set(values)

    # -- clock offsets ---------------------------------------------------------------------
    async def _clock_offsets(self) -> None:
        CLOCK_OFFSETS.keep_only(set(self.connected_edges()))
        offsets = CLOCK_OFFSETS.latest_ms
        metrics.CLOCK_OFFSET_MAX.set(max((abs(v) for v in offsets.values()), default=0) / 1000)
        if self.config.top_edges > 0:
            top = heapq.nlargest(self.config.top_edges, offsets.items(), key=lambda kv: abs(kv[1]))
            self._publish_edges(metrics.CLOCK_OFFSET, {e: ms / 1000 for e, ms in top})

    # -- the audit database (never needed for readiness: only reported) -------------------
    async def _postgres(self) -> None:
        if self.audit is None:
            metrics.POSTGRES_UP.set(0)
            return
        quarantined = await self.audit(PROBE_TIMEOUT_S)
        metrics.POSTGRES_UP.set(1)
        metrics.QUARANTINED.set(-1 if quarantined is None else quarantined)


def _unread(groups: Any, name: str) -> int:
    """Entries of a stream its group `name` has not read yet (0 when unknown)."""
    if not isinstance(groups, list):
        return 0
    for info in groups:
        if _text(_field(info, "name")) == name:
            lag = _field(info, "lag")
            return int(lag) if lag is not None else 0
    return 0


def _group_lag(groups: Any, pending: Any, stream: Any) -> GroupLag | None:
    """The projector group's standing on a partition log (None: no log yet).

    A log without a projector group counts as entirely unprojected.
    """
    if not isinstance(stream, dict):
        return None  # no such stream: nothing was ever logged there
    length = int(_field(stream, "length") or 0)
    first = _field(stream, "first-entry")
    info = None
    if isinstance(groups, list):
        info = next((g for g in groups if _text(_field(g, "name")) == PROJECTOR_GROUP), None)
    if info is None:
        oldest = _text(first[0]) if first else ""
        return GroupLag(lag=length, pending=0, oldest_id=oldest)
    lag = _field(info, "lag")
    if lag is None:  # the counter is invalid after deletions: count the hard way later
        lag = length
    pending_count = int(_field(info, "pending") or 0)
    oldest = ""
    if pending_count and isinstance(pending, dict) and pending.get("min"):
        oldest = _text(pending["min"])
    last = _text(_field(info, "last-delivered-id"))
    return GroupLag(lag=int(lag), pending=pending_count, oldest_id=oldest, last_delivered=last)
