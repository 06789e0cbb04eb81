"""Lifecycle events: what the ledger appends, projectors project and replay re-runs.

Stored events tolerate unknown fields so old and new versions live side by side in
the log. A shipped tag is never renamed; new fields get defaults and go last.
`at` comes right after the tag: the ledger's Lua scripts stamp it with Redis time.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Literal

from msgspec import Struct

from schemas.commands import EdgeCommand
from schemas.errors import ErrorObject


class Status(StrEnum):
    ISSUED = "issued"
    AUTHORIZED = "authorized"
    REJECTED = "rejected"
    QUEUED = "queued"
    ROUTED = "routed"
    DELIVERED = "delivered"
    EXECUTED = "executed"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    LOST = "lost"


# Placeholder the Lua scripts replace with the Redis server time (ms since epoch).
UNSTAMPED = -1


class Event(Struct, frozen=True, kw_only=True, tag_field="status", omit_defaults=True, gc=False):
    """Common header of every lifecycle event."""

    at: int = UNSTAMPED  # ms since the Unix epoch, UTC, Redis server clock
    event_id: str
    command_id: str
    edge_id: str
    actor: str


class Issued(Event, tag="issued", frozen=True):
    command: EdgeCommand
    digest: str


class Authorized(Event, tag="authorized", frozen=True):
    grant: str


class Queued(Event, tag="queued", frozen=True):
    expires_at: int


class Routed(Event, tag="routed", frozen=True):
    gateway: str
    delivery: int = 1


class Delivered(Event, tag="delivered", frozen=True):
    delivery: int = 1


class Executed(Event, tag="executed", frozen=True):
    executed_at: datetime | None = None
    late: bool = False


class Failed(Event, tag="failed", frozen=True):
    error: ErrorObject
    executed_at: datetime | None = None
    late: bool = False


class Rejected(Event, tag="rejected", frozen=True):
    """A refusal: by the gateway before admission (`stage="gateway"`) or by the edge."""

    error: ErrorObject
    stage: Literal["gateway", "edge"] = "edge"
    late: bool = False
    input_digest: str = ""
    input_excerpt: str = ""


class TimedOut(Event, tag="timed_out", frozen=True):
    error: ErrorObject
    routed_at: int = 0


class Expired(Event, tag="expired", frozen=True):
    error: ErrorObject
    expires_at: int = 0


class Cancelled(Event, tag="cancelled", frozen=True):
    error: ErrorObject


class Lost(Event, tag="lost", frozen=True):
    error: ErrorObject


AnyEvent = (
    Issued
    | Authorized
    | Queued
    | Routed
    | Delivered
    | Executed
    | Failed
    | Rejected
    | TimedOut
    | Expired
    | Cancelled
    | Lost
)

EVENT_TYPES: dict[Status, type[Event]] = {
    Status.ISSUED: Issued,
    Status.AUTHORIZED: Authorized,
    Status.QUEUED: Queued,
    Status.ROUTED: Routed,
    Status.DELIVERED: Delivered,
    Status.EXECUTED: Executed,
    Status.FAILED: Failed,
    Status.REJECTED: Rejected,
    Status.TIMED_OUT: TimedOut,
    Status.EXPIRED: Expired,
    Status.CANCELLED: Cancelled,
    Status.LOST: Lost,
}


_STATUS_OF: dict[type[Event], Status] = {cls: status for status, cls in EVENT_TYPES.items()}


def status_of(event: Event) -> Status:
    return _STATUS_OF[type(event)]
