"""Gateway -> dashboard/service messages."""

from __future__ import annotations

import functools
import time
from typing import Literal

from msgspec import Struct

from schemas.commands import CommandId
from schemas.errors import ErrorObject


class StatusUpdate(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One lifecycle transition of a command, as the dashboard sees it."""

    command_id: str | None
    status: str
    at: str  # ISO 8601 UTC with milliseconds
    edge_id: str | None = None
    error: ErrorObject | None = None
    late: bool = False
    delivery: int | None = None
    event_id: str | None = None


class CommandControl(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Dashboard -> gateway: an operation on an existing command (contract addition)."""

    type: Literal["cancel"]
    command_id: CommandId


class EdgeNotice(Struct, frozen=True, kw_only=True):
    """Gateway -> edge: an acknowledgment the gateway could not apply."""

    type: Literal["ack_refused"] = "ack_refused"
    command_id: str | None = None
    error: ErrorObject | None = None


class CommandView(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """`GET /api/commands/{id}`: the command, its status and its lifecycle."""

    command_id: str
    status: str
    command: dict[str, object]
    events: list[dict[str, object]]
    late: bool = False


class Accepted(Struct, frozen=True, kw_only=True):
    """`POST /api/commands` 202 body."""

    command_id: str
    status: str


@functools.lru_cache(maxsize=64)
def _iso_second(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def iso_ms(ms: int) -> str:
    """ISO 8601 UTC with milliseconds, e.g. 2026-02-15T14:30:01.050Z."""
    seconds, millis = divmod(ms, 1000)
    return f"{_iso_second(seconds)}.{millis:03d}Z"
