"""`/ws/dashboard`: operators send commands and watch every transition they may view."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import msgspec
from starlette.websockets import WebSocket, WebSocketDisconnect

from gateway import cancels
from gateway.auth import AuthError
from gateway.handshake import credentials, origin_allowed, refuse
from gateway.intake import Intake
from gateway.sessions import DashboardSession, Outbox
from gateway.state import GatewayState
from schemas.errors import ErrorCode, error

log = logging.getLogger("gateway.dashboard")
_encode = msgspec.json.Encoder().encode


async def dashboard_endpoint(ws: WebSocket) -> None:
    state: GatewayState = ws.app.state.gateway
    intake: Intake = state.intake
    if not origin_allowed(ws, state.settings.allowed_origins):
        await state.audit_refusal(ws, "", error(ErrorCode.FORBIDDEN, "origin not allowed"))
        await refuse(ws, 403, "forbidden", f"origin {ws.headers.get('origin')!r} is not allowed")
        return
    token, subprotocol = credentials(ws)
    try:
        if token is None:
            raise AuthError("no bearer token: send `Authorization: Bearer <token>`")
        user = state.auth.user(token)
        await state.check_not_revoked(user.jti)
    except AuthError as exc:
        await state.audit_refusal(ws, "", error(ErrorCode.UNAUTHENTICATED, str(exc)))
        await refuse(ws, 401, "unauthenticated", str(exc))
        return
    await ws.accept(subprotocol=subprotocol)
    dash = DashboardSession(ws=ws, user=user, outbox=Outbox(ws, state.outbox_limit))
    writer = asyncio.create_task(dash.outbox.run())
    await state.hub.add_dashboard(dash)
    log.info("dashboard.session.opened user=%s session=%s", user.user_id, dash.session_id)
    try:
        while not dash.outbox.closing:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                break
            raw = message.get("bytes")
            if raw is None:
                raw = (message.get("text") or "").encode()
            if time.time() > user.expires_at + 30:
                dash.outbox.close(4003, "token expired")
                break
            if cancels.is_control_frame(raw):  # {"type": "cancel", ...}
                answer = await cancels.answer_frame(state, user, raw)
                dash.outbox.put(_encode(answer.reply).decode())
                continue
            outcome = await intake.submit(raw, user)
            if outcome.rejected or not outcome.admitted:
                # Admitted commands answer through the lifecycle events of the ledger.
                dash.outbox.put(_encode(outcome.reply).decode())
    except WebSocketDisconnect:
        pass
    finally:
        state.hub.remove_dashboard(dash)
        dash.outbox.close(1000, "bye")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer, 5)
        log.info("dashboard.session.closed user=%s session=%s", user.user_id, dash.session_id)
