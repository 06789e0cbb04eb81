"""Delivery guarantees at the ledger's scripts, on the real Redis, with a shifted clock.

Coalescing at reconnect, redelivery of more than a batch in order, expiry at delivery,
retention that never trims what a reader still needs, and `lost` (never silence) when an
entry disappears anyway.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

import pytest
from delivery_clock import Clock, same_partition_edges

from config.ledger import RetentionConfig
from config.settings import Settings
from ledger.keys import EDGE_GROUP, PROJECTOR_GROUP
from ledger.records import SubmitOutcome
from ledger.retention import Retention
from ledger.store import Ledger
from projections.verdicts import VerdictLoop
from schemas.commands import Ack, Command
from schemas.events import status_of

EDGE = "edge_d1"
OLD = "gwDead|s0"  # a session whose gateway died: presence still names it
NEW = "gwB|s1"

Clocked = tuple[Ledger, Clock]


async def admit(ledger: Ledger, cmd: Command) -> str:
    result = await ledger.submit(cmd, actor="user:op", grant="test", gateway_id="gwA")
    assert result.outcome is SubmitOutcome.ADMITTED, result
    return result.status


async def history(ledger: Ledger, command_id: str) -> list[str]:
    record = await ledger.lookup(command_id)
    assert record is not None, command_id
    return [status_of(e).value for e in record.events]


async def status(ledger: Ledger, command_id: str) -> str:
    record = await ledger.lookup(command_id)
    assert record is not None, command_id
    return record.status


async def sent(ledger: Ledger, edge: str, owner: str, *, claim: bool) -> list[tuple[str, int]]:
    got = await ledger.deliver(edge, owner, claim=claim)
    assert got is not None, "the session lost its edge"
    return [(d.command_id, d.delivery) for d in got]


# -- coalescing on delivery ----------------------------------------------------------------
async def test_reconnect_backlog_sends_only_the_newest_setpoint_per_channel(
    clocked: Clocked,
) -> None:
    ledger, clock = clocked
    await ledger.connect_edge(EDGE, OLD)  # routed at admission, never read: gateway died
    older = [clock.command(EDGE, value=v) for v in (1, 2)]
    other = clock.command(EDGE, channel="MinSoc", value=15)
    for cmd in [*older, other]:
        assert await admit(ledger, cmd) == "routed"
    await ledger.connect_edge(EDGE, NEW)
    newest = clock.command(EDGE, value=3)  # the edge is online again: routed too
    assert await admit(ledger, newest) == "routed"
    assert await sent(ledger, EDGE, NEW, claim=True) == [
        (other.command_id, 1),
        (newest.command_id, 1),
    ]
    for cmd in older:
        record = await ledger.lookup(cmd.command_id)
        assert record is not None and record.status == "failed"
        assert record.events[-1].error.code == "superseded"  # type: ignore[attr-defined]
        assert newest.command_id in record.events[-1].error.message  # type: ignore[attr-defined]
    p = ledger.keys.partition(EDGE)
    assert await ledger.redis.zscore(ledger.keys.deadlines(p), older[0].command_id) is None


async def test_a_setpoint_that_may_have_reached_the_edge_is_resent_not_superseded(
    clocked: Clocked,
) -> None:
    ledger, clock = clocked
    await ledger.connect_edge(EDGE, OLD)
    first = clock.command(EDGE, value=1)
    await admit(ledger, first)
    assert await sent(ledger, EDGE, OLD, claim=False) == [(first.command_id, 1)]
    await ledger.disconnect_edge(EDGE, OLD)  # dropped before the edge acknowledged
    second = clock.command(EDGE, value=2)
    assert await admit(ledger, second) == "queued"
    await ledger.connect_edge(EDGE, NEW)
    # The first may already be applied: it is resent (the edge's idempotency makes it
    # happen once) and the newer one follows it, so the channel ends at the newest value.
    assert await sent(ledger, EDGE, NEW, claim=True) == [
        (first.command_id, 2),
        (second.command_id, 1),
    ]
    assert await status(ledger, first.command_id) == "routed"


async def test_six_offline_setpoints_leave_one_to_send_and_five_superseded(
    clocked: Clocked,
) -> None:
    ledger, clock = clocked
    cmds = [clock.command(EDGE, value=v * 1000) for v in range(6)]
    for cmd in cmds:
        assert await admit(ledger, cmd) == "queued"
    await ledger.connect_edge(EDGE, NEW)
    assert await sent(ledger, EDGE, NEW, claim=True) == [(cmds[-1].command_id, 1)]
    for cmd in cmds[:-1]:
        assert await history(ledger, cmd.command_id) == ["issued", "authorized", "queued", "failed"]


# -- redelivery ------------------------------------------------------------------------------
async def test_more_pending_entries_than_a_batch_are_all_resent_in_order(
    settings: Settings, clocked: Clocked
) -> None:
    ledger, clock = clocked
    ledger.config = replace(ledger.config, delivery_batch=5)
    await ledger.connect_edge(EDGE, OLD)
    routed = [clock.command(EDGE, channel=f"C{i}") for i in range(12)]
    for cmd in routed:
        await admit(ledger, cmd)
    got: list[tuple[str, int]] = []
    while len(got) < 12:
        got += await sent(ledger, EDGE, OLD, claim=False)
    await ledger.disconnect_edge(EDGE, OLD)
    queued = [clock.command(EDGE, channel=f"Q{i}") for i in range(3)]
    for cmd in queued:
        assert await admit(ledger, cmd) == "queued"
    await ledger.connect_edge(EDGE, NEW)
    again = await sent(ledger, EDGE, NEW, claim=True)
    assert again == [(c.command_id, 2) for c in routed] + [(c.command_id, 1) for c in queued]
    pending = await ledger.redis.xpending(ledger.keys.edge_stream(EDGE), EDGE_GROUP)
    assert pending["pending"] == 15


# -- expiry ------------------------------------------------------------------------------------
async def test_queued_command_past_expiry_is_expired_at_delivery_never_sent(
    clocked: Clocked,
) -> None:
    ledger, clock = clocked
    cmd = clock.command(EDGE, expiry_sec=2)
    await admit(ledger, cmd)
    clock.advance(2_001)  # no verdict loop ran: delivery itself must refuse it
    await ledger.connect_edge(EDGE, NEW)
    assert await sent(ledger, EDGE, NEW, claim=True) == []
    assert await history(ledger, cmd.command_id) == ["issued", "authorized", "queued", "expired"]
    assert await ledger.reach_verdicts(ledger.keys.partition(EDGE), actor="t") == 0


async def test_routed_command_past_expiry_is_not_resent_and_times_out_once(
    clocked: Clocked,
) -> None:
    ledger, clock = clocked
    await ledger.connect_edge(EDGE, OLD)
    cmd = clock.command(EDGE, expiry_sec=3)
    await admit(ledger, cmd)
    assert await sent(ledger, EDGE, OLD, claim=False) == [(cmd.command_id, 1)]
    await ledger.disconnect_edge(EDGE, OLD)
    clock.advance(4_000)
    await ledger.connect_edge(EDGE, NEW)
    assert await sent(ledger, EDGE, NEW, claim=True) == []  # stale: not resent
    p = ledger.keys.partition(EDGE)
    assert await ledger.reach_verdicts(p, actor="t") == 0
    clock.advance(6_001)  # past routed + 10 s
    assert await ledger.reach_verdicts(p, actor="t") == 1
    assert await history(ledger, cmd.command_id) == [
        "issued",
        "authorized",
        "routed",
        "timed_out",
    ]


async def test_verdict_loops_in_parallel_give_each_command_exactly_one_verdict(
    clocked: Clocked,
) -> None:
    ledger, clock = clocked
    edges = [f"edge_v{i}" for i in range(6)]
    cmds = []
    for edge in edges:
        await ledger.connect_edge(edge, f"gw|{edge}")
        for i in range(5):
            cmds.append(clock.command(edge, channel=f"C{i}"))
    await asyncio.gather(*(admit(ledger, c) for c in cmds))
    for edge in edges:  # sent: only from now on is an ack due
        assert len(await ledger.deliver(edge, f"gw|{edge}", claim=False) or []) == 5
    queued = clock.command("edge_offline", expiry_sec=5)
    await admit(ledger, queued)
    clock.advance(10_001)
    loops = [VerdictLoop(ledger, f"projector:{i}") for i in range(4)]
    reached = await asyncio.gather(*(loop.tick() for loop in loops for _ in range(3)))
    assert sum(reached) == len(cmds) + 1
    for cmd in cmds:
        assert (await history(ledger, cmd.command_id)).count("timed_out") == 1
    assert (await history(ledger, queued.command_id))[-1] == "expired"


# -- lost, never silence -----------------------------------------------------------------------
async def test_trimmed_pending_entry_gives_lost_on_reclaim_and_a_late_ack_still_lands(
    clocked: Clocked, caplog: pytest.LogCaptureFixture
) -> None:
    ledger, clock = clocked
    await ledger.connect_edge(EDGE, OLD)
    cmd = clock.command(EDGE)
    await admit(ledger, cmd)
    assert await sent(ledger, EDGE, OLD, claim=False) == [(cmd.command_id, 1)]
    await ledger.disconnect_edge(EDGE, OLD)
    stream = ledger.keys.edge_stream(EDGE)
    assert await ledger.redis.xtrim(stream, maxlen=0) == 1  # what MAXLEN does silently
    await ledger.connect_edge(EDGE, NEW)
    with caplog.at_level(logging.ERROR, logger="ledger.store"):
        assert await sent(ledger, EDGE, NEW, claim=True) == []
    assert f"command.lost command_id={cmd.command_id} edge_id={EDGE}" in caplog.text
    assert await history(ledger, cmd.command_id) == ["issued", "authorized", "routed", "lost"]
    late = await ledger.acknowledge(EDGE, Ack(command_id=cmd.command_id, status="executed"))
    assert late.applied and late.late
    assert await status(ledger, cmd.command_id) == "executed"


async def test_sweep_gives_lost_to_queued_and_pending_commands_whose_entries_vanished(
    settings: Settings, clocked: Clocked, caplog: pytest.LogCaptureFixture
) -> None:
    ledger, clock = clocked
    edge_a, edge_b = same_partition_edges(settings)
    p = ledger.keys.partition(edge_a)
    await ledger.connect_edge(edge_a, OLD)
    pending = clock.command(edge_a)
    await admit(ledger, pending)
    await sent(ledger, edge_a, OLD, claim=False)
    await ledger.disconnect_edge(edge_a, OLD)
    queued = clock.command(edge_a, channel="MinSoc")
    await admit(ledger, queued)
    # Two streams of one partition: entry ids collide across streams, records must not.
    others = [clock.command(edge_b, channel=f"C{i}") for i in range(3)]
    await asyncio.gather(*(admit(ledger, c) for c in others))
    assert await ledger.redis.hlen(ledger.keys.inflight(p)) == 5
    await ledger.redis.xtrim(ledger.keys.edge_stream(edge_a), maxlen=0)
    with caplog.at_level(logging.ERROR, logger="ledger.store"):
        lost = await Retention(ledger, RetentionConfig(), actor="projector:t").partition(p, {})
    assert sorted(lost.lost) == sorted([pending.command_id, queued.command_id])
    assert caplog.text.count("command.lost") == 2
    for cmd in (pending, queued):
        record = await ledger.lookup(cmd.command_id)
        assert record is not None and record.status == "lost"
        assert record.events[-1].error.code == "lost"  # type: ignore[attr-defined]
    for cmd in others:
        assert await status(ledger, cmd.command_id) == "queued"
    assert await ledger.redis.hlen(ledger.keys.inflight(p)) == 3
    xpending = await ledger.redis.xpending(ledger.keys.edge_stream(edge_a), EDGE_GROUP)
    assert xpending["pending"] == 0
    clock.advance(400_000)  # lost is a verdict: no expiry or timeout follows it
    assert await ledger.reach_verdicts(p, actor="t") == len(others)
    assert (await history(ledger, queued.command_id))[-1] == "lost"


# -- retention -----------------------------------------------------------------------------------
async def test_edge_stream_trim_keeps_pending_and_unread_entries(clocked: Clocked) -> None:
    ledger, clock = clocked
    p = ledger.keys.partition(EDGE)
    stream = ledger.keys.edge_stream(EDGE)
    await ledger.connect_edge(EDGE, OLD)
    routed = [clock.command(EDGE, channel=f"C{i}") for i in range(10)]
    for cmd in routed:
        await admit(ledger, cmd)
    assert len(await sent(ledger, EDGE, OLD, claim=False)) == 10
    for cmd in routed[:4]:
        await ledger.acknowledge(EDGE, Ack(command_id=cmd.command_id, status="executed"))
    await ledger.acknowledge(EDGE, Ack(command_id=routed[6].command_id, status="executed"))
    await ledger.disconnect_edge(EDGE, OLD)
    queued = [clock.command(EDGE, channel=f"Q{i}") for i in range(3)]
    for cmd in queued:
        await admit(ledger, cmd)
    retention = Retention(ledger, RetentionConfig(log_retain_s=0, edge_retain_s=0), actor="t")
    report = await retention.partition(p, {})
    assert report.trimmed[stream].trimmed == 4  # acknowledged and below the oldest pending
    assert report.lost == []
    assert await ledger.redis.xlen(stream) == 9
    await ledger.connect_edge(EDGE, NEW)
    again = await sent(ledger, EDGE, NEW, claim=True)
    expected = [(c.command_id, 2) for c in routed[4:] if c is not routed[6]]
    assert again == expected + [(c.command_id, 1) for c in queued]
    for cmd in [*routed[4:6], *routed[7:], *queued]:
        await ledger.acknowledge(EDGE, Ack(command_id=cmd.command_id, status="executed"))
    report = await retention.partition(p, {})
    assert await ledger.redis.xlen(stream) <= 1  # everything settled: only the last id stays


async def test_log_is_trimmed_below_the_stored_position_the_group_and_the_window(
    clocked: Clocked,
) -> None:
    ledger, clock = clocked
    p = ledger.keys.partition(EDGE)
    log = ledger.keys.log(p)
    for i in range(5):
        await admit(ledger, clock.command(EDGE, channel=f"C{i}"))  # 3 events each
    ids = [entry_id for entry_id, _ in await ledger.redis.xrange(log)]
    assert len(ids) == 15
    retention = Retention(ledger, RetentionConfig(log_retain_s=3600), actor="t")
    assert (await retention.partition(p, {log: ids[-1]})).trimmed[log].trimmed == 0  # no group
    await ledger.redis.xgroup_create(log, PROJECTOR_GROUP, id="0")
    await ledger.redis.xreadgroup(PROJECTOR_GROUP, "owner", {log: ">"}, count=10)
    await ledger.redis.xack(log, PROJECTOR_GROUP, *ids[:8])  # 8..9 still pending
    assert (await retention.partition(p, {})).trimmed[log].trimmed == 0  # nothing stored
    stored = {log: ids[6].decode()}
    assert (await retention.partition(p, stored)).trimmed[log].trimmed == 0  # window: 1 h
    clock.advance(3_600_001)
    assert (await retention.partition(p, stored)).trimmed[log].trimmed == 6  # stored floor
    stored = {log: ids[-1].decode()}
    assert (await retention.partition(p, stored)).trimmed[log].trimmed == 2  # oldest pending
    assert [e for e, _ in await ledger.redis.xrange(log)] == ids[8:]


async def test_an_edge_that_never_returns_does_not_pin_its_stream(clocked: Clocked) -> None:
    ledger, clock = clocked
    p = ledger.keys.partition(EDGE)
    stream = ledger.keys.edge_stream(EDGE)
    stale = [clock.command(EDGE, channel=f"C{i}", expiry_sec=5) for i in range(4)]
    for cmd in stale:
        await admit(ledger, cmd)
    cancelled = clock.command(EDGE, channel="X")
    await admit(ledger, cancelled)
    assert (await ledger.cancel(cancelled.command_id, "user:op")).applied
    clock.advance(5_001)
    assert await ledger.reach_verdicts(p, actor="t") == 4
    waiting = clock.command(EDGE, channel="Y")
    await admit(ledger, waiting)
    retention = Retention(ledger, RetentionConfig(edge_retain_s=0), actor="t")
    report = await retention.partition(p, {})
    assert report.trimmed[stream].skipped == 5
    assert await ledger.redis.xlen(stream) == 2  # the last skipped id and the waiting one
    assert await ledger.redis.hlen(ledger.keys.inflight(p)) == 1
    await ledger.connect_edge(EDGE, NEW)
    assert await sent(ledger, EDGE, NEW, claim=True) == [(waiting.command_id, 1)]
