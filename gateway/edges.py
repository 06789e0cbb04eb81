"""`/ws/edge/{edge_id}`: the edge's persistent link; commands out, acknowledgments in."""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid

import msgspec
from starlette.websockets import WebSocket

from dispatch import tracing
from gateway import metrics
from gateway.auth import AuthError
from gateway.handshake import credentials, refuse
from gateway.intake import failure
from gateway.lifecycle_metrics import CLOCK_OFFSETS, traceparent_of
from gateway.sessions import EdgeSession, Outbox, protocol_refusal, ws_hard_limit_bytes
from gateway.state import GatewayState
from ledger.errors import LedgerUnavailable
from ledger.keys import SAFE_ID
from ledger.ordering import InOrder, Turn
from ledger.store import TransitionResult
from schemas.commands import Ack
from schemas.errors import ErrorCode, ErrorObject, error
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
    try:
        identity = await state.authenticate_edge(ws, token, edge_id)
    except AuthError as exc:
        await refuse(ws, 401, "unauthenticated", str(exc))
        return
    except LedgerUnavailable as exc:  # the credential cannot be checked now: say so, not 500
        await refuse(ws, 503, ErrorCode.UNAVAILABLE, str(exc))
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
    """Read acknowledgments; apply them concurrently, in arrival order."""
    ws = session.ws

    def answer_failure(exc: Exception) -> None:
        notice = EdgeNotice(type="ack_unrecorded", error=failure(exc, state.settings.ledger_wait_s))
        session.outbox.put(_encode(notice).decode())

    in_order = InOrder(answer_failure)
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
            await in_order.run(functools.partial(_acknowledge, state, session, raw))
    finally:
        await in_order.drain()


async def _acknowledge(state: GatewayState, session: EdgeSession, raw: bytes, turn: Turn) -> None:
    """Apply one ack and tell the edge what became of it: every ack gets a notice."""
    try:
        ack = ACK_DECODER.decode(raw)
    except Exception as exc:  # not JSON, not UTF-8, wrong shape: tell the edge, keep going
        turn.passed()
        metrics.ACKS.labels("invalid", "refused").inc()
        notice = EdgeNotice(
            type="ack_refused",
            error=ErrorObject(code="invalid_ack", message=f"unreadable acknowledgment: {exc}"),
        )
        session.outbox.put(_encode(notice).decode())
        return
    CLOCK_OFFSETS.note(session.edge_id, ack.clock_offset_ms)
    parent = traceparent_of(state.hub.lifecycle, ack.command_id)
    wait_s = state.settings.ledger_wait_s
    try:
        async with asyncio.timeout(wait_s):
            with tracing.span("dispatch.ack", parent, status=ack.status):
                result = await state.ledger.acknowledge(session.edge_id, ack, turn=turn)
    except Exception as exc:  # Redis down or failing: the edge keeps the ack and resends it
        turn.passed()
        metrics.ACKS.labels(ack.status, "unrecorded").inc()
        log.warning(
            "edge.ack.unrecorded command_id=%s edge_id=%s status=%s error=%r",
            ack.command_id,
            session.edge_id,
            ack.status,
            exc,
        )
        notice = EdgeNotice(
            type="ack_unrecorded",
            command_id=ack.command_id,
            status=ack.status,
            error=failure(exc, wait_s),
        )
        session.outbox.put(_encode(notice).decode())
        return
    session.acknowledges = True  # from now on its acks pace its deliveries
    state.hub.settled(session, ack.command_id)
    session.outbox.put(_encode(_notice(session.edge_id, ack, result)).decode())


def _notice(edge_id: str, ack: Ack, result: TransitionResult) -> EdgeNotice:
    """What became of an ack the ledger answered."""
    if result.applied:
        metrics.ACKS.labels(ack.status, "applied").inc()
        log.info(
            "command.transition command_id=%s edge_id=%s status=%s late=%s",
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
