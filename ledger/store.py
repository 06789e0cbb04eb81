"""The ledger: append lifecycle transitions, hand commands to edges, read lifecycles.

Its methods come in the order of the script families: admission (`submit`, refusals),
delivery, transitions (acks, cancels), presence, verdicts and sweeps, trims, reads. What
they take and return (config, results, records, codecs) is in ledger/records.py.

This is the only module that knows how a transition is stored. Each public method is
one atomic script call (through the batcher, so concurrent callers share round trips),
except `submit` on Redis Cluster, which first claims the command id in a global index (a
separate slot there) and then runs the admission script in the edge's partition; on a
single server the admission script claims the id itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from config.ledger import LedgerConfig
from ledger import lifecycle, scripts
from ledger.batcher import Batcher
from ledger.connection import AnyRedis, is_cluster
from ledger.errors import LedgerError, translated
from ledger.ids import new_event_id
from ledger.keys import Keys
from ledger.ordering import Turn
from ledger.records import (
    EDGE_COMMAND_DECODER,
    EVENT_DECODER,
    Appended,
    CommandRecord,
    Delivery,
    Persistence,
    SubmitOutcome,
    SubmitResult,
    TransitionResult,
    TrimResult,
    body_digest,
    to_utc,
)
from schemas.commands import Ack, Command, CommandType, EdgeCommand
from schemas.errors import ErrorCode, ErrorObject, error
from schemas.events import (
    Authorized,
    Cancelled,
    Delivered,
    Event,
    Executed,
    Failed,
    Issued,
    Queued,
    Rejected,
    Routed,
    Status,
    status_of,
)

log = logging.getLogger("ledger.store")
_encode = msgspec.json.Encoder().encode


def _statuses(values: frozenset[Status]) -> str:
    return " " + " ".join(sorted(s.value for s in values)) + " "


_LATE_FROM = _statuses(lifecycle.VERDICTS)
_DELIVERABLE = _statuses(lifecycle.DELIVERABLE)
_ALLOWED_FROM = {s: _statuses(lifecycle.allowed_from(s)) for s in Status}
_LOST_FROM = _ALLOWED_FROM[Status.LOST]
_ACK_STATUS = {
    "accepted": Status.DELIVERED,
    "executed": Status.EXECUTED,
    "failed": Status.FAILED,
    "rejected": Status.REJECTED,
}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def log_lost(command_id: str, edge_id: str, reason: str) -> None:
    """The alarm line of a `lost` verdict (alert on it, and on dispatch_events_total)."""
    log.error(
        "command.lost command_id=%s edge_id=%s status=lost reason=%r", command_id, edge_id, reason
    )


class Ledger:
    def __init__(
        self, redis: AnyRedis, config: LedgerConfig | None = None, *, url: str = ""
    ) -> None:
        self.redis = redis
        self.config = config or LedgerConfig()
        self.keys = Keys(self.config.namespace, self.config.partitions)
        self.url = url
        self.batcher = Batcher(redis, url=url)
        # The command-id index lives in another hash slot than the partition: on a
        # cluster it is claimed by its own call before the admission script.
        self._claim_apart = is_cluster(redis)

    async def start(self) -> None:
        async with translated("starting the ledger", self.url):
            await self._check_partitions()
        await self.batcher.start()

    async def close(self) -> None:
        await self.batcher.close()

    def _script(
        self, script: scripts.Script, keys: list[str], argv: list[Any]
    ) -> asyncio.Future[Any]:
        """Run one of the ledger's scripts; every one takes the clock offset last."""
        return self.batcher.script(script, keys, [*argv, self.config.clock_offset_ms])

    async def _check_partitions(self) -> None:
        meta = self.keys.meta()
        await self.redis.hsetnx(meta, "partitions", self.config.partitions)
        stored = int(await self.redis.hget(meta, "partitions") or 0)
        if stored != self.config.partitions:
            raise LedgerError(
                f"namespace {self.config.namespace!r} was created with {stored} partitions but "
                f"this process is configured with {self.config.partitions}; edges would map "
                f"to other partitions. Set DISPATCH_PARTITIONS={stored}."
            )

    # -- admission -----------------------------------------------------------------------
    def expires_at_ms(self, cmd: Command) -> int:
        expiry_s = cmd.expiry_sec or self.config.default_expiry_s
        return int(cmd.timestamp.timestamp() * 1000) + expiry_s * 1000

    async def submit(
        self,
        cmd: Command,
        *,
        actor: str,
        grant: str,
        gateway_id: str,
        turn: Turn | None = None,
        then: Callable[[str, str], None] | None = None,
    ) -> SubmitResult:
        """Record an authorized command and route it (edge online) or queue it.

        With a `turn`, the admission script is enqueued only after the connection's
        earlier commands enqueued theirs (see ledger/ordering.py). `then(edge_id,
        command_id)` is called right after the admission script is queued, before its
        reply: what it queues rides in the same pipeline, behind the admission (the
        gateway queues the command's first delivery there, see `deliver_now`).

        On a single Redis server the admission script also claims the command id in
        the global index; on a cluster the index is another slot, claimed first.
        """
        edge_id = cmd.target.edge_id
        k = self.keys
        index_keys: list[str] = []
        if self._claim_apart:
            owner = await self.batcher.call(
                "SET",
                k.command_index(cmd.command_id),
                edge_id,
                "NX",
                "GET",
                "EX",
                self.config.state_ttl_s,
                get=True,
            )
            if owner is not None and _text(owner) != edge_id:
                return SubmitResult(SubmitOutcome.DUPLICATE, "")
        else:
            # One server holds every key: the admission script claims the id itself,
            # which saves a round trip on the way to the edge.
            index_keys = [k.command_index(cmd.command_id)]
        digest = body_digest(cmd)
        expires_at = self.expires_at_ms(cmd)
        body = EdgeCommand(
            command_id=cmd.command_id,
            command_type=cmd.command_type,
            target=cmd.target,
            value=cmd.value,
            unit=cmd.unit,
            expiry_sec=cmd.expiry_sec or self.config.default_expiry_s,
            source=cmd.source,
            timestamp=cmd.timestamp,
            priority=cmd.priority,
            duration_sec=cmd.duration_sec,
            expires_at=to_utc(expires_at),
            actor=actor,
            traceparent=cmd.traceparent,
        )
        base = new_event_id()
        issued = Issued(
            event_id=base + "-i",
            command_id=cmd.command_id,
            edge_id=edge_id,
            actor=actor,
            command=body,
            digest=digest,
        )
        authorized = Authorized(
            grant=grant,
            event_id=base + "-a",
            command_id=cmd.command_id,
            edge_id=edge_id,
            actor=actor,
        )
        coalesce = (
            f"{cmd.target.device_id}/{cmd.target.channel}"
            if cmd.command_type is CommandType.SETPOINT
            else ""
        )
        p = k.partition(edge_id)
        if turn is not None:
            await turn.wait()
        pending = self._script(
            scripts.SUBMIT,
            [
                k.command(edge_id, cmd.command_id),
                k.log(p),
                k.edge_stream(edge_id),
                k.presence(edge_id),
                k.deadlines(p),
                k.expiries(p),
                k.latest(edge_id),
                k.inflight(p),
                k.edge_streams(p),
                k.request(p, base),
                *index_keys,
            ],
            [
                cmd.command_id,
                edge_id,
                digest,
                _encode(issued),
                _encode(authorized),
                _encode(body),
                expires_at,
                self.config.ack_timeout_ms,
                coalesce,
                self.config.state_ttl_s * 1000,
                base,
                actor,
                k.command_prefix(p),
            ],
        )
        if then is not None:
            then(edge_id, cmd.command_id)
        if turn is not None:
            turn.passed()
        reply = await pending
        outcome, status, gateway = (_text(x) for x in reply[:3])
        if outcome != SubmitOutcome.ADMITTED or len(reply) < 7:
            return SubmitResult(SubmitOutcome(outcome), status, gateway)
        at = int(reply[3])
        cid = cmd.command_id
        placed: Event = (
            Routed(at=at, gateway=gateway, **EventHeader(f"{base}-r", cid, edge_id, actor).fields())
            if status == Status.ROUTED
            else Queued(
                at=at,
                expires_at=expires_at,
                **EventHeader(f"{base}-q", cid, edge_id, actor).fields(),
            )
        )
        stamped = (
            msgspec.structs.replace(issued, at=at),
            msgspec.structs.replace(authorized, at=at),
            placed,
        )
        entries = [_text(x) for x in reply[4:7]]
        appended = Appended(k.log(p), cid, "", tuple(zip(entries, stamped, strict=True)))
        return SubmitResult(SubmitOutcome.ADMITTED, status, gateway, appended)

    async def record_rejection(self, event: Rejected) -> None:
        """Keep a refused input in the audit stream: who, what, when, why.

        No MAXLEN here: the retention worker trims it once the projector stored it.
        """
        await self.batcher.call("XADD", self.keys.audit(), "*", "e", _encode(event))

    # -- delivery --------------------------------------------------------------------------
    async def deliver(self, edge_id: str, owner: str, *, claim: bool) -> list[Delivery] | None:
        """Deliverable commands for the session `owner` of `edge_id`; None if it lost the edge.

        `claim=True` (a new session) first reclaims everything an earlier session left
        unacknowledged, then hands over the backlog with setpoints coalesced. Rounds
        repeat until the stream holds nothing more or a full batch is ready.
        """
        out: list[Delivery] = []
        cursor = "0-0" if claim else ""
        while True:
            got = await self.deliver_some(
                edge_id, owner, cursor=cursor, count=self.config.delivery_batch
            )
            if got is None:
                return None
            out.extend(got[0])
            cursor = got[1]
            if cursor == "":
                return out

    async def deliver_some(
        self, edge_id: str, owner: str, *, cursor: str, count: int
    ) -> tuple[list[Delivery], str] | None:
        """At most about `count` deliverable commands, and the claim cursor to go on from.

        `cursor` is where reclaiming an earlier session's unacknowledged entries goes on
        ("0-0" to start, "" when nothing is left to reclaim; reclaiming also coalesces
        the backlog's setpoints). None if `owner` no longer holds the edge.
        """
        return await self._delivery_rounds(edge_id, owner, cursor, count, None)

    def deliver_now(
        self, edge_id: str, owner: str, *, count: int
    ) -> Awaitable[tuple[list[Delivery], str] | None]:
        """`deliver_some` with nothing left to reclaim, whose first script is queued
        before this returns (so it rides in the pipeline of whatever was queued just
        before it, e.g. the admission of the command it is meant to hand out)."""
        first = self._deliver_round(edge_id, owner, "", coalesce=False, count=count)
        return self._delivery_rounds(edge_id, owner, "", count, first)

    async def _delivery_rounds(
        self, edge_id: str, owner: str, cursor: str, count: int, first: Any
    ) -> tuple[list[Delivery], str] | None:
        out: list[Delivery] = []
        for _ in range(self._MAX_DELIVERY_ROUNDS):
            claiming = cursor != ""
            if first is not None:
                reply, first = await first, None
            else:
                reply = await self._deliver_round(
                    edge_id, owner, cursor, coalesce=claiming, count=max(1, count - len(out))
                )
            if _text(reply[0]) != "ok":
                return None
            next_cursor, fresh_full, lost = _text(reply[1]), _text(reply[2]), _text(reply[3])
            for command_id in lost.split():
                log_lost(command_id, edge_id, "its pending delivery entry was deleted")
            out.extend(
                Delivery(_text(reply[i]), int(reply[i + 1]), bytes(reply[i + 2]))
                for i in range(4, len(reply), 3)
            )
            cursor = next_cursor if claiming and next_cursor != "0-0" else ""
            if len(out) >= count or (cursor == "" and fresh_full != "1"):
                break
        return out, cursor

    _MAX_DELIVERY_ROUNDS = 1000

    def _deliver_round(
        self, edge_id: str, owner: str, cursor: str, *, coalesce: bool, count: int
    ) -> Any:
        k = self.keys
        p = k.partition(edge_id)
        return self._script(
            scripts.DELIVER,
            [
                k.edge_stream(edge_id),
                k.log(p),
                k.presence(edge_id),
                k.deadlines(p),
                k.expiries(p),
                k.inflight(p),
                k.latest(edge_id),
                k.request(p, new_event_id()),
            ],
            [
                edge_id,
                owner,
                cursor,
                count,
                self.config.ack_timeout_ms,
                k.command_prefix(p),
                new_event_id(),
                "gateway:" + owner.split("|", 1)[0],
                _DELIVERABLE,
                _LOST_FROM,
                "1" if coalesce else "0",
            ],
        )

    async def transition(
        self,
        edge_id: str,
        command_id: str,
        event: Event,
        *,
        settle: bool,
        check_edge: bool,
        turn: Turn | None = None,
    ) -> TransitionResult:
        """Compare-and-set the command to the event's status and append the event."""
        if turn is not None:
            await turn.wait()
        pending = self.transition_now(
            edge_id, command_id, event, settle=settle, check_edge=check_edge
        )
        if turn is not None:
            turn.passed()
        return transition_result(await pending)

    def transition_now(
        self, edge_id: str, command_id: str, event: Event, *, settle: bool, check_edge: bool
    ) -> asyncio.Future[Any]:
        """`transition`'s script, queued before this returns: calls made in arrival order
        reach Redis in that order. Its reply reads with `transition_result`."""
        to = status_of(event)
        k = self.keys
        p = k.partition(edge_id)
        return self._script(
            scripts.TRANSITION,
            [
                k.command(edge_id, command_id),
                k.log(p),
                k.edge_stream(edge_id),
                k.deadlines(p),
                k.expiries(p),
                k.inflight(p),
                k.request(p, new_event_id()),
            ],
            [
                to.value,
                _ALLOWED_FROM[to],
                _encode(event),
                edge_id if check_edge else "",
                "1" if settle else "0",
                "1" if to in lifecycle.TERMINAL else "0",
                _LATE_FROM,
                self.config.state_ttl_s * 1000,
                command_id,
            ],
        )

    async def acknowledge(
        self, edge_id: str, ack: Ack, *, turn: Turn | None = None
    ) -> TransitionResult:
        """Apply an edge's acknowledgment of one of its own commands."""
        event = ack_event(edge_id, ack)
        return await self.transition(
            edge_id, ack.command_id, event, settle=True, check_edge=True, turn=turn
        )

    def log_of(self, edge_id: str) -> str:
        """The partition log holding the edge's commands' events."""
        return self.keys.log(self.keys.partition(edge_id))

    def acknowledge_now(self, edge_id: str, ack: Ack) -> tuple[Event, asyncio.Future[Any]]:
        """`acknowledge`'s event and script, queued before this returns (see
        `transition_now`)."""
        event = ack_event(edge_id, ack)
        pending = self.transition_now(edge_id, ack.command_id, event, settle=True, check_edge=True)
        return event, pending

    async def cancel(self, command_id: str, actor: str) -> TransitionResult:
        """Cancel a command that has not been delivered; a cancelled command is never sent."""
        edge_id = await self.edge_of(command_id)
        if edge_id is None:
            return TransitionResult(False, "")
        event = Cancelled(
            event_id=new_event_id(),
            command_id=command_id,
            edge_id=edge_id,
            actor=actor,
            error=error(ErrorCode.CANCELLED, f"cancelled by {actor} before delivery"),
        )
        return await self.transition(edge_id, command_id, event, settle=False, check_edge=False)

    # -- presence ----------------------------------------------------------------------------
    async def presence(self, op: str, edge_id: str, owner: str) -> Any:
        k = self.keys
        return await self.batcher.script(
            scripts.PRESENCE,
            [k.presence(edge_id), k.wake(k.partition(edge_id))],
            [op, owner, self.config.presence_ttl_ms, edge_id],
        )

    async def connect_edge(self, edge_id: str, owner: str) -> str:
        """Take the edge's presence; returns the owner it replaced ('' if none)."""
        return _text(await self.presence("connect", edge_id, owner))

    async def refresh_edge(self, edge_id: str, owner: str) -> bool:
        return int(await self.presence("refresh", edge_id, owner)) == 1

    async def refresh_edges(self, held: Sequence[tuple[str, str]]) -> list[bool]:
        """Extend the presence of many `(edge_id, owner)`; True where still owned.

        One script call per partition: a gateway holding 10,000 edges refreshes them for
        a few round trips' worth of work instead of 10,000 calls.
        """
        k = self.keys
        by_partition: dict[int, list[int]] = {}
        for i, (edge_id, _) in enumerate(held):
            by_partition.setdefault(k.partition(edge_id), []).append(i)
        groups = list(by_partition.values())
        replies = await asyncio.gather(
            *(
                self.batcher.script(
                    scripts.PRESENCE_REFRESH,
                    [k.presence(held[i][0]) for i in group],
                    [self.config.presence_ttl_ms, *(held[i][1] for i in group)],
                )
                for group in groups
            )
        )
        owned = [False] * len(held)
        for group, reply in zip(groups, replies, strict=True):
            for i, one in zip(group, reply, strict=True):
                owned[i] = int(one) == 1
        return owned

    async def disconnect_edge(self, edge_id: str, owner: str) -> None:
        await self.presence("disconnect", edge_id, owner)

    # -- verdicts ----------------------------------------------------------------------------
    def _verdict_keys(self, partition: int, actor: str) -> tuple[list[str], list[str]]:
        """The KEYS and leading ARGV that verdicts.lua and sweep.lua share."""
        k = self.keys
        keys = [
            k.deadlines(partition),
            k.expiries(partition),
            k.log(partition),
            k.inflight(partition),
        ]
        common = [k.command_prefix(partition), k.edge_stream_prefix(partition)]
        return keys, [*common, new_event_id(), actor]

    async def reach_verdicts(self, partition: int, *, actor: str, limit: int = 500) -> int:
        """Time out unacknowledged and expire undelivered commands that are due.

        Atomic per call and safe to run from any number of workers at once: each command
        gets exactly one verdict. Repeats while a call found a full batch due.
        """
        reached = 0
        while True:
            keys, common = self._verdict_keys(partition, actor)
            froms = [_ALLOWED_FROM[Status.TIMED_OUT], _ALLOWED_FROM[Status.EXPIRED]]
            args = [*common, limit, self.config.ack_timeout_ms, *froms]
            reply = await self._script(scripts.VERDICTS, keys, args)
            reached += int(reply[0])
            if int(reply[1]) < limit:
                return reached

    # -- retention ---------------------------------------------------------------------------
    async def sweep_vanished(self, partition: int, *, actor: str, chunk: int = 500) -> list[str]:
        """Give `lost` to every command whose delivery entry vanished before it was settled."""
        cursor, lost = "0", []
        while True:
            keys, common = self._verdict_keys(partition, actor)
            reply = await self._script(scripts.SWEEP, keys, [*common, cursor, chunk, _LOST_FROM])
            cursor = _text(reply[0])
            for i in range(2, len(reply), 2):
                command_id, edge_id = _text(reply[i]), _text(reply[i + 1])
                log_lost(command_id, edge_id, "its delivery entry vanished from the edge stream")
                lost.append(command_id)
            if cursor == "0":
                return lost

    async def trim(
        self, stream: str, *, keep_from: str, retain_ms: int, edge_id: str = "", partition: int = 0
    ) -> TrimResult:
        """XTRIM MINID below every group's pending/delivered position and `keep_from`.

        `keep_from` is the oldest id another reader still needs ('+' for none);
        `edge_id` names the edge of a delivery stream (its group may skip dead entries).
        """
        k = self.keys
        inflight = k.inflight(partition) if edge_id else stream
        reply = await self._script(
            scripts.TRIM,
            [stream, inflight],
            [
                keep_from,
                retain_ms,
                edge_id,
                k.command_prefix(partition),
                _DELIVERABLE,
                self.config.delivery_batch * 10,
            ],
        )
        return TrimResult(int(reply[0]), _text(reply[1]), int(reply[2]))

    async def edges_with_streams(self, partition: int) -> list[str]:
        return sorted(
            _text(e) for e in await self.batcher.call("SMEMBERS", self.keys.edge_streams(partition))
        )

    async def persistence(self) -> Persistence:
        """AOF and snapshot settings of the Redis that holds the ledger."""
        info = await self.redis.info("persistence")
        appendfsync, rdb = "unknown", None
        try:
            config = await self.redis.config_get("appendfsync", "save")
            appendfsync = str(config.get("appendfsync", "unknown"))
            rdb = bool(str(config.get("save", "")).strip())
        except Exception:  # CONFIG is often disabled on managed Redis; report what we know
            pass
        return Persistence(bool(int(info.get("aof_enabled", 0))), appendfsync, rdb)

    # -- reading -----------------------------------------------------------------------------
    async def edge_of(self, command_id: str) -> str | None:
        raw = await self.batcher.call("GET", self.keys.command_index(command_id))
        return None if raw is None else _text(raw)

    async def lookup(self, command_id: str) -> CommandRecord | None:
        """A command's state and its lifecycle events, straight from the ledger."""
        edge_id = await self.edge_of(command_id)
        if edge_id is None:
            return None
        raw = await self.batcher.call(
            "HMGET", self.keys.command(edge_id, command_id), "status", "late", "body", "events"
        )
        status, late, body, events = raw
        if status is None:
            return None
        return CommandRecord(
            command_id=command_id,
            edge_id=edge_id,
            status=_text(status),
            late=late is not None,
            command=EDGE_COMMAND_DECODER.decode(body),
            events=[EVENT_DECODER.decode(line) for line in bytes(events).split(b"\n")],
        )

    async def read_log(
        self, partition: int, start: str = "-", end: str = "+", count: int = 1000
    ) -> list[tuple[str, Event]]:
        """Events of one partition's log in order, for replay and projections."""
        rows = await self.batcher.call(
            "XRANGE", self.keys.log(partition), start, end, "COUNT", count
        )
        return [(_text(entry_id), EVENT_DECODER.decode(fields[b"e"])) for entry_id, fields in rows]

    # -- enrollment --------------------------------------------------------------------------
    async def enroll_edge(self, edge_id: str) -> None:
        await self.batcher.call("SADD", self.keys.edges(), edge_id)

    async def is_enrolled(self, edge_id: str) -> bool:
        return bool(await self.batcher.call("SISMEMBER", self.keys.edges(), edge_id))


def transition_result(reply: Any) -> TransitionResult:
    """What the transition script answered."""
    verdict = _text(reply[0])
    previous = _text(reply[1])
    if verdict != "ok":
        return TransitionResult(False, previous)
    after, entry = (_text(reply[4]), _text(reply[5])) if len(reply) > 5 else ("", "")
    return TransitionResult(True, previous, _text(reply[2]) == "1", int(reply[3]), after, entry)


def ack_event(edge_id: str, ack: Ack) -> Event:
    """The lifecycle event an edge's acknowledgment stands for."""
    header = EventHeader(new_event_id(), ack.command_id, edge_id, f"edge:{edge_id}")
    to = _ACK_STATUS[ack.status]
    if to is Status.DELIVERED:
        return Delivered(**header.fields())
    if to is Status.EXECUTED:
        return Executed(executed_at=ack.executed_at, **header.fields())
    if to is Status.FAILED:
        err = ack.error or _unexplained("failed")
        return Failed(error=err, executed_at=ack.executed_at, **header.fields())
    err = ack.error or _unexplained("rejected")
    return Rejected(error=err, stage="edge", **header.fields())


@dataclass(frozen=True, slots=True)
class EventHeader:
    event_id: str
    command_id: str
    edge_id: str
    actor: str

    def fields(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "command_id": self.command_id,
            "edge_id": self.edge_id,
            "actor": self.actor,
        }


def _unexplained(status: str) -> ErrorObject:
    return error(ErrorCode.INTERNAL, f"the edge reported {status} without an error object")
