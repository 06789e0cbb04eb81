"""`/ws/edge/{edge_id}`: the edge's persistent link; commands out, acknowledgments in."""

from __future__ import annotations

import functools
import logging
import uuid

import msgspec
from starlette.websockets import WebSocket

from dispatch import tracing
from gateway import metrics
from gateway.auth import AuthError
from gateway.handshake import credentials, refuse
from gateway.lifecycle_metrics import CLOCK_OFFSETS, traceparent_of
from gateway.sessions import EdgeSession, Outbox, protocol_refusal, ws_hard_limit_bytes
from gateway.state import GatewayState
from ledger.keys import SAFE_ID
from ledger.ordering import InOrder, Turn
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
    in_order = InOrder()
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
    try:
        ack = ACK_DECODER.decode(raw)
    except Exception as exc:  # not JSON, not UTF-8, wrong shape: tell the edge, keep going
        metrics.ACKS.labels("invalid", "refused").inc()
        notice = EdgeNotice(
            error=ErrorObject(code="invalid_ack", message=f"unreadable acknowledgment: {exc}")
        )
        session.outbox.put(_encode(notice).decode())
        return
    CLOCK_OFFSETS.note(session.edge_id, ack.clock_offset_ms)
    parent = traceparent_of(state.hub.lifecycle, ack.command_id)
    with tracing.span("dispatch.ack", parent, status=ack.status):
        result = await state.ledger.acknowledge(session.edge_id, ack, turn=turn)
    if result.applied:
        metrics.ACKS.labels(ack.status, "applied").inc()
        log.info(
            "command.transition command_id=%s edge_id=%s status=%s late=%s",
            ack.command_id,
            session.edge_id,
            ack.status,
            result.late,
        )
        return
    if result.unknown:
        metrics.ACKS.labels(ack.status, "unknown").inc()
        notice = EdgeNotice(
            command_id=ack.command_id,
            error=ErrorObject(
                code="unknown_command", message=f"no command {ack.command_id!r} for this edge"
            ),
        )
        session.outbox.put(_encode(notice).decode())
        return
    # A repeated or out-of-order acknowledgment (e.g. resent after a reconnect): harmless.
    metrics.ACKS.labels(ack.status, "ignored").inc()
    log.debug(
        "edge.ack.ignored command_id=%s status=%s current=%s",
        ack.command_id,
        ack.status,
        result.previous,
    )
