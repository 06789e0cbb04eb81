"""Gateway -> dashboard/service messages."""

from __future__ import annotations

import functools
import time
from typing import Annotated, Literal

from msgspec import Meta, Struct

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


class EdgeNotice(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Gateway -> edge: what became of an acknowledgment.

    `ack_recorded`: the ack is in the ledger, the edge may forget it.
    `ack_refused`: the ack can never be recorded (e.g. unknown command); do not resend.
    `ack_unrecorded`: the ledger could not take it now (`error.code` `unavailable`);
    the edge keeps it and resends it until it is recorded or refused.
    """

    # No default: with omit_defaults a defaulted `type` would vanish from the frame, and
    # the edge tells notices from commands by it.
    type: Literal["ack_refused", "ack_recorded", "ack_unrecorded"]
    command_id: str | None = None
    status: str | None = None
    error: ErrorObject | None = None


class Subscribe(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Dashboard -> gateway: follow commands again (after a reconnect).

    Answered by one `Subscribed` frame; from then on the session receives every
    status of those commands, as it does for the commands it sent itself.
    """

    type: Literal["subscribe"]
    command_ids: Annotated[list[CommandId], Meta(min_length=1, max_length=256)]


class Subscribed(Struct, frozen=True, kw_only=True):
    """Gateway -> dashboard: the current status of each subscribed command.

    Commands the user neither sent nor may view are listed as `unknown` (no leak).
    """

    type: Literal["subscribed"] = "subscribed"
    statuses: list[StatusUpdate]
    unknown: list[str]


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
