"""From raw bytes to an admitted command, or a rejection naming its cause.

Shared by the dashboard WebSocket and `POST /api/commands`: decode, validate, check
the clock, authorize, then append to the ledger. Every refusal is recorded in the
audit stream with who sent it, a digest and an excerpt of what they sent, and why.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field

import msgspec

from config import tracing
from gateway import metrics
from gateway.auth import User
from gateway.grants import CAN_CONTROL, GrantCache
from gateway.ratelimit import ALLOWED, RateDecision, RateLimiter
from gateway.refusals import refusal_event
from gateway.revocations import Revocations
from ledger.errors import LedgerUnavailable
from ledger.keys import SAFE_ID
from ledger.ordering import Turn
from ledger.records import Appended, SubmitOutcome
from ledger.store import Ledger
from schemas.commands import Command
from schemas.errors import ErrorCode, ErrorObject, error
from schemas.messages import StatusUpdate, now_iso

log = logging.getLogger("gateway.intake")
COMMAND_DECODER = msgspec.json.Decoder(Command)


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
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.INTERNAL: 500,
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


def probe(raw: bytes) -> tuple[str | None, str | None]:
    """Best-effort command id and edge id of an input that failed validation.

    Only well-formed identifiers are kept: the audit record's fields stay trustworthy,
    and whatever else was sent is in its excerpt.
    """
    try:
        found = _PROBE.decode(raw)
    except Exception:
        return None, None
    edge = found.target.get("edge_id") if isinstance(found.target, dict) else None
    cid = found.command_id
    return (
        cid if isinstance(cid, str) and SAFE_ID.fullmatch(cid) else None,
        edge if isinstance(edge, str) and len(edge) <= 64 and SAFE_ID.fullmatch(edge) else None,
    )


@dataclass(eq=False)
class Intake:
    ledger: Ledger
    grants: GrantCache
    _: KW_ONLY
    gateway_id: str
    max_message_bytes: int
    clock_skew_s: int
    limiter: RateLimiter | None = None
    revocations: Revocations | None = None
    ledger_wait_s: float = 2.0
    # Called with an admission's events as soon as Redis answers (the hub sends them).
    admitted: Callable[[Appended], None] | None = None
    # Enrollment is never withdrawn while a gateway runs: remember positive answers.
    _enrolled: set[str] = field(default_factory=set, init=False)

    async def _charge(self, user: User, edge_id: str | None) -> RateDecision:
        if self.limiter is None:
            return ALLOWED
        return await self.limiter.check(user.user_id, edge_id)

    def _decode(self, raw: bytes, *, binary: bool) -> Command | ErrorObject:
        if len(raw) > self.max_message_bytes:
            return error(
                ErrorCode.TOO_LARGE,
                f"message is {len(raw)} bytes; the limit is {self.max_message_bytes}",
            )
        if binary:
            return error(
                ErrorCode.MALFORMED_JSON,
                "binary frames are not accepted; send each command as a JSON text frame",
            )
        try:
            return COMMAND_DECODER.decode(raw)
        except msgspec.ValidationError as exc:
            return error(ErrorCode.INVALID_COMMAND, f"invalid command: {exc}")
        except Exception as exc:  # DecodeError, UnicodeDecodeError, anything: it is not JSON
            return error(ErrorCode.MALFORMED_JSON, f"not valid JSON: {exc}")

    async def submit(
        self,
        raw: bytes,
        user: User,
        *,
        binary: bool = False,
        turn: Turn | None = None,
        follow: Callable[[str], None] | None = None,
        then: Callable[[str, str], None] | None = None,
    ) -> Outcome:
        """Admit one command from `user`, or reject it naming the cause; never raises.

        `follow(command_id)` is called just before the admission is written, so the
        caller hears every status of the command; `then(edge_id, command_id)` right
        after the admission script is queued (see `Ledger.submit`). A ledger that does not answer within
        `ledger_wait_s` (or fails) gives `rejected` with `unavailable` (or `internal`).
        """
        try:
            async with asyncio.timeout(self.ledger_wait_s):
                return await self._submit(
                    raw, user, binary=binary, turn=turn, follow=follow, then=then
                )
        except Exception as exc:  # TimeoutError, LedgerUnavailable, anything: still answer
            return self.unanswered(raw, user.actor, exc)

    def unanswered(self, raw: bytes, actor: str, exc: BaseException) -> Outcome:
        """The answer to a frame whose handling failed; logged (Redis may be down)."""
        command_id, edge_id = probe(raw) if len(raw) <= self.max_message_bytes else (None, None)
        err = failure(exc, self.ledger_wait_s)
        level = logging.WARNING if err.code == ErrorCode.UNAVAILABLE else logging.ERROR
        log.log(
            level,
            "gateway.frame.unanswerable actor=%s command_id=%s code=%s error=%r",
            actor,
            command_id,
            err.code,
            exc,
            exc_info=err.code == ErrorCode.INTERNAL,
        )
        metrics.REJECTIONS.labels(err.code).inc()
        reply = StatusUpdate(
            command_id=command_id, status="rejected", at=now_iso(), edge_id=edge_id, error=err
        )
        return Outcome(reply, HTTP_STATUS[ErrorCode(err.code)])

    async def _submit(
        self,
        raw: bytes,
        user: User,
        *,
        binary: bool,
        turn: Turn | None,
        follow: Callable[[str], None] | None,
        then: Callable[[str, str], None] | None = None,
    ) -> Outcome:
        """Admit one command from `user`, or reject it naming the cause.

        Order: credential still valid, size and shape, rate limit (every frame counts,
        so floods of garbage are throttled too), clock, enrollment, permission, ledger.
        The per-edge budget is only charged for commands the user may send to that edge,
        so nobody can exhaust an edge's budget for the people allowed to control it.
        """
        started = time.perf_counter()
        if self.revocations is not None and self.revocations.revoked(user.jti):
            return await self.reject(
                raw, user.actor, error(ErrorCode.UNAUTHENTICATED, "the token has been revoked")
            )
        if user.expired():
            return await self.reject(
                raw, user.actor, error(ErrorCode.UNAUTHENTICATED, "the token has expired")
            )
        decoded = self._decode(raw, binary=binary)
        if isinstance(decoded, ErrorObject):
            return await self.refuse(raw, user, decoded)
        cmd = decoded
        edge_id = cmd.target.edge_id
        grant = await self.grants.allows(user, edge_id, CAN_CONTROL)
        charged_edge = edge_id if grant is not None else None
        if edge_id in self._enrolled:  # the usual case: no second wait, no tasks to gather
            enrolled, decision = True, await self._charge(user, charged_edge)
        else:
            enrolled, decision = await asyncio.gather(
                self._is_enrolled(edge_id), self._charge(user, charged_edge)
            )
        problem = _limited(decision) or self._refusal(cmd, enrolled=enrolled)
        if problem is None and grant is None:
            problem = error(
                ErrorCode.FORBIDDEN,
                f"user {user.user_id!r} lacks can_control on edge {edge_id!r}",
            )
        if problem is not None:
            return await self.reject(raw, user.actor, problem, cmd=cmd)
        assert grant is not None
        if follow is not None:
            follow(cmd.command_id)
        with tracing.span("dispatch.admit", cmd.traceparent, command_id=cmd.command_id) as tp:
            cmd = msgspec.structs.replace(cmd, traceparent=tp) if tp else cmd
            result = await self.ledger.submit(
                cmd,
                actor=user.actor,
                grant=grant,
                gateway_id=self.gateway_id,
                turn=turn,
                then=then,
            )
        if self.admitted is not None and result.appended is not None:
            self.admitted(result.appended)
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
        metrics.labelled(metrics.COMMANDS, result.outcome).inc()
        reply = StatusUpdate(
            command_id=cmd.command_id,
            status=result.status,
            at=now_iso(),
            edge_id=cmd.target.edge_id,
        )
        admitted = result.outcome is SubmitOutcome.ADMITTED
        return Outcome(reply, 202 if admitted else 200, admitted=admitted)

    async def _is_enrolled(self, edge_id: str) -> bool:
        if edge_id in self._enrolled:
            return True
        known = await self.ledger.is_enrolled(edge_id)
        if known and len(self._enrolled) < 1_000_000:
            self._enrolled.add(edge_id)
        return known

    async def refuse(self, raw: bytes, user: User, err: ErrorObject) -> Outcome:
        """Reject input that is not a command; it still counts against the user's rate."""
        decision = await self._charge(user, None)
        return await self.reject(raw, user.actor, _limited(decision) or err)

    def _refusal(self, cmd: Command, *, enrolled: bool) -> ErrorObject | None:
        skew_s = cmd.timestamp.timestamp() - time.time()
        if skew_s > self.clock_skew_s:
            return error(
                ErrorCode.CLOCK_SKEW,
                f"timestamp is {skew_s:.0f} s in the future (tolerance {self.clock_skew_s} s); "
                "check the sender's clock",
            )
        if not enrolled:
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
        event = refusal_event(actor, err, edge_id=edge_id, command_id=command_id, raw=raw)
        try:
            async with asyncio.timeout(self.ledger_wait_s):
                await self.ledger.record_rejection(event)
        except Exception as exc:  # the answer still goes out; the log keeps the trace
            log.warning(
                "gateway.rejection.unrecorded actor=%s command_id=%s code=%s error=%r",
                actor,
                command_id,
                err.code,
                exc,
            )
        metrics.REJECTIONS.labels(err.code).inc()
        reply = StatusUpdate(
            command_id=command_id, status="rejected", at=now_iso(), edge_id=edge_id, error=err
        )
        return Outcome(reply, HTTP_STATUS.get(ErrorCode(err.code), 400))


def failure(exc: BaseException, wait_s: float) -> ErrorObject:
    """The error object for a frame that could not be handled."""
    if isinstance(exc, TimeoutError | LedgerUnavailable):
        return error(
            ErrorCode.UNAVAILABLE,
            f"the ledger (Redis) did not answer within {wait_s:g} s; nothing was admitted "
            "unless a later status says so: resend the same frame (the same command_id "
            "is safe to resend) once it is back",
        )
    return error(
        ErrorCode.INTERNAL,
        f"the gateway failed to handle this frame ({type(exc).__name__}); it is logged. "
        "Resend it; if it fails again, report it",
    )


def _limited(decision: RateDecision) -> ErrorObject | None:
    if decision.allowed:
        return None
    return error(
        ErrorCode.RATE_LIMITED,
        f"over the {decision.scope} rate limit ({decision.limit}); retry in "
        f"{decision.retry_after_s:.3f} s",
        limit=decision.limit,
        retry_after_s=decision.retry_after_s,
    )
