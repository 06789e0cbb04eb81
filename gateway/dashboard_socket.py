"""`/ws/dashboard`: operators send commands and watch every transition they may view.

The handshake checks the Origin (cross-site WebSocket hijacking) and the bearer token
before anything is read. After that every command is checked on its own: the token
must still be unrevoked and unexpired, and the user must hold `can_control` on the
command's edge at that moment (grants are re-read within a second of a change).
"""

from __future__ import annotations

import asyncio
import functools
import logging

import msgspec
from starlette.websockets import WebSocket

from gateway import cancels, subscriptions
from gateway.admission import admit_user_socket
from gateway.handshake import authenticated, credentials, origin_allowed, refuse
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
from schemas.messages import StatusUpdate, Subscribed

_encode = msgspec.json.Encoder().encode
log = logging.getLogger("gateway.dashboard")


async def dashboard_endpoint(ws: WebSocket) -> None:
    state: GatewayState = ws.app.state.gateway
    if not origin_allowed(ws, state.settings.allowed_origins):
        origin = ws.headers.get("origin")
        err = error(ErrorCode.FORBIDDEN, f"origin {origin!r} is not allowed")
        await state.audit_refusal(ws, "", err)
        await refuse(ws, 403, "forbidden", err.message)
        return
    token, subprotocol = credentials(ws)
    user = await authenticated(ws, state.authenticate_user(ws, token))
    if user is None:
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

    def answer_failure(exc: Exception) -> None:
        dash.outbox.put(_encode(intake.unanswered(b"", user.actor, exc).reply).decode())

    in_order = InOrder(answer_failure)

    async def handle(raw: bytes, binary: bool, turn: Turn) -> None:
        """Answer one frame, whatever happens (a failure is answered too)."""
        try:
            answer = await _answer(state, dash, raw, binary, turn)
        except Exception as exc:  # a failure or a silent ledger: say so, keep the session
            turn.passed()
            answer = intake.unanswered(raw, user.actor, exc).reply
        if answer is not None:
            dash.outbox.put(_encode(answer).decode())
        err = answer.error if isinstance(answer, StatusUpdate) else None
        if err is not None and err.code == ErrorCode.UNAUTHENTICATED:
            dash.outbox.close(CloseCode.CREDENTIAL_ENDED, err.message[:120], flush=True)

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


async def _answer(
    state: GatewayState, dash: DashboardSession, raw: bytes, binary: bool, turn: Turn
) -> StatusUpdate | Subscribed | None:
    """The answer frame (None: the admitted command answers through its statuses)."""
    follows = state.hub.follows
    if not binary and cancels.is_control_frame(raw):  # {"type": "cancel" | "subscribe", ...}
        # Only once every earlier frame is admitted: a cancel or subscribe sent right
        # behind its command must find it.
        await turn.wait()
        turn.passed()
        # Commands are bounded by the intake's own wait (one timer per frame is enough).
        async with asyncio.timeout(state.settings.ledger_wait_s):
            return await _control(state, dash, raw)
    newly: list[str] = []

    def follow(command_id: str) -> None:
        if command_id not in dash.following:
            newly.append(command_id)
        follows.follow(dash, command_id)

    # Never raises (a silent ledger is answered `unavailable`); the follow stays then, so
    # an admission that Redis completes after all still reaches the sender.
    outcome = await state.intake.submit(
        raw, dash.user, binary=binary, turn=turn, follow=follow, then=state.hub.deliver_behind
    )
    error_code = outcome.reply.error.code if outcome.reply.error is not None else ""
    if outcome.rejected and error_code != ErrorCode.UNAVAILABLE:
        for command_id in newly:
            follows.unfollow(dash, command_id)  # refused: nothing will follow
    if outcome.admitted:
        return None  # answered by its lifecycle statuses (issued first), sent to the follower
    return outcome.reply


async def _control(
    state: GatewayState, dash: DashboardSession, raw: bytes
) -> StatusUpdate | Subscribed:
    """Answer a `subscribe` or `cancel` frame."""
    if not subscriptions.is_subscribe(raw):
        return (await cancels.answer_frame(state, dash.user, raw)).reply
    try:
        frame = subscriptions.SUBSCRIBE_DECODER.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        err = error(
            ErrorCode.INVALID_COMMAND,
            f'invalid subscribe frame: {exc}; send {{"type": "subscribe", '
            '"command_ids": [...]}} with 1 to 256 command ids',
        )
        return (await state.intake.reject(raw, dash.user.actor, err)).reply
    return await subscriptions.subscribe(state.ledger, state.hub.follows, dash, frame)
