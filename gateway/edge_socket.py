"""`/ws/edge/{edge_id}`: the edge's persistent link; commands out, acknowledgments in."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from typing import Any

import msgspec
from starlette.websockets import WebSocket

from config import tracing
from gateway import metrics
from gateway.handshake import authenticated, credentials, refuse
from gateway.intake import failure
from gateway.lifecycle_metrics import CLOCK_OFFSETS, traceparent_of
from gateway.sessions import EdgeSession, Outbox, protocol_refusal, ws_hard_limit_bytes
from gateway.state import GatewayState
from ledger.keys import SAFE_ID
from ledger.records import TransitionResult
from ledger.store import transition_result
from schemas.commands import Ack
from schemas.errors import ErrorCode, ErrorObject, error
from schemas.events import Event
from schemas.messages import EdgeNotice

log = logging.getLogger("gateway.edges")
ACK_DECODER = msgspec.json.Decoder(Ack)
_encode = msgspec.json.Encoder().encode


async def edge_endpoint(ws: WebSocket) -> None:
    state: GatewayState = ws.app.state.gateway
    edge_id = ws.path_params["edge_id"]
    if not SAFE_ID.fullmatch(edge_id) or len(edge_id) > 64:
        err = error(ErrorCode.INVALID_COMMAND, "edge id must be letters, digits, '_', '.', '-'")
        await state.audit_refusal(ws, "", err, detail=f"edge id {edge_id[:80]!r}")
        await refuse(ws, 400, err.code, err.message)
        return
    if ws.headers.get("origin") is not None:
        # Edges are not browsers: a page from any origin has no business here.
        err = error(ErrorCode.FORBIDDEN, "browser pages may not connect as an edge")
        await state.audit_refusal(ws, edge_id, err, detail=f"origin {ws.headers['origin'][:80]!r}")
        await refuse(ws, 403, err.code, err.message)
        return
    token, _ = credentials(ws)
    identity = await authenticated(ws, state.authenticate_edge(ws, token, edge_id))
    if identity is None:
        return
    await ws.accept()
    owner = f"{state.gateway_id}|{uuid.uuid4().hex[:16]}"
    session = EdgeSession(ws=ws, identity=identity, owner=owner, outbox=Outbox(ws, 10_000))
    session.outbox.start()
    await state.ledger.enroll_edge(edge_id)
    log.info("edge.session.opened edge_id=%s owner=%s", edge_id, owner)
    try:
        await state.hub.add_edge(session)
        await session.outbox.serve(_read_acks(state, session))
    finally:
        await state.hub.remove_edge(session)
        await session.outbox.finish()
        log.info("edge.session.closed edge_id=%s owner=%s", edge_id, owner)


async def _read_acks(state: GatewayState, session: EdgeSession) -> None:
    """Read acknowledgments and record them in arrival order."""
    ws = session.ws
    acks = _Acks(state, session)
    try:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                limit = ws_hard_limit_bytes(state.settings.max_message_bytes)
                cause = protocol_refusal(message, limit)
                if cause is not None:
                    await state.intake.reject(b"", session.identity.actor, cause)
                return
            raw = message.get("bytes")
            if raw is None:
                raw = (message.get("text") or "").encode()
            await acks.room()
            acks.receive(raw)
    finally:
        await acks.drain()


class _Acks:
    """One edge connection's acknowledgments: every ack gets a notice.

    No task per frame: each ack's transition is queued as it is read (so acks reach
    Redis in arrival order, which is all the order they need), and its notice is sent
    from the reply's callback. At most `limit` are out at a time; one that Redis does
    not answer within the ledger wait is answered `ack_unrecorded` (the edge resends).
    """

    def __init__(self, state: GatewayState, session: EdgeSession, limit: int = 64) -> None:
        self.state = state
        self.session = session
        self.limit = limit
        self.wait_s = state.settings.ledger_wait_s
        self.pending: set[asyncio.Future[Any]] = set()
        self.log = state.ledger.log_of(session.edge_id)

    async def room(self) -> None:
        while len(self.pending) >= self.limit:
            await asyncio.wait(self.pending, return_when=asyncio.FIRST_COMPLETED)

    async def drain(self) -> None:
        """Wait for the acks still out (each is answered within the ledger wait)."""
        if self.pending:
            await asyncio.wait(self.pending, timeout=self.wait_s * 2)

    def receive(self, raw: bytes) -> None:
        session = self.session
        try:
            ack = ACK_DECODER.decode(raw)
        except Exception as exc:  # not JSON, not UTF-8, wrong shape: tell the edge, keep going
            metrics.ACKS.labels("invalid", "refused").inc()
            notice = EdgeNotice(
                type="ack_refused",
                error=ErrorObject(code="invalid_ack", message=f"unreadable acknowledgment: {exc}"),
            )
            session.outbox.put(_encode(notice).decode())
            return
        CLOCK_OFFSETS.note(session.edge_id, ack.clock_offset_ms)
        # The trace context now: by the reply the tail may have closed the command.
        trace = (
            (time.time_ns(), traceparent_of(self.state.hub.lifecycle, ack.command_id))
            if tracing.enabled()
            else None
        )
        try:
            event, pending = self.state.ledger.acknowledge_now(session.edge_id, ack)
        except Exception as exc:  # the ledger is not running: the edge keeps the ack
            self._unrecorded(ack, exc)
            return
        timer = asyncio.get_running_loop().call_later(self.wait_s, self._too_slow, pending, ack)
        self.pending.add(pending)
        pending.add_done_callback(functools.partial(self._answered, ack, event, timer, trace))

    def _too_slow(self, pending: asyncio.Future[Any], ack: Ack) -> None:
        if not pending.done():
            pending.cancel()  # still queued: the batcher drops it; sent: the reply is ignored
            self._unrecorded(ack, TimeoutError())

    def _answered(
        self,
        ack: Ack,
        event: Event,
        timer: asyncio.TimerHandle,
        trace: tuple[int, str | None] | None,
        pending: asyncio.Future[Any],
    ) -> None:
        self.pending.discard(pending)
        timer.cancel()
        if pending.cancelled():
            return  # answered by _too_slow
        session = self.session
        try:
            exc = pending.exception()
            if exc is not None:  # Redis down or failing: the edge keeps the ack and resends it
                self._unrecorded(ack, exc)
                return
            result = transition_result(pending.result())
            if trace is not None:
                tracing.record("dispatch.ack", trace[1], start_ns=trace[0], status=ack.status)
            session.acknowledges = True  # from now on its acks pace its deliveries
            # The sender and viewers hear it now, not when the tail brings it.
            self.state.hub.pass_on(result.appended(self.log, event))
            self.state.hub.settled(session, ack.command_id)
            session.outbox.put(_encode(_notice(session.edge_id, ack, result)).decode())
        except Exception as exc:  # a bug here must still answer the edge
            log.exception("edge.ack.failed command_id=%s", ack.command_id)
            self._unrecorded(ack, exc)

    def _unrecorded(self, ack: Ack, exc: BaseException) -> None:
        metrics.ACKS.labels(ack.status, "unrecorded").inc()
        log.warning(
            "edge.ack.unrecorded command_id=%s edge_id=%s status=%s error=%r",
            ack.command_id,
            self.session.edge_id,
            ack.status,
            exc,
        )
        notice = EdgeNotice(
            type="ack_unrecorded",
            command_id=ack.command_id,
            status=ack.status,
            error=failure(exc, self.wait_s),
        )
        self.session.outbox.put(_encode(notice).decode())


def _notice(edge_id: str, ack: Ack, result: TransitionResult) -> EdgeNotice:
    """What became of an ack the ledger answered."""
    if result.applied:
        metrics.labelled(metrics.ACKS, ack.status, "applied").inc()
        # Every applied event has its `command.transition` line from the hub's tail
        # (dispatch.transition); a late ack is worth its own line besides.
        log.log(
            logging.INFO if result.late else logging.DEBUG,
            "edge.ack.applied command_id=%s edge_id=%s status=%s late=%s",
            ack.command_id,
            edge_id,
            ack.status,
            result.late,
        )
        return EdgeNotice(type="ack_recorded", command_id=ack.command_id, status=ack.status)
    if result.unknown:
        metrics.ACKS.labels(ack.status, "unknown").inc()
        return EdgeNotice(
            type="ack_refused",
            command_id=ack.command_id,
            error=ErrorObject(
                code="unknown_command", message=f"no command {ack.command_id!r} for this edge"
            ),
        )
    # Repeated (e.g. resent after a reconnect) or overtaken: the ledger already holds this
    # status or a later one, so the edge may forget the ack.
    metrics.ACKS.labels(ack.status, "ignored").inc()
    log.debug(
        "edge.ack.ignored command_id=%s status=%s current=%s",
        ack.command_id,
        ack.status,
        result.previous,
    )
    if ack.status in ("accepted", result.previous):
        return EdgeNotice(type="ack_recorded", command_id=ack.command_id, status=result.previous)
    return EdgeNotice(
        type="ack_refused",
        command_id=ack.command_id,
        status=result.previous,
        error=ErrorObject(
            code="ack_conflict",
            message=f"command {ack.command_id!r} is already {result.previous}; "
            f"a {ack.status!r} acknowledgment can no longer be recorded",
        ),
    )
