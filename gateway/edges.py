"""`/ws/edge/{edge_id}`: the edge's persistent link; commands out, acknowledgments in."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

import msgspec
from starlette.websockets import WebSocket, WebSocketDisconnect

from gateway import metrics
from gateway.auth import AuthError
from gateway.handshake import credentials, refuse
from gateway.sessions import EdgeSession, Outbox
from gateway.state import GatewayState
from ledger.keys import SAFE_ID
from schemas.commands import Ack
from schemas.errors import ErrorCode, ErrorObject, error
from schemas.messages import EdgeNotice

log = logging.getLogger("gateway.edges")
ACK_DECODER = msgspec.json.Decoder(Ack)
_encode = msgspec.json.Encoder().encode


async def edge_endpoint(ws: WebSocket) -> None:
    state: GatewayState = ws.app.state.gateway
    edge_id = ws.path_params["edge_id"]
    if not SAFE_ID.match(edge_id) or len(edge_id) > 64:
        await refuse(ws, 400, "invalid_command", "edge id must be letters, digits, '_', '.', '-'")
        return
    token, _ = credentials(ws)
    try:
        if token is None:
            raise AuthError("no bearer token: send `Authorization: Bearer <edge credential>`")
        identity = state.auth.edge(token, edge_id)
        await state.check_not_revoked(identity.jti)
    except AuthError as exc:
        await state.audit_refusal(ws, edge_id, error(ErrorCode.UNAUTHENTICATED, str(exc)))
        await refuse(ws, 401, "unauthenticated", str(exc))
        return
    await ws.accept()
    owner = f"{state.gateway_id}|{uuid.uuid4().hex[:16]}"
    session = EdgeSession(ws=ws, identity=identity, owner=owner, outbox=Outbox(ws, 10_000))
    writer = asyncio.create_task(session.outbox.run())
    await state.ledger.enroll_edge(edge_id)
    log.info("edge.session.opened edge_id=%s owner=%s", edge_id, owner)
    try:
        await state.hub.add_edge(session)
        while not session.outbox.closing:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                break
            raw = message.get("bytes") or (message.get("text") or "").encode()
            await _acknowledge(state, session, raw)
    except WebSocketDisconnect:
        pass
    finally:
        await state.hub.remove_edge(session)
        session.outbox.close(1000, "bye")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer, 5)
        log.info("edge.session.closed edge_id=%s owner=%s", edge_id, owner)


async def _acknowledge(state: GatewayState, session: EdgeSession, raw: bytes) -> None:
    try:
        ack = ACK_DECODER.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        metrics.ACKS.labels("invalid", "refused").inc()
        notice = EdgeNotice(
            error=ErrorObject(code="invalid_ack", message=f"unreadable acknowledgment: {exc}")
        )
        session.outbox.put(_encode(notice).decode())
        return
    result = await state.ledger.acknowledge(session.edge_id, ack)
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
