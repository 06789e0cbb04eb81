"""The error object every rejection, failure and verdict carries, and its codes."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from msgspec import Struct


class ErrorCode(StrEnum):
    # Input at the gateway boundary.
    MALFORMED_JSON = "malformed_json"
    INVALID_COMMAND = "invalid_command"
    TOO_LARGE = "too_large"
    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"
    RATE_LIMITED = "rate_limited"
    UNKNOWN_EDGE = "unknown_edge"
    DUPLICATE = "duplicate"
    EXPIRED = "expired"
    CLOCK_SKEW = "clock_skew"
    UNKNOWN_COMMAND = "unknown_command"
    SLOW_CONSUMER = "slow_consumer"  # the client read too slowly and was disconnected
    PROTOCOL_ERROR = "protocol_error"  # the WebSocket layer closed the connection
    NOT_CANCELLABLE = "not_cancellable"  # a cancel that came after the command was sent
    UNAVAILABLE = "unavailable"  # the ledger (Redis) did not answer within the wait
    # Edge-side validation and execution.
    EDGE_BUSY = "edge_busy"
    SUPERSEDED = "superseded"
    UNKNOWN_DEVICE = "unknown_device"
    UNKNOWN_CHANNEL = "unknown_channel"
    NOT_WRITABLE = "not_writable"
    OUT_OF_RANGE = "out_of_range"
    WRONG_TYPE = "wrong_type"
    WRONG_UNIT = "wrong_unit"
    DEVICE_ERROR = "device_error"
    DEVICE_TIMEOUT = "device_timeout"
    # Verdicts.
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    LOST = "lost"
    INTERNAL = "internal"
    # Edge side, appended with the edge agent (issue 3).
    WRONG_EDGE = "wrong_edge"
    WRONG_TARGET = "wrong_target"
    UNKNOWN_CONTROLLER = "unknown_controller"
    UNKNOWN_MODE = "unknown_mode"
    READBACK_MISMATCH = "readback_mismatch"
    OUTCOME_UNKNOWN = "outcome_unknown"
    INTERRUPTED = "interrupted"
    CONFIG_SYNC_FAILED = "config_sync_failed"


class ErrorObject(Struct, frozen=True, kw_only=True, omit_defaults=True, gc=False):
    """`{code, message}` plus optional hints; `code` is machine-readable, `message` human."""

    code: str
    message: str
    retry_after_s: float | None = None
    limit: str | None = None


def error(code: ErrorCode, message: str, **hints: float | str | None) -> ErrorObject:
    return ErrorObject(code=code.value, message=message, **hints)  # type: ignore[arg-type]


def problem_body(code: ErrorCode | str, message: str, **extra: Any) -> dict[str, Any]:
    """The JSON body of every HTTP refusal: `{"status": "rejected", "error": {code, message}}`."""
    return {"status": "rejected", "error": {"code": str(code), "message": message, **extra}}
