"""The command a dashboard or cloud service sends, and what the gateway forwards to an edge."""

from __future__ import annotations

import math
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal

from msgspec import Meta, Struct

from schemas import identifiers as ids
from schemas.errors import ErrorObject
from schemas.identifiers import schema_pattern


def _matching(pattern: str, description: str, *examples: str) -> Meta:
    """A string that must match `pattern` whole (schemas.identifiers explains why)."""
    return Meta(
        pattern=schema_pattern(pattern), description=description, examples=list(examples) or None
    )


# Identifiers end up inside Redis keys and log lines: keep them to a safe alphabet.
_EDGE_ID = "Edge identifier: letters, digits, '_', '.', '-' (1-64 chars)."
_COMMAND_ID = "Client-chosen idempotency key: letters, digits, '_', '.', ':', '-'."
EdgeId = Annotated[str, _matching(ids.EDGE_ID, _EDGE_ID, "site1_edge_prod")]
CommandId = Annotated[str, _matching(ids.COMMAND_ID, _COMMAND_ID, "cmd_12345")]
Name = Annotated[str, _matching(ids.NAME, "Device or channel name.")]
Source = Annotated[str, Meta(min_length=1, max_length=128, description="Who asked (as claimed).")]
Unit = Annotated[str, Meta(max_length=16)]
ExpirySec = Annotated[int, Meta(ge=1, le=7 * 86400, description="Seconds after `timestamp`.")]
DurationSec = Annotated[int, Meta(ge=1, le=7 * 86400)]
UtcTime = Annotated[datetime, Meta(tz=True, description="RFC 3339 timestamp with offset.")]
# Setpoint values are bounded well beyond any real device so absurd numbers fail early.
Value = Annotated[float, Meta(ge=-1e12, le=1e12)] | Annotated[int, Meta(ge=-(10**12), le=10**12)]
TextValue = Annotated[str, Meta(min_length=1, max_length=64)]
_TRACEPARENT = r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}"
TraceParent = Annotated[
    str,
    _matching(
        _TRACEPARENT,
        "W3C trace context (`traceparent`) linking this command's trace spans.",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    ),
]

# The virtual device that addresses the edge's Core Cycle (controllers, system actions).
CORE_DEVICE = "core"
SYSTEM_CHANNEL = "system"


class CommandType(StrEnum):
    SETPOINT = "setpoint"
    MODE_CHANGE = "mode_change"
    CONFIG_OVERRIDE = "config_override"
    SCHEDULER_CONTROL = "scheduler_control"
    SYSTEM = "system"


Priority = Literal["normal", "emergency"]
SCHEDULER_ACTIONS = frozenset({"start", "stop"})
SYSTEM_ACTIONS = frozenset({"restart", "sync_config"})


class Target(Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    edge_id: EdgeId
    device_id: Name
    channel: Name


class Command(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Dashboard/cloud -> gateway: the specification's command object."""

    command_id: CommandId
    command_type: CommandType
    target: Target
    value: bool | Value | TextValue
    unit: Unit | None = None
    expiry_sec: ExpirySec | None = None
    source: Source
    timestamp: UtcTime
    priority: Priority = "normal"
    duration_sec: DurationSec | None = None
    # Optional: the sender's trace context; not part of the command's identity.
    traceparent: TraceParent | None = None

    def __post_init__(self) -> None:
        problem = command_shape_problem(self)
        if problem is not None:
            # msgspec turns ValueError raised here into a ValidationError.
            raise ValueError(problem)


def command_shape_problem(cmd: Command) -> str | None:
    """What is wrong with the command's shape for its type, or None."""
    value = cmd.value
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(value, float) and not math.isfinite(value):
        return "`value` must be a finite number"
    kind = cmd.command_type
    if kind in (CommandType.SETPOINT, CommandType.CONFIG_OVERRIDE) and not numeric:
        return f"`value` of a {kind.value} must be a number, got {value!r}"
    if kind is CommandType.CONFIG_OVERRIDE and cmd.duration_sec is None:
        return "a config_override needs `duration_sec` (how long the override lasts)"
    if kind is not CommandType.CONFIG_OVERRIDE and cmd.duration_sec is not None:
        return f"`duration_sec` only applies to config_override, not {kind.value}"
    if kind is CommandType.MODE_CHANGE and not isinstance(value, str):
        return "`value` of a mode_change must be the mode's name"
    if kind is CommandType.SCHEDULER_CONTROL and value not in SCHEDULER_ACTIONS:
        return f"`value` of a scheduler_control must be one of {sorted(SCHEDULER_ACTIONS)}"
    if kind is CommandType.SYSTEM and value not in SYSTEM_ACTIONS:
        return f"`value` of a system command must be one of {sorted(SYSTEM_ACTIONS)}"
    return None


class EdgeCommand(Struct, frozen=True, kw_only=True, gc=False):
    """Gateway -> edge: the command as the edge executes it.

    Every field is always sent (the specification's fields and `priority` included);
    `delivery` counts deliveries of the same command (n > 1 is a redelivery). Decoding
    is lenient so an edge accepts frames from older or newer gateways.
    """

    command_id: str
    command_type: CommandType
    target: Target
    value: bool | float | int | str
    unit: str | None = None
    expiry_sec: int
    source: str
    timestamp: datetime
    priority: Priority = "normal"
    duration_sec: int | None = None
    expires_at: datetime
    actor: str = ""
    delivery: int = 1
    # The gateway's clock when it sent this frame and the lifetime left by that clock:
    # the edge measures its clock offset from `sent_at` and judges expiry on
    # `remaining_ms` (its own monotonic clock), so a skewed edge clock cannot expire
    # a valid command or execute a stale one.
    sent_at: datetime | None = None
    remaining_ms: int | None = None
    # The gateway's admission span (W3C), so the edge's spans join the command's trace.
    traceparent: str | None = None


AckStatus = Literal["accepted", "executed", "failed", "rejected"]


class Ack(Struct, frozen=True, kw_only=True):
    """Edge -> gateway: the specification's acknowledgment (unknown fields tolerated)."""

    command_id: CommandId
    status: AckStatus
    executed_at: UtcTime | None = None
    error: ErrorObject | None = None
    # Edge clock minus gateway clock, as the edge measured it from `sent_at` (ms).
    clock_offset_ms: int | None = None
