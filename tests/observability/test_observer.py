"""The observer's gauges from a real Redis, and the lifecycle metrics of real events."""

from __future__ import annotations

import time

import msgspec
from psycopg import sql
from redis.asyncio import Redis

from gateway import metrics
from gateway.lifecycle_metrics import CLOCK_OFFSETS, LifecycleMetrics
from gateway.observer import Observer, ObserverConfig
from ledger.store import Ledger
from projections.api import AuditDatabase
from schemas.commands import Command, EdgeCommand
from schemas.errors import ErrorObject
from schemas.events import Issued, Routed, TimedOut

from support import DATABASE_URL, command, free_port

DECODE = msgspec.json.Decoder(Command)


def gauge(metric: object, *labels: str) -> float:
    child = metric.labels(*labels) if labels else metric  # type: ignore[attr-defined]
    return float(child._value.get())


async def test_queued_offline_edges_overdue_verdicts_and_offsets(ledger: Ledger) -> None:
    await ledger.enroll_edge("edge_off")
    await ledger.enroll_edge("edge_on")
    await ledger.connect_edge("edge_on", "gwX|s1")
    for i in range(3):
        body = command(edge_id="edge_off", channel=f"Ch{i}", value=10 + i, expiry_sec=1)
        cmd = DECODE.decode(msgspec.json.encode(body))
        await ledger.submit(cmd, actor="user:u", grant="test", gateway_id="gwA")
    CLOCK_OFFSETS.note("edge_on", -2500)
    CLOCK_OFFSETS.note("gone", 90_000)  # no longer connected: dropped, not reported
    observer = Observer(
        Redis.from_url(ledger.url),
        ledger.keys,
        ObserverConfig(top_edges=5),
        connected_edges=lambda: ["edge_on"],
    )
    try:
        await observer.observe_once()
        assert gauge(metrics.REDIS_UP) == 1
        assert gauge(metrics.QUEUED) == 3
        assert gauge(metrics.EDGES_ONLINE) == 1
        assert gauge(metrics.EDGES_OFFLINE_QUEUED) == 1
        assert gauge(metrics.QUEUED_BY_EDGE, "edge_off") == 3
        assert gauge(metrics.CLOCK_OFFSET_MAX) == 2.5
        assert gauge(metrics.CLOCK_OFFSET, "edge_on") == -2.5
        assert "gone" not in CLOCK_OFFSETS.latest_ms
        assert gauge(metrics.POSTGRES_UP) == 0  # no pool given

        # No verdict loop runs here: the expiries become overdue and the gauge says so.
        async def overdue() -> bool:
            await observer.observe_once()
            return gauge(metrics.VERDICTS_OVERDUE, "expired") > 0

        deadline = time.monotonic() + 10
        while not await overdue():
            assert time.monotonic() < deadline, "expiries never became overdue"
        assert gauge(metrics.VERDICTS_OVERDUE, "timed_out") == 0
    finally:
        await observer.redis.aclose()


def test_timeouts_count_once_with_their_verdict_lag_and_error_code() -> None:
    body = DECODE.decode(msgspec.json.encode(command(command_type="setpoint", priority="normal")))
    edge_cmd = msgspec.convert(
        {**msgspec.to_builtins(body), "expiry_sec": 300, "expires_at": "2030-01-01T00:00:00Z"},
        EdgeCommand,
    )
    head = {"command_id": body.command_id, "edge_id": "e1", "actor": "a"}
    step = metrics.STEP_SECONDS.labels("issued_final", "setpoint", "normal")
    finals = metrics.FINALS.labels("timed_out", "setpoint", "normal")
    errors = metrics.ERRORS.labels("timed_out", "timeout")
    lag = metrics.VERDICT_LAG.labels("timed_out")
    before = (step.sum, finals._value.get(), errors._value.get(), lag._sum.get())
    tracker = LifecycleMetrics(ack_timeout_ms=10_000)
    timeout = ErrorObject(code="timeout", message="no ack")
    tracker.observe(Issued(at=1_000, event_id="1", command=edge_cmd, digest="d", **head))
    tracker.observe(Routed(at=2_000, event_id="2", gateway="g", **head))
    tracker.observe(TimedOut(at=12_250, event_id="3", error=timeout, routed_at=2_000, **head))
    tracker.observe(TimedOut(at=12_300, event_id="4", error=timeout, routed_at=2_000, **head))
    after = (step.sum, finals._value.get(), errors._value.get(), lag._sum.get())
    assert after[0] - before[0] == 11.25  # issued -> timed_out, counted once
    assert after[1] - before[1] == 1
    assert after[2] - before[2] == 2  # every event with an error counts
    assert round(after[3] - before[3], 3) == 0.55  # 250 ms + 300 ms after the deadline
    assert len(tracker) == 0


async def test_unreachable_redis_reads_as_down_and_the_observer_goes_on(ledger: Ledger) -> None:
    dead = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
    observer = Observer(dead, ledger.keys, ObserverConfig())
    failures = metrics.OBSERVER_ERRORS.labels("redis")
    before = failures._value.get()
    metrics.REDIS_UP.set(1)
    try:
        await observer.observe_once()  # must not raise
    finally:
        await dead.aclose()
    assert gauge(metrics.REDIS_UP) == 0
    assert failures._value.get() == before + 1
    assert observer.rounds == 1


async def test_quarantine_is_counted_when_the_table_exists(ledger: Ledger, namespace: str) -> None:
    """The audit database the composition root hands the gateway, probed by the observer."""
    audit = AuditDatabase(DATABASE_URL, namespace)
    observer = Observer(
        Redis.from_url(ledger.url), ledger.keys, ObserverConfig(), audit=audit.probe
    )
    async with audit.opened() as pool:
        await pool.wait()
        await observer.observe_once()
        assert gauge(metrics.POSTGRES_UP) == 1
        assert gauge(metrics.QUARANTINED) == -1  # no quarantine table: not known
        async with pool.connection() as conn:
            await conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(namespace)))
            await conn.execute(
                sql.SQL("CREATE TABLE {}.quarantine (entry_id text)").format(
                    sql.Identifier(namespace)
                )
            )
            await conn.execute(
                sql.SQL("INSERT INTO {}.quarantine VALUES ('1-0'), ('2-0')").format(
                    sql.Identifier(namespace)
                )
            )
        await observer.observe_once()
        assert gauge(metrics.QUARANTINED) == 2
    await observer.observe_once()  # closed: the audit database reads as down
    assert gauge(metrics.POSTGRES_UP) == 0
    await observer.redis.aclose()
