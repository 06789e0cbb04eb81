"""`/ws/dashboard`: operators send commands and watch every transition they may view.

The handshake checks the Origin (cross-site WebSocket hijacking) and the bearer token
before anything is read. After that every command is checked on its own: the token
must still be unrevoked and unexpired, and the user must hold `can_control` on the
command's edge at that moment (grants are re-read within a second of a change).
"""

from __future__ import annotations

import functools
import logging

import msgspec
from starlette.websockets import WebSocket

from gateway import cancels
from gateway.admission import admit_user_socket
from gateway.auth import AuthError
from gateway.handshake import credentials, origin_allowed, refuse
from gateway.sessions import (
    CloseCode,
    DashboardSession,
    Outbox,
    protocol_refusal,
    slow_consumer,
    ws_hard_limit_bytes,
)
from gateway.state import GatewayState
from ledger.ordering import InOrder, Turn
from schemas.errors import ErrorCode, error

log = logging.getLogger("gateway.dashboard")
_encode = msgspec.json.Encoder().encode


async def dashboard_endpoint(ws: WebSocket) -> None:
    state: GatewayState = ws.app.state.gateway
    if not origin_allowed(ws, state.settings.allowed_origins):
        origin = ws.headers.get("origin")
        err = error(ErrorCode.FORBIDDEN, f"origin {origin!r} is not allowed")
        await state.audit_refusal(ws, "", err)
        await refuse(ws, 403, "forbidden", err.message)
        return
    token, subprotocol = credentials(ws)
    try:
        user = await state.authenticate_user(ws, token)
    except AuthError as exc:
        await refuse(ws, 401, "unauthenticated", str(exc))
        return
    if not await admit_user_socket(ws, user.user_id, user.actor):  # per-user socket cap
        return
    await ws.accept(subprotocol=subprotocol)
    dash = DashboardSession(ws=ws, user=user, outbox=Outbox(ws, state.outbox_limit))
    dash.outbox.start()
    await state.hub.add_dashboard(dash)
    log.info("dashboard.session.opened user=%s session=%s", user.user_id, dash.session_id)
    try:
        await dash.outbox.serve(_read_commands(state, dash))
    finally:
        state.hub.remove_dashboard(dash)
        if dash.outbox.overflowed:
            await state.intake.reject(b"", user.actor, slow_consumer(dash.outbox))
        await dash.outbox.finish()
        log.info("dashboard.session.closed user=%s session=%s", user.user_id, dash.session_id)


async def _read_commands(state: GatewayState, dash: DashboardSession) -> None:
    """Read frames; handle them concurrently, admit them in arrival order."""
    ws, user, intake = dash.ws, dash.user, state.intake
    in_order = InOrder()

    async def handle(raw: bytes, binary: bool, turn: Turn) -> None:
        if not binary and cancels.is_control_frame(raw):  # {"type": "cancel", ...}
            # Only once every earlier frame is admitted: a cancel sent right behind its
            # command must find it.
            await turn.wait()
            answer = await cancels.answer_frame(state, user, raw)
            dash.outbox.put(_encode(answer.reply).decode())
            return
        outcome = await intake.submit(raw, user, binary=binary, turn=turn)
        if outcome.rejected or not outcome.admitted:
            # Admitted commands answer through the lifecycle events of the ledger.
            dash.outbox.put(_encode(outcome.reply).decode())
        error_code = outcome.reply.error.code if outcome.reply.error is not None else ""
        if error_code == ErrorCode.UNAUTHENTICATED:
            reason = outcome.reply.error.message if outcome.reply.error else "credential ended"
            dash.outbox.close(CloseCode.CREDENTIAL_ENDED, reason[:120], flush=True)

    try:
        while not dash.outbox.closing:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                limit = ws_hard_limit_bytes(state.settings.max_message_bytes)
                cause = protocol_refusal(message, limit)
                if cause is not None:
                    await intake.reject(b"", user.actor, cause)
                return
            raw = message.get("bytes")
            binary = raw is not None
            if raw is None:
                raw = (message.get("text") or "").encode()
            await in_order.run(functools.partial(handle, raw, binary))
    finally:
        await in_order.drain()
