"""Cancelling a command that has not been sent to its edge yet (dashboard frame or HTTP).

Contract addition (docs/operations.md): a dashboard sends
`{"type": "cancel", "command_id": "..."}` and gets a status object back, like a
command's: `status: "cancelled"` when it worked; otherwise the command's current status
(or `rejected` when there is no such command for this user) with an `error` naming
why the cancellation was refused (`not_cancellable`, `forbidden`, `unknown_command`,
`invalid_command`). A cancelled command is never sent: delivery settles its entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from gateway.auth import User
from gateway.grants import CAN_CONTROL
from gateway.refusals import refusal_event
from gateway.state import GatewayState
from ledger.keys import SAFE_ID
from schemas.errors import ErrorCode, ErrorObject, error
from schemas.messages import CommandControl, StatusUpdate, iso_ms, now_iso

MAX_CONTROL_FRAME_BYTES = 4096  # anything bigger is left to the command intake


class _Kind(msgspec.Struct):
    type: object = None


_KIND = msgspec.json.Decoder(_Kind)
_CANCEL = msgspec.json.Decoder(CommandControl)


@dataclass(frozen=True, slots=True)
class CancelOutcome:
    reply: StatusUpdate
    http_status: int


def is_control_frame(raw: bytes) -> bool:
    """A frame with a `type` field (commands have none and forbid unknown fields)."""
    if len(raw) > MAX_CONTROL_FRAME_BYTES or b'"type"' not in raw:
        return False
    try:
        return _KIND.decode(raw).type is not None
    except msgspec.DecodeError:
        return False


async def answer_frame(state: GatewayState, user: User, raw: bytes) -> CancelOutcome:
    """Answer a dashboard control frame (today: only `cancel`)."""
    try:
        frame = _CANCEL.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        try:
            kind = _KIND.decode(raw).type
        except msgspec.DecodeError:
            kind = None
        message = (
            f'invalid cancel frame: {exc}; send {{"type": "cancel", "command_id": ...}}'
            if kind == "cancel"
            else f"unknown frame type {kind!r}; send a command object or "
            '{"type": "cancel", "command_id": ...}'
        )
        return await _refuse(state, user, error(ErrorCode.INVALID_COMMAND, message), raw=raw)
    return await cancel(state, user, frame.command_id, raw=raw)


async def cancel(
    state: GatewayState, user: User, command_id: str, *, raw: bytes = b""
) -> CancelOutcome:
    """Cancel `command_id` for `user`, who needs can_control on the command's edge."""
    unknown = error(ErrorCode.UNKNOWN_COMMAND, f"no command {command_id!r} in the ledger")
    edge_id = await state.ledger.edge_of(command_id) if SAFE_ID.fullmatch(command_id) else None
    if edge_id is None:
        return await _refuse(state, user, unknown, command_id, raw=raw)
    if await state.grants.allows(user, edge_id, CAN_CONTROL) is None:
        lacks = f"user {user.user_id!r} lacks can_control on edge {edge_id!r}"
        return await _refuse(
            state, user, error(ErrorCode.FORBIDDEN, lacks), command_id, edge_id, raw=raw
        )
    result = await state.ledger.cancel(command_id, user.actor)
    if result.applied:
        reply = StatusUpdate(
            command_id=command_id, status="cancelled", at=iso_ms(result.at_ms), edge_id=edge_id
        )
        return CancelOutcome(reply, 200)
    if result.unknown:
        return await _refuse(state, user, unknown, command_id, edge_id, raw=raw)
    # Too late (already sent) or already final: the answer carries the true status.
    refusal = error(
        ErrorCode.NOT_CANCELLABLE,
        f"command {command_id!r} is {result.previous}; only commands not yet sent to the "
        "edge (queued) can be cancelled",
    )
    reply = StatusUpdate(
        command_id=command_id,
        status=result.previous,
        at=now_iso(),
        edge_id=edge_id,
        error=refusal,
    )
    return CancelOutcome(reply, 409)


HTTP_STATUS = {
    ErrorCode.UNKNOWN_COMMAND.value: 404,
    ErrorCode.FORBIDDEN.value: 403,
    ErrorCode.INVALID_COMMAND.value: 422,
}


async def _refuse(
    state: GatewayState,
    user: User,
    err: ErrorObject,
    command_id: str | None = None,
    edge_id: str | None = None,
    *,
    raw: bytes,
) -> CancelOutcome:
    """Record the refused request in the audit stream and answer `rejected`."""
    # A cancel by URL (no frame) has no input to digest.
    event = refusal_event(user.actor, err, edge_id=edge_id, command_id=command_id, raw=raw or None)
    await state.ledger.record_rejection(event)
    reply = StatusUpdate(
        command_id=command_id, status="rejected", at=now_iso(), edge_id=edge_id, error=err
    )
    return CancelOutcome(reply, HTTP_STATUS.get(err.code, 400))
