"""What the ledger stores and hands out: its config, the results of its scripts, the
records it reads back, and the codecs of its events and command bodies."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum

import msgspec

from schemas.commands import Command, EdgeCommand
from schemas.events import (
    AnyEvent,
    Event,
)

EVENT_DECODER = msgspec.json.Decoder(AnyEvent)
EDGE_COMMAND_DECODER = msgspec.json.Decoder(EdgeCommand)
_encode = msgspec.json.Encoder().encode


class SubmitOutcome(StrEnum):
    ADMITTED = "admitted"  # new command, recorded and routed or queued
    EXISTS = "exists"  # same id, same body: nothing appended, current status returned
    DUPLICATE = "duplicate"  # same id, different body: refused
    STALE = "stale"  # its expiry had already passed on arrival


@dataclass(frozen=True, slots=True)
class Appended:
    """Events one script appended for one command, as stored, with their log entry ids.

    `after` is the command's log entry before them ('' for a new command): whoever has
    passed on every status up to `after` may pass these on before the log tail brings
    them (gateway/direct.py).
    """

    stream: str  # the partition log holding them
    command_id: str
    after: str
    events: tuple[tuple[str, Event], ...]


@dataclass(frozen=True, slots=True)
class SubmitResult:
    outcome: SubmitOutcome
    status: str
    gateway: str = ""
    appended: Appended | None = None  # an admission's issued, authorized, routed/queued


@dataclass(frozen=True, slots=True)
class TransitionResult:
    applied: bool
    previous: str  # status before the attempt ('' when the command is unknown)
    late: bool = False
    at_ms: int = 0
    after: str = ""  # the command's log entry before this event ('' if unknown)
    entry: str = ""  # this event's log entry id

    def appended(self, stream: str, event: Event) -> Appended | None:
        """The applied event as stored in `stream` (Redis time, late flag)."""
        if not self.applied or not self.after or not self.entry:
            return None
        changes: dict[str, object] = {"at": self.at_ms}
        if self.late and hasattr(event, "late"):
            changes["late"] = True
        stored = msgspec.structs.replace(event, **changes)
        return Appended(stream, event.command_id, self.after, ((self.entry, stored),))

    @property
    def unknown(self) -> bool:
        return not self.applied and self.previous == ""


class _Lifetime(msgspec.Struct):
    expires_at: datetime


_LIFETIME_DECODER = msgspec.json.Decoder(_Lifetime)
# How every stored body ends (EdgeCommand's last fields, as `submit` encodes them): the
# send-time fields are spliced in there instead of decoding and re-encoding the body.
_STORED_TAIL = b',"delivery":1,"sent_at":null,"remaining_ms":null}'


@dataclass(frozen=True, slots=True)
class Delivery:
    command_id: str
    delivery: int
    body: bytes  # EdgeCommand JSON as stored

    def frame(self, now: datetime | None = None) -> bytes:
        """The gateway -> edge message: the stored body with its delivery count and the
        gateway's clock at send (`sent_at`, `remaining_ms` of the command's lifetime)."""
        now = now or datetime.now(UTC)
        expires_at = _LIFETIME_DECODER.decode(self.body).expires_at
        remaining_ms = max(0, int((expires_at - now).total_seconds() * 1000))
        if self.body.endswith(_STORED_TAIL):
            tail = b',"delivery":%d,"sent_at":%s,"remaining_ms":%d}' % (
                self.delivery,
                _encode(now),
                remaining_ms,
            )
            return self.body[: -len(_STORED_TAIL)] + tail
        command = EDGE_COMMAND_DECODER.decode(self.body)  # stored by another version
        return _encode(
            msgspec.structs.replace(
                command, delivery=self.delivery, sent_at=now, remaining_ms=remaining_ms
            )
        )


@dataclass(frozen=True, slots=True)
class TrimResult:
    trimmed: int  # entries removed
    floor: str  # the MINID used ('' when the stream was left alone)
    skipped: int = 0  # unread entries of unsendable commands the edge group skipped


@dataclass(frozen=True, slots=True)
class Persistence:
    """How Redis keeps the ledger across restarts (what /readyz reports)."""

    aof_enabled: bool
    appendfsync: str  # always | everysec | no | unknown (CONFIG may be disabled)
    rdb_snapshots: bool | None

    @property
    def mode(self) -> str:
        if self.aof_enabled:
            return f"aof-{self.appendfsync}"
        return "rdb-only" if self.rdb_snapshots else "none"

    @property
    def warning(self) -> str | None:
        if not self.aof_enabled:
            return (
                "AOF is off: a Redis restart loses queued commands and their streams; "
                "set `appendonly yes` (appendfsync everysec, see docs/operations.md)"
            )
        if self.appendfsync == "no":
            return "appendfsync is `no`: the OS decides when the AOF reaches the disk"
        return None


@dataclass(frozen=True, slots=True)
class CommandRecord:
    command_id: str
    edge_id: str
    status: str
    late: bool
    command: EdgeCommand
    events: list[Event] = field(default_factory=list)


def body_digest(cmd: Command) -> str:
    """Identity of a command body: a reused id with another digest is a duplicate."""
    # The trace context is not part of a command's identity: leave the field out, so the
    # digest is also the one computed before the field existed.
    fields = msgspec.structs.asdict(cmd)
    del fields["traceparent"]
    return hashlib.blake2b(_encode(fields), digest_size=16).hexdigest()


def to_utc(ms: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
