"""Gateway <-> edge frames: decoding what arrives, building the acks that leave."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import msgspec
from msgspec import Struct

from schemas.commands import Ack, AckStatus, EdgeCommand
from schemas.errors import ErrorCode, ErrorObject, error
from schemas.identifiers import is_command_id

_command_decoder = msgspec.json.Decoder(EdgeCommand)
_encode = msgspec.json.Encoder().encode


class Notice(Struct, frozen=True, kw_only=True):
    """A gateway frame with a `type`: `ack_recorded`, `ack_unrecorded`, `ack_refused`."""

    type: str
    command_id: str | None = None
    status: str | None = None
    error: ErrorObject | None = None


class BadFrame(Struct, frozen=True, kw_only=True):
    """A frame that is not a command; `command_id` is set when one could be read from it."""

    command_id: str | None
    message: str


class _Peek(Struct):
    type: str | None = None
    command_id: object = None


_peek_decoder = msgspec.json.Decoder(_Peek)
# A frame that is not JSON (a NaN literal, cut short) may still name its command: the
# first `"command_id": "..."` in it is used when it is a valid id, so the edge can answer.
_COMMAND_ID_TEXT = re.compile(rb'"command_id"\s*:\s*"([^"\\]{1,200})"')


def find_command_id(data: bytes) -> str | None:
    """The valid command id written in an unparseable frame, if there is one."""
    match = _COMMAND_ID_TEXT.search(data)
    if match is None:
        return None
    candidate = match.group(1).decode("utf-8", "replace")
    return candidate if is_command_id(candidate) else None


def decode_frame(raw: str | bytes) -> EdgeCommand | Notice | BadFrame:
    """Classify one gateway frame; never raises."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    try:
        peek = _peek_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return BadFrame(command_id=find_command_id(data), message=f"frame is not valid JSON: {exc}")
    command_id = peek.command_id if isinstance(peek.command_id, str) else None
    if command_id is not None and not is_command_id(command_id):
        command_id = None
    if peek.type is not None:
        try:
            return msgspec.json.decode(data, type=Notice)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return BadFrame(command_id=None, message=f"unreadable {peek.type!r} frame: {exc}")
    try:
        cmd = _command_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return BadFrame(command_id=command_id, message=f"not a valid command: {exc}")
    if command_id is None:
        return BadFrame(command_id=None, message=f"unusable command_id {cmd.command_id!r}")
    return cmd


def utc_now() -> datetime:
    return datetime.now(UTC)


def ack(
    command_id: str,
    status: AckStatus,
    *,
    code: ErrorCode | None = None,
    message: str = "",
    executed_at: datetime | None = None,
) -> Ack:
    return Ack(
        command_id=command_id,
        status=status,
        executed_at=executed_at,
        error=None if code is None else error(code, message),
    )


def encode_ack(value: Ack) -> bytes:
    return _encode(value)
