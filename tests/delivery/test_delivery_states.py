"""A Hypothesis state machine drives the real ledger scripts on the real Redis.

Random sequences of connect / disconnect / send / deliver / edge processing (ack,
accept only, execute but lose the ack, crash before executing) / resent acks / cancel /
resubmit / retention / clock advance. Time is virtual: before every ledger call the
test-only offset (`LedgerConfig.clock_offset_ms`, added to Redis TIME inside every
script) is set so that the scripts see the machine's clock, which only `advance` moves.
Ack timeouts and expiries pass without sleeping. A call still takes a few real ms
(more on a loaded machine), so `advance` never stops within a margin of a deadline or an
expiry: outcomes, and so the runs Hypothesis replays, stay deterministic.

Invariants: never executed twice (by the edge, and never twice in the ledger); never
handed to an edge at or after its expiry; only deliverable commands are handed out;
at most one verdict per command; the stored status equals the fold of its events;
nothing is ever `lost` (this machine never deletes entries by hand, so retention must
not); once time passes, nothing sits routed past its ack deadline or queued past its
expiry, and in the end every command is terminal.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Coroutine
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, TypeVar

import msgspec
import pytest
import redis
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from redis.asyncio import Redis

from config.ledger import LedgerConfig, RetentionConfig
from ledger import lifecycle
from ledger.keys import partition_of
from ledger.records import SubmitOutcome
from ledger.retention import Retention
from ledger.store import Ledger
from schemas.commands import Ack, Command
from schemas.events import Routed, Status, status_of

from support import REDIS_URL, command

T = TypeVar("T")
DECODE = msgspec.json.Decoder(Command)
PARTITIONS = 2
ACK_TIMEOUT_MS = 10_000
MARGIN_MS = 250  # far more than a script call takes, even on a loaded machine


def _edges() -> list[str]:
    """Two edges sharing a partition (entry ids collide across their streams) + one more."""
    shared = [e for e in (f"sm_{i}" for i in range(50)) if partition_of(e, PARTITIONS) == 0][:2]
    other = next(e for e in (f"sm_{i}" for i in range(50)) if partition_of(e, PARTITIONS) == 1)
    return [*shared, other]


EDGES = _edges()
edges = st.sampled_from(EDGES)


class DeliveryMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.namespace = f"t{uuid.uuid4().hex[:10]}"
        self.redis = Redis.from_url(REDIS_URL)
        config = LedgerConfig(
            namespace=self.namespace,
            partitions=PARTITIONS,
            ack_timeout_ms=ACK_TIMEOUT_MS,
            delivery_batch=3,  # several rounds per delivery
        )
        self.ledger = Ledger(self.redis, config)
        self.virtual_ms = time.time_ns() // 1_000_000
        self.run(self.ledger.start())
        self.sessions: dict[str, str] = {}
        self.session_count = 0
        self.inbox: dict[str, list[dict[str, Any]]] = {e: [] for e in EDGES}
        self.done: dict[str, set[str]] = {e: set() for e in EDGES}  # the edge's durable record
        self.effects: Counter[str] = Counter()  # writes to the device
        self.commands: dict[str, Command] = {}
        self.expires_at: dict[str, int] = {}
        self.deadline: dict[str, int] = {}  # virtual routing time + ack timeout
        self.handed: set[str] = set()  # commands the ledger handed to an edge at least once
        self.retention = Retention(
            self.ledger, RetentionConfig(log_retain_s=0, edge_retain_s=0), actor="t"
        )

    # -- plumbing --------------------------------------------------------------------------
    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        # Redis runs on this machine: its TIME is this clock (give or take a few ms).
        offset_ms = self.virtual_ms - time.time_ns() // 1_000_000
        self.ledger.config = replace(self.ledger.config, clock_offset_ms=offset_ms)
        return self.loop.run_until_complete(coro)

    def now_ms(self) -> int:
        return self.virtual_ms

    def teardown(self) -> None:
        try:
            self.check_everything_ends_terminal()
        finally:
            self.run(self.ledger.close())
            self.run(self.redis.aclose())
            self.loop.close()
            client = redis.Redis.from_url(REDIS_URL)
            keys = list(client.scan_iter(match=f"{self.namespace}:*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()

    def receive(self, edge: str, claim: bool) -> None:
        owner = self.sessions[edge]
        got = self.run(self.ledger.deliver(edge, owner, claim=claim))
        assert got is not None, "the current session must own its edge"
        now = self.now_ms()
        for d in got:
            # Never handed out at or after expiry, and only while deliverable: the
            # script just routed it, so the ledger must say `routed` right now.
            assert now < self.expires_at[d.command_id], d.command_id
            record = self.run(self.ledger.lookup(d.command_id))
            assert record is not None and record.status == "routed", (d.command_id, record)
            self.inbox[edge].append(msgspec.json.decode(d.frame()))
            self.deadline[d.command_id] = self.virtual_ms + ACK_TIMEOUT_MS
            self.handed.add(d.command_id)
            event("redelivery" if d.delivery > 1 else "delivery")

    def ack(self, edge: str, command_id: str, status: str) -> None:
        ack = Ack(command_id=command_id, status=status)  # type: ignore[arg-type]
        self.run(self.ledger.acknowledge(edge, ack))

    # -- rules -----------------------------------------------------------------------------
    @initialize()
    def start(self) -> None:
        for edge in EDGES:
            self.run(self.ledger.enroll_edge(edge))

    @rule(edge=edges)
    def connect(self, edge: str) -> None:
        self.session_count += 1
        owner = f"gw{self.session_count % 2}|s{self.session_count}"
        self.inbox[edge] = []  # a replaced session's frames in flight are gone
        self.sessions[edge] = owner
        self.run(self.ledger.connect_edge(edge, owner))
        self.receive(edge, claim=True)

    @precondition(lambda self: bool(self.sessions))
    @rule(data=st.data())
    def disconnect(self, data: st.DataObject) -> None:
        self.drop(data.draw(st.sampled_from(sorted(self.sessions))))

    def drop(self, edge: str) -> None:
        owner = self.sessions.pop(edge, None)
        if owner is not None:
            self.run(self.ledger.disconnect_edge(edge, owner))
        self.inbox[edge] = []

    @rule(
        edge=edges,
        channel=st.sampled_from(["SetActivePower", "MinSoc"]),
        setpoint=st.booleans(),
        expiry_s=st.sampled_from([1, 4, 30, 300]),
    )
    def send(self, edge: str, channel: str, setpoint: bool, expiry_s: int) -> None:
        shifted = self.now_ms()
        timestamp = datetime.fromtimestamp(shifted / 1000, UTC).isoformat(timespec="milliseconds")
        body = command(
            f"c{len(self.commands)}",  # not random: replays must pick the same commands
            edge_id=edge,
            channel=channel,
            expiry_sec=expiry_s,
            timestamp=timestamp.replace("+00:00", "Z"),
            **({} if setpoint else {"command_type": "mode_change", "value": "peak_shaving"}),
        )
        cmd = DECODE.decode(msgspec.json.encode(body))
        result = self.run(self.ledger.submit(cmd, actor="user:op", grant="t", gateway_id="gw0"))
        assert result.outcome is SubmitOutcome.ADMITTED, result
        self.commands[cmd.command_id] = cmd
        self.expires_at[cmd.command_id] = self.ledger.expires_at_ms(cmd)
        if result.status == "routed":
            self.deadline[cmd.command_id] = self.virtual_ms + ACK_TIMEOUT_MS

    @precondition(lambda self: bool(self.commands))
    @rule(data=st.data())
    def resubmit(self, data: st.DataObject) -> None:
        cmd = self.commands[data.draw(st.sampled_from(list(self.commands)))]
        before = self.run(self.ledger.lookup(cmd.command_id))
        result = self.run(self.ledger.submit(cmd, actor="user:op", grant="t", gateway_id="gw0"))
        after = self.run(self.ledger.lookup(cmd.command_id))
        assert before is not None and after is not None
        assert result.outcome is SubmitOutcome.EXISTS and result.status == before.status
        assert len(after.events) == len(before.events)  # nothing appended

    @precondition(lambda self: bool(self.sessions))
    @rule(data=st.data())
    def pump(self, data: st.DataObject) -> None:
        self.receive(data.draw(st.sampled_from(sorted(self.sessions))), claim=False)

    @precondition(lambda self: any(self.inbox.values()))
    @rule(data=st.data(), how=st.sampled_from(["ack", "accept_only", "ack_lost", "crash"]))
    def process(self, data: st.DataObject, how: str) -> None:
        """The edge takes its next frame: its durable record makes it idempotent."""
        edge = data.draw(st.sampled_from(sorted(e for e, frames in self.inbox.items() if frames)))
        frame = self.inbox[edge].pop(0)
        command_id = frame["command_id"]
        if how == "crash":  # died before recording or executing anything
            self.drop(edge)
            return
        if command_id not in self.done[edge]:
            self.done[edge].add(command_id)
            self.effects[command_id] += 1
        if how == "ack_lost":
            self.drop(edge)
            return
        self.ack(edge, command_id, "accepted")
        if how == "ack":
            self.ack(edge, command_id, "executed")

    @precondition(lambda self: any(self.done[e] for e in self.sessions))
    @rule(data=st.data())
    def resend_ack(self, data: st.DataObject) -> None:
        """The edge resends an executed ack from its record (after a reconnect)."""
        edge = data.draw(st.sampled_from(sorted(e for e in self.sessions if self.done[e])))
        self.ack(edge, data.draw(st.sampled_from(sorted(self.done[edge]))), "executed")

    @precondition(lambda self: bool(self.commands))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        command_id = data.draw(st.sampled_from(list(self.commands)))
        before = self.run(self.ledger.lookup(command_id))
        result = self.run(self.ledger.cancel(command_id, "user:op"))
        assert before is not None
        assert result.applied == (before.status in ("queued", "authorized")), before.status

    # Odd steps: no sum of them lands within a few ms of an expiry or deadline.
    @rule(ms=st.sampled_from([301, 2_003, 5_007, ACK_TIMEOUT_MS + 11, 400_009]))
    def advance(self, ms: int) -> None:
        target = self.virtual_ms + ms
        boundaries = [*self.expires_at.values(), *self.deadline.values()]
        while any(abs(target - b) < MARGIN_MS for b in boundaries):
            target += 2 * MARGIN_MS
        self.virtual_ms = target
        self.reach_verdicts()
        self.check_nothing_overdue()

    @rule()
    def trim(self) -> None:
        for p in range(PARTITIONS):
            report = self.run(self.retention.partition(p, {}))
            assert report.lost == []

    def reach_verdicts(self) -> None:
        for p in range(PARTITIONS):
            self.run(self.ledger.reach_verdicts(p, actor="projector:t"))

    # -- invariants ------------------------------------------------------------------------
    async def lookup_all(self) -> list[Any]:
        return list(await asyncio.gather(*(self.ledger.lookup(c) for c in self.commands)))

    def records(self) -> list[Any]:
        found = self.run(self.lookup_all())
        assert all(r is not None for r in found)
        return found

    @invariant()
    def never_executed_twice(self) -> None:
        assert all(n <= 1 for n in self.effects.values()), self.effects
        for record in self.records():
            statuses = [status_of(e) for e in record.events]
            assert statuses.count(Status.EXECUTED) <= 1, record.command_id
            assert sum(s in lifecycle.FINAL for s in statuses) <= 1, statuses
            assert sum(s in (Status.TIMED_OUT, Status.LOST, Status.EXPIRED) for s in statuses) <= 1
            assert Status.LOST not in statuses, "retention or delivery lost a command"
            for s in set(statuses) & {Status.TIMED_OUT, Status.EXPIRED, Status.CANCELLED}:
                event(f"reached {s.value}")
            if record.late:
                event("late ack recorded")
            if record.status == "executed":
                event("executed")
            if record.status == "failed":
                event("superseded")
            folded = lifecycle.replay(record.events)
            assert folded is not None and folded.status == Status(record.status), statuses

    def check_nothing_overdue(self) -> None:
        now = self.now_ms()
        for record in self.records():
            if record.status == "routed" and record.command_id not in self.handed:
                continue  # still waiting in the stream: no ack is due before it is sent
            if record.status in ("routed", "delivered"):
                routed = max(e.at for e in record.events if isinstance(e, Routed))
                assert now < routed + ACK_TIMEOUT_MS, (record.command_id, now - routed)
            if record.status == "queued":
                assert now < self.expires_at[record.command_id], record.command_id

    def check_everything_ends_terminal(self) -> None:
        self.advance(8 * 86_400_000)
        for record in self.records():
            assert Status(record.status) in lifecycle.TERMINAL, (record.command_id, record.status)
            if self.effects[record.command_id] == 0:
                assert record.status != "executed", record.command_id


DeliveryMachine.TestCase.settings = settings(
    max_examples=75,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestDeliveryStates = pytest.mark.slow(DeliveryMachine.TestCase)
