"""From raw bytes to an admitted command, or a rejection naming its cause.

Shared by the dashboard WebSocket and `POST /api/commands`: decode, validate, check
the clock, authorize, then append to the ledger. Every refusal is recorded in the
audit stream with who sent it, a digest and an excerpt of what they sent, and why.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import msgspec

from gateway import metrics
from gateway.auth import User
from gateway.grants import CAN_CONTROL, GrantCache
from ledger.ids import new_event_id
from ledger.store import Ledger, SubmitOutcome
from schemas.commands import Command
from schemas.errors import ErrorCode, ErrorObject, error
from schemas.events import Rejected
from schemas.messages import StatusUpdate, iso_ms

COMMAND_DECODER = msgspec.json.Decoder(Command)
EXCERPT_CHARS = 512


class _IdProbe(msgspec.Struct):
    """Just enough of an invalid command to tell its sender which one was refused."""

    command_id: str | None = None
    target: dict[str, object] | None = None


_PROBE = msgspec.json.Decoder(_IdProbe)
_encode = msgspec.json.Encoder().encode

HTTP_STATUS = {
    ErrorCode.MALFORMED_JSON: 400,
    ErrorCode.INVALID_COMMAND: 422,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.UNKNOWN_EDGE: 404,
    ErrorCode.DUPLICATE: 409,
    ErrorCode.EXPIRED: 422,
    ErrorCode.CLOCK_SKEW: 422,
    ErrorCode.RATE_LIMITED: 429,
}


@dataclass(frozen=True, slots=True)
class Outcome:
    """What to answer: `reply` for the sender, `http_status` for the REST API."""

    reply: StatusUpdate
    http_status: int
    admitted: bool = False

    @property
    def rejected(self) -> bool:
        return self.reply.status == "rejected"


def now_iso() -> str:
    return iso_ms(time.time_ns() // 1_000_000)


def probe(raw: bytes) -> tuple[str | None, str | None]:
    """Best-effort command id and edge id of an input that failed validation."""
    try:
        found = _PROBE.decode(raw)
    except Exception:
        return None, None
    edge = found.target.get("edge_id") if isinstance(found.target, dict) else None
    cid = found.command_id if isinstance(found.command_id, str) else None
    return (cid[:128] if cid else None), (edge[:64] if isinstance(edge, str) else None)


class Intake:
    def __init__(
        self,
        ledger: Ledger,
        grants: GrantCache,
        *,
        gateway_id: str,
        max_message_bytes: int,
        clock_skew_s: int,
    ) -> None:
        self.ledger = ledger
        self.grants = grants
        self.gateway_id = gateway_id
        self.max_message_bytes = max_message_bytes
        self.clock_skew_s = clock_skew_s
        # Enrollment is never withdrawn while a gateway runs: remember positive answers.
        self._enrolled: set[str] = set()

    async def submit(self, raw: bytes, user: User) -> Outcome:
        started = time.perf_counter()
        if len(raw) > self.max_message_bytes:
            return await self.reject(
                raw,
                user.actor,
                error(
                    ErrorCode.TOO_LARGE,
                    f"message is {len(raw)} bytes; the limit is {self.max_message_bytes}",
                ),
            )
        try:
            cmd = COMMAND_DECODER.decode(raw)
        except msgspec.ValidationError as exc:
            return await self.reject(
                raw, user.actor, error(ErrorCode.INVALID_COMMAND, f"invalid command: {exc}")
            )
        except msgspec.DecodeError as exc:
            return await self.reject(
                raw, user.actor, error(ErrorCode.MALFORMED_JSON, f"not valid JSON: {exc}")
            )
        problem = await self._refusal(cmd, user)
        if problem is not None:
            return await self.reject(raw, user.actor, problem, cmd=cmd)
        grant = await self.grants.allows(user, cmd.target.edge_id, CAN_CONTROL)
        if grant is None:
            return await self.reject(
                raw,
                user.actor,
                error(
                    ErrorCode.FORBIDDEN,
                    f"user {user.user_id!r} lacks can_control on edge {cmd.target.edge_id!r}",
                ),
                cmd=cmd,
            )
        result = await self.ledger.submit(
            cmd, actor=user.actor, grant=grant, gateway_id=self.gateway_id
        )
        metrics.SUBMIT_SECONDS.observe(time.perf_counter() - started)
        if result.outcome is SubmitOutcome.DUPLICATE:
            return await self.reject(
                raw,
                user.actor,
                error(
                    ErrorCode.DUPLICATE,
                    f"command_id {cmd.command_id!r} was already used for a different command; "
                    "use a new command_id",
                ),
                cmd=cmd,
            )
        if result.outcome is SubmitOutcome.STALE:
            return await self.reject(
                raw,
                user.actor,
                error(ErrorCode.EXPIRED, "the command's timestamp + expiry_sec has already passed"),
                cmd=cmd,
            )
        metrics.COMMANDS.labels(result.outcome.value).inc()
        reply = StatusUpdate(
            command_id=cmd.command_id,
            status=result.status,
            at=now_iso(),
            edge_id=cmd.target.edge_id,
        )
        admitted = result.outcome is SubmitOutcome.ADMITTED
        return Outcome(reply, 202 if admitted else 200, admitted=admitted)

    async def _refusal(self, cmd: Command, user: User) -> ErrorObject | None:
        skew_s = cmd.timestamp.timestamp() - time.time()
        if skew_s > self.clock_skew_s:
            return error(
                ErrorCode.CLOCK_SKEW,
                f"timestamp is {skew_s:.0f} s in the future (tolerance {self.clock_skew_s} s); "
                "check the sender's clock",
            )
        edge_id = cmd.target.edge_id
        known = edge_id in self._enrolled or await self.ledger.is_enrolled(edge_id)
        if known and len(self._enrolled) < 1_000_000:
            self._enrolled.add(edge_id)
        if not known:
            return error(
                ErrorCode.UNKNOWN_EDGE,
                f"edge {cmd.target.edge_id!r} is not enrolled; enroll it with "
                "`dispatch token --edge EDGE`",
            )
        return None

    async def reject(
        self, raw: bytes, actor: str, err: ErrorObject, *, cmd: Command | None = None
    ) -> Outcome:
        """Record the refusal in the audit stream and build the answer."""
        if cmd is not None:
            command_id: str | None = cmd.command_id
            edge_id: str | None = cmd.target.edge_id
        else:
            command_id, edge_id = probe(raw) if len(raw) <= self.max_message_bytes else (None, None)
        event = Rejected(
            event_id=new_event_id(),
            at=time.time_ns() // 1_000_000,
            command_id=command_id or "",
            edge_id=edge_id or "",
            actor=actor,
            error=err,
            stage="gateway",
            input_digest=hashlib.sha256(raw).hexdigest(),
            input_excerpt=raw[:EXCERPT_CHARS].decode("utf-8", "replace"),
        )
        await self.ledger.record_rejection(event)
        metrics.REJECTIONS.labels(err.code).inc()
        reply = StatusUpdate(
            command_id=command_id, status="rejected", at=now_iso(), edge_id=edge_id, error=err
        )
        return Outcome(reply, HTTP_STATUS.get(ErrorCode(err.code), 400))
