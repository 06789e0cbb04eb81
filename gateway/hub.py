"""The gateway's in-process registry and its single reader of the ledger.

State here is only a cache of who is connected to this process; everything else lives
in Redis, so gateways can restart or run side by side. One task tails every partition
log and wake stream (one Redis connection), fans events out to dashboards and notices
`routed` events addressed to this gateway, which trigger a delivery to the edge.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable
from collections.abc import Set as AbstractSet
from datetime import UTC, datetime

import msgspec

from config import tracing
from gateway import metrics
from gateway.direct import DirectAnswers
from gateway.expiries import Expiries
from gateway.follows import Follows
from gateway.grants import GrantCache
from gateway.lifecycle_metrics import LifecycleMetrics
from gateway.refusals import refusal_event
from gateway.revocations import Revocations
from gateway.sessions import CloseCode, DashboardSession, EdgeSession, Outbox
from ledger import lifecycle
from ledger.connection import AnyRedis, is_cluster
from ledger.records import EVENT_DECODER, Appended, Delivery
from ledger.store import Ledger
from ledger.tail import StreamTail
from ledger.tasks import cancel_and_wait
from schemas.errors import ErrorCode, error
from schemas.events import Event, Rejected, Routed, Status, status_of
from schemas.messages import StatusUpdate, iso_ms

log = logging.getLogger("gateway.hub")
# Statuses of a command that still holds a place in its edge's flight.
_IN_FLIGHT = frozenset({Status.ISSUED, Status.AUTHORIZED, Status.QUEUED, Status.ROUTED})
_encode = msgspec.json.Encoder().encode
TICK_S = 0.25  # housekeeping: credentials end and grant changes apply within this
_FROM_REPLY = metrics.STATUS_FRAMES.labels("reply")
_FROM_TAIL = metrics.STATUS_FRAMES.labels("tail")
_UNSENT_REPLY = metrics.UNSENT.labels("reply")
_UNSENT_TAIL = metrics.UNSENT.labels("tail")


def status_update(event: Event) -> StatusUpdate:
    return StatusUpdate(
        command_id=event.command_id or None,
        status=status_of(event).value,
        at=iso_ms(event.at),
        edge_id=event.edge_id or None,
        error=getattr(event, "error", None),
        late=bool(getattr(event, "late", False)),
        delivery=event.delivery if isinstance(event, Routed) else None,
        event_id=event.event_id,
    )


class Hub:
    def __init__(
        self,
        ledger: Ledger,
        grants: GrantCache,
        tail_redis: AnyRedis,
        gateway_id: str,
        *,
        revocations: Revocations | None = None,
        follow_limit: int = 10_000,
        edge_inflight: int = 32,
    ) -> None:
        self.ledger = ledger
        self.grants = grants
        self.revocations = revocations
        self.gateway_id = gateway_id
        self.edges: dict[str, EdgeSession] = {}
        self.dashboards: set[DashboardSession] = set()
        # Who may watch what, indexed so an event costs O(its viewers), not O(dashboards).
        self._watchers: dict[str, set[DashboardSession]] = {}
        self._watch_all: set[DashboardSession] = set()
        # Senders and subscribers of each command, answered whatever their views.
        self.follows = Follows(follow_limit)
        # Statuses sent from script replies ahead of the tail, kept in log order.
        self.direct = DirectAnswers()
        self.edge_inflight = edge_inflight
        self._tail_redis = tail_redis
        self.lifecycle: LifecycleMetrics | None = None  # set by the app (gateway/app.py)
        self._wanting_delivery: set[str] = set()  # edges with entries to deliver now
        # Commands `deliver_behind` sent with their admission: their `routed` event
        # needs no delivery round of its own.
        self._handed: set[str] = set()
        self._delivery_wanted = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        # Sessions by credential end, and edges by last presence refresh (oldest first):
        # a housekeeping tick touches only the sessions whose time has come.
        self._dashboard_ends: Expiries[DashboardSession] = Expiries(self.dashboards.__contains__)
        self._edge_ends: Expiries[EdgeSession] = Expiries(self._serves)
        self._presence_due: deque[tuple[float, EdgeSession]] = deque()
        self._tails: list[StreamTail] = []
        keys = ledger.keys
        self._logs = {keys.log(p) for p in keys.all_partitions()}
        self._streams = [keys.log(p) for p in keys.all_partitions()] + [
            keys.wake(p) for p in keys.all_partitions()
        ]

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        if is_cluster(self._tail_redis):
            keys = self.ledger.keys
            groups = [[keys.log(p), keys.wake(p)] for p in keys.all_partitions()]
        else:
            groups = [self._streams]  # one XREAD for everything
        self._tails = [StreamTail(self._tail_redis, streams) for streams in groups]
        for tail in self._tails:
            await tail.start_at_end()
        metrics.TAIL_AGE.set_function(self.tail_age_s)
        self._tasks = [
            *(asyncio.create_task(self._follow(t), name="hub-tail") for t in self._tails),
            asyncio.create_task(self._deliveries(), name="hub-deliveries"),
            asyncio.create_task(self._housekeeping(), name="hub-housekeeping"),
        ]

    async def stop(self) -> None:
        for session in list(self.edges.values()):
            session.outbox.close(CloseCode.GOING_AWAY, "gateway shutting down")
        for dash in list(self.dashboards):
            dash.outbox.close(CloseCode.GOING_AWAY, "gateway shutting down")
        await cancel_and_wait(self._tasks)
        for session in list(self.edges.values()):
            with contextlib.suppress(Exception):
                await self.ledger.disconnect_edge(session.edge_id, session.owner)

    # -- dashboards --------------------------------------------------------------------------
    async def add_dashboard(self, dash: DashboardSession) -> None:
        self.dashboards.add(dash)
        self._dashboard_ends.add(dash.user.valid_until or dash.user.expires_at, dash)
        self._unless_revoked(dash.outbox, dash.user.jti, dash.user.actor, "token revoked")
        await self.refresh_views(dash)
        metrics.DASHBOARDS.set(len(self.dashboards))

    def remove_dashboard(self, dash: DashboardSession) -> None:
        self.dashboards.discard(dash)
        self._unindex(dash)
        self.follows.forget(dash)
        metrics.DASHBOARDS.set(len(self.dashboards))

    def _unindex(self, dash: DashboardSession) -> None:
        self._watch_all.discard(dash)
        for edge_id in dash.views:
            watchers = self._watchers.get(edge_id)
            if watchers is not None:
                watchers.discard(dash)
                if not watchers:
                    del self._watchers[edge_id]

    async def refresh_views(self, dash: DashboardSession) -> None:
        """Recompute which edges a dashboard may watch (token claims, grants, groups)."""
        visible = await self.grants.visible_edges(dash.user)
        self._unindex(dash)
        dash.views_all = visible is None
        dash.views = visible or frozenset()
        if dash not in self.dashboards:
            return  # closed while its grants were loading
        if dash.views_all:
            self._watch_all.add(dash)
        for edge_id in dash.views:
            self._watchers.setdefault(edge_id, set()).add(dash)

    # -- edges -------------------------------------------------------------------------------
    async def add_edge(self, session: EdgeSession) -> None:
        """Take the edge's presence and hand it everything waiting for it."""
        previous_local = self.edges.get(session.edge_id)
        self.edges[session.edge_id] = session
        self._edge_ends.add(session.identity.valid_until or session.identity.expires_at, session)
        self._presence_due.append((time.time(), session))
        self._unless_revoked(
            session.outbox, session.identity.jti, session.identity.actor, "credential revoked"
        )
        session.outbox.on_drained = lambda: self.drained(session)
        metrics.EDGES.set(len(self.edges))
        if previous_local is not None and previous_local is not session:
            previous_local.outbox.close(CloseCode.REPLACED, "replaced by a newer connection")
        replaced = await self.ledger.connect_edge(session.edge_id, session.owner)
        if replaced:
            log.info("edge.session.replaced edge_id=%s previous=%s", session.edge_id, replaced)
        await self._deliver(session)
        session.ready = True
        self.want_delivery(session.edge_id)

    def _unless_revoked(self, outbox: Outbox, jti: str, actor: str, reason: str) -> None:
        # A revocation read between this session's handshake and now was applied to the
        # sessions registered then, which did not include this one yet.
        if self.revocations is not None and self.revocations.revoked(jti):
            self.end_session(outbox, actor, reason)

    def _serves(self, session: EdgeSession) -> bool:
        return self.edges.get(session.edge_id) is session

    async def remove_edge(self, session: EdgeSession) -> None:
        if self.edges.get(session.edge_id) is session:
            del self.edges[session.edge_id]
            metrics.EDGES.set(len(self.edges))
        with contextlib.suppress(Exception):
            await self.ledger.disconnect_edge(session.edge_id, session.owner)

    def want_delivery(self, edge_id: str) -> None:
        self._wanting_delivery.add(edge_id)
        self._delivery_wanted.set()

    async def _deliveries(self) -> None:
        """Deliver to every edge wanting delivery; many edges share each Redis round trip."""
        while True:
            await self._delivery_wanted.wait()
            self._delivery_wanted.clear()
            wanting, self._wanting_delivery = self._wanting_delivery, set()
            sessions = [s for e in wanting if (s := self.edges.get(e)) is not None and s.ready]
            results = await asyncio.gather(
                *(self._deliver(s) for s in sessions), return_exceptions=True
            )
            failed = [s for s, r in zip(sessions, results, strict=True) if isinstance(r, Exception)]
            for session in failed:
                log.warning("edge.delivery.failed edge_id=%s", session.edge_id)
                # Its reply may have been lost after Redis handed entries out: reclaim them.
                session.claim_cursor = "0-0"
            if failed:
                await asyncio.sleep(0.2)  # Redis trouble: retry those shortly, not in a hot loop
                for session in failed:
                    self.want_delivery(session.edge_id)

    def _room(self, session: EdgeSession) -> int:
        """How many commands the edge may be sent now (0: it is at its in-flight bound).

        Up to `edge_inflight` commands may be sent and not yet accepted. An edge that
        has not acknowledged anything in this session cannot pace by its acks: it gets
        more whenever its socket has written everything it was given.
        """
        room = self.edge_inflight - len(session.unacked)
        if room <= 0 and not session.acknowledges and session.outbox.idle:
            room = self.edge_inflight
        return max(0, min(room, self.ledger.config.delivery_batch))

    def deliver_behind(self, edge_id: str, command_id: str) -> None:
        """Queue the edge's delivery right behind a command's admission script.

        Called by the intake once the admission is queued: when this process holds the
        edge, the delivery rides in the same pipeline, so the edge gets the command one
        Redis round trip after the dashboard sent it instead of after the tail brings
        `routed` back and a second round trip. Whatever this does not hand out (the
        command was queued, refused, or the edge has older entries first) is delivered
        the usual way.
        """
        session = self.edges.get(edge_id)
        if (
            session is None
            or not session.ready
            or session.delivering
            or session.claim_cursor != ""
            or session.outbox.closing
        ):
            return
        count = self._room(session)
        if count == 0:
            return
        if len(self._handed) >= 100_000:  # routed events that never came: do not grow
            self._handed.clear()
        self._handed.add(command_id)
        session.delivering = True
        pending = self.ledger.deliver_now(edge_id, session.owner, count=count)
        task = asyncio.create_task(self._deliver_behind(session, pending, count, command_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _deliver_behind(
        self,
        session: EdgeSession,
        pending: Awaitable[tuple[list[Delivery], str] | None],
        count: int,
        command_id: str,
    ) -> None:
        try:
            got = await pending
        except Exception as exc:  # Redis trouble: the usual path retries
            log.warning("edge.delivery.failed edge_id=%s error=%r", session.edge_id, exc)
            session.claim_cursor = "0-0"  # its reply may be lost: reclaim what it handed out
            got = ([], session.claim_cursor)
        finally:
            session.delivering = False
        sent = self._hand_out(session, got, count)
        if command_id not in sent:
            # Not handed out here: its `routed` event (if any) must trigger the delivery.
            self._handed.discard(command_id)
            session.again = True
        if session.again:
            session.again = False
            self.want_delivery(session.edge_id)

    async def _deliver(self, session: EdgeSession) -> None:
        """Send only what the edge's link can drain; the rest waits in Redis."""
        if session.delivering:  # one delivery per edge at a time: go on when it is back
            session.again = True
            return
        count = self._room(session)
        if count == 0:
            session.more = True
            return
        session.delivering = True
        try:
            got = await self.ledger.deliver_some(
                session.edge_id, session.owner, cursor=session.claim_cursor, count=count
            )
        finally:
            session.delivering = False
        self._hand_out(session, got, count)
        if session.again:
            session.again = False
            self.want_delivery(session.edge_id)

    def _hand_out(
        self, session: EdgeSession, got: tuple[list[Delivery], str] | None, count: int
    ) -> set[str]:
        """Send what the ledger handed to the session; returns the command ids sent."""
        sent: set[str] = set()
        if got is None:
            # Another session owns the edge now (this one was replaced or expired).
            session.outbox.close(CloseCode.REPLACED, "another connection owns this edge now")
            return sent
        deliveries, session.claim_cursor = got
        now = datetime.now(UTC)
        for delivery in deliveries:
            if not session.outbox.put(delivery.frame(now).decode()):
                break
            session.unacked.add(delivery.command_id)
            sent.add(delivery.command_id)
            metrics.DELIVERIES.inc()
            if tracing.enabled():
                tracing.record(
                    "dispatch.deliver",
                    tracing.traceparent_in(delivery.body),
                    start_ns=time.time_ns(),
                    delivery=delivery.delivery,
                )
        session.more = len(deliveries) >= count or session.claim_cursor != ""
        if session.more and len(session.unacked) < self.edge_inflight:
            self.want_delivery(session.edge_id)  # more waiting beyond this batch
        return sent

    def drained(self, session: EdgeSession) -> None:
        """The edge's socket wrote everything queued: what waits in Redis may follow."""
        if session.more:
            self.want_delivery(session.edge_id)

    def settled(self, session: EdgeSession, command_id: str) -> None:
        """The edge accepted (or finished) a command: its place in flight is free."""
        if command_id in session.unacked:
            session.unacked.discard(command_id)
            if session.more:
                self.want_delivery(session.edge_id)

    # -- the ledger tail ---------------------------------------------------------------------
    def tail_age_s(self) -> float:
        """Seconds since the ledger tail last read (it reads at least once a second while
        well): every status this gateway sends comes through it."""
        now = time.monotonic()
        return max((now - tail.last_read for tail in self._tails), default=0.0)

    async def _follow(self, tail: StreamTail) -> None:
        async for batch in tail:
            # The replies of this gateway's scripts that appended these events arrive
            # with them: let their callers go first, so they answer from the reply and
            # the tail only skips what they sent (gateway/direct.py).
            await self.ledger.batcher.answered()
            for stream, entry_id, fields in batch:
                try:
                    if stream in self._logs:
                        entry = entry_id.decode()
                        if self.direct.passed(stream, entry):
                            continue  # passed on (and accounted for) from its reply
                        self._on_event(stream, entry, EVENT_DECODER.decode(fields[b"e"]))
                    else:
                        self._on_wake(fields)
                except Exception:  # counted and alarmed (DispatchStatusesUnsent); go on
                    _UNSENT_TAIL.inc()
                    log.exception("gateway.tail.bad_entry stream=%s", stream)

    def _on_event(self, stream: str, entry_id: str, event: Event) -> None:
        status = status_of(event)
        sent = self.direct.reached(
            stream, event.command_id, entry_id, terminal=status in lifecycle.TERMINAL
        )
        if self._account(event, status) and not sent:  # not passed on from a reply already
            _FROM_TAIL.inc()
            self._fan_out(event, status)

    def _account(self, event: Event, status: Status) -> bool:
        """What every lifecycle event asks of this gateway once, from the tail or from
        the reply that passed it on: metrics and its transition line, the delivery it
        may call for, the edge's room. False: a gateway-stage refusal (its submitter
        has its answer; nobody else gets a frame)."""
        if self.lifecycle is not None:
            self.lifecycle.observe(event)
        if isinstance(event, Routed) and event.gateway == self.gateway_id:
            if event.command_id in self._handed:
                self._handed.discard(event.command_id)  # already sent by deliver_behind
            else:
                self.want_delivery(event.edge_id)
        if isinstance(event, Rejected) and event.stage == "gateway":
            return False
        if status not in _IN_FLIGHT and (edge := self.edges.get(event.edge_id)) is not None:
            self.settled(edge, event.command_id)  # e.g. timed out: free its place
        metrics.labelled(metrics.EVENTS, status).inc()
        return True

    def admitted(self, appended: Appended) -> None:
        """An admission's statuses: sent right after the edge's delivery that rode in the
        same pipeline (`deliver_behind`), which is what the sender waits for."""
        asyncio.get_running_loop().call_soon(self.pass_on, appended)

    def pass_on(self, appended: Appended | None) -> None:
        """Send the statuses of events this gateway just appended, if their turn has come
        (gateway/direct.py); otherwise the tail sends them."""
        if appended is not None and self.direct.take(appended):
            _FROM_REPLY.inc(len(appended.events))
            for _, event in appended.events:
                try:
                    self._fan_out(event, status_of(event))
                except Exception:  # counted and alarmed (DispatchStatusesUnsent); go on
                    _UNSENT_REPLY.inc()
                    log.exception("gateway.fan_out.failed command_id=%s", event.command_id)
            # The tail will skip these undecoded: their bookkeeping happens here, once
            # every frame is queued.
            for _, event in appended.events:
                try:
                    self._account(event, status_of(event))
                except Exception:  # the frames are out: counted and alarmed; go on
                    metrics.ACCOUNTING_FAILED.inc()
                    log.exception("gateway.account.failed command_id=%s", event.command_id)

    def _fan_out(self, event: Event, status: Status) -> None:
        """One status frame to the edge's viewers and the command's followers."""
        frame = _encode(status_update(event)).decode()
        viewers = self.broadcast(event.edge_id, frame)
        for dash in self.follows.of(event.command_id):
            if dash not in viewers:  # a viewer already has it: one frame per session
                dash.outbox.put(frame)
        if status in lifecycle.TERMINAL:
            self.follows.settled(event.command_id)

    def broadcast(self, edge_id: str, frame: str) -> AbstractSet[DashboardSession]:
        """Send `frame` to the edge's viewers; returns them."""
        viewers = self._viewers(edge_id)
        for dash in viewers:
            dash.outbox.put(frame)
        return viewers

    def _viewers(self, edge_id: str) -> AbstractSet[DashboardSession]:
        watchers = self._watchers.get(edge_id)
        if not watchers:
            return self._watch_all
        return watchers | self._watch_all if self._watch_all else watchers

    def _on_wake(self, fields: dict[bytes, bytes]) -> None:
        if fields.get(b"kind") != b"replaced":
            return
        edge_id = fields[b"edge"].decode()
        session = self.edges.get(edge_id)
        if session is not None and session.owner == fields[b"owner"].decode():
            log.info("edge.session.closed edge_id=%s reason=replaced", edge_id)
            session.outbox.close(CloseCode.REPLACED, "replaced by a newer connection")

    # -- housekeeping ------------------------------------------------------------------------
    async def _housekeeping(self) -> None:
        """Refresh edge presence, close ended credentials, re-derive dashboard views."""
        period_s = self.ledger.config.presence_ttl_ms / 1000 / 3
        while True:
            await asyncio.sleep(TICK_S)
            now = time.time()
            try:
                if await self.grants.poll():
                    for dash in list(self.dashboards):
                        await self.refresh_views(dash)
                revoked = self.revocations is not None and await self.revocations.poll()
                self._end_credentials(now, revoked=revoked)
                await self._refresh_presence(now, period_s)
            except Exception as exc:  # keep the gateway alive through Redis blips
                log.warning("gateway.housekeeping.failed error=%s", exc)

    def _end_credentials(self, now: float, *, revoked: bool) -> None:
        """Close sessions whose token expired (within one tick) or was just revoked."""
        if revoked and self.revocations is not None:
            denied = self.revocations.revoked
            for dash in list(self.dashboards):
                if denied(dash.user.jti):
                    self.end_session(dash.outbox, dash.user.actor, "token revoked")
            for session in list(self.edges.values()):
                if denied(session.identity.jti):
                    self.end_session(session.outbox, session.identity.actor, "credential revoked")
        for dash in list(self._dashboard_ends.due(now)):
            self.end_session(dash.outbox, dash.user.actor, "token expired")
        for session in list(self._edge_ends.due(now)):
            self.end_session(session.outbox, session.identity.actor, "credential expired")

    def end_session(self, outbox: Outbox, actor: str, reason: str) -> None:
        """Close a session whose credential ended, and say so in the audit stream."""
        if outbox.closing:
            return
        outbox.close(CloseCode.CREDENTIAL_ENDED, reason)
        log.info("gateway.session.ended actor=%s reason=%s", actor, reason.replace(" ", "_"))
        event = refusal_event(
            actor,
            error(ErrorCode.UNAUTHENTICATED, f"{reason}: connection closed (4003)"),
            edge_id=actor.removeprefix("edge:") if actor.startswith("edge:") else "",
        )
        task = asyncio.create_task(self.ledger.record_rejection(event))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _refresh_presence(self, now: float, period_s: float) -> None:
        """Extend the presence of the edges refreshed `period_s` ago, a slice per tick.

        At most twice the steady rate per tick, so 10,000 edges that connected together
        are spread over the ticks instead of refreshed in one burst every period.
        """
        due = self._presence_due
        most = max(64, math.ceil(2 * len(self.edges) * TICK_S / period_s))
        sessions: list[EdgeSession] = []
        while due and len(sessions) < most and due[0][0] + period_s <= now:
            _, session = due.popleft()
            if self._serves(session):
                sessions.append(session)
        if not sessions:
            return
        try:
            owned = await self.ledger.refresh_edges([(s.edge_id, s.owner) for s in sessions])
        except Exception:
            due.extend((now, s) for s in sessions)  # Redis trouble: again next period
            raise
        for session, still in zip(sessions, owned, strict=True):
            if not still:
                # The presence lapsed or moved: commands may have been queued meanwhile, so
                # close; the edge reconnects and its new session claims everything waiting.
                session.outbox.close(CloseCode.REPLACED, "another connection owns this edge now")
            elif self._serves(session):
                due.append((now, session))
