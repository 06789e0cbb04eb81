"""Who may even start talking: refused handshakes throttled per address, sockets per user.

A client whose handshakes keep being refused (no token, a bad token, a foreign origin,
an oversized or unfinished request head) costs the gateway a token check and an audit
entry each time. Each client address has a token bucket of refusals (in this process's
memory: refusals are cheap to count and an attacker gains nothing by spreading over
gateways except a proportionally larger budget). While an address's bucket is empty,
its WebSocket handshakes and `/api` requests are answered 429 with `Retry-After` before
any work is done, counted in `dispatch_handshakes_throttled_total`, and summarised in
the audit stream by one entry per address per window instead of one entry each.

Every user may hold at most `DISPATCH_MAX_SOCKETS_PER_USER` dashboard connections on
one gateway; one more is refused with HTTP 429 naming the cap.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from prometheus_client import Counter
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from config.settings import Settings
from gateway.handshake import denial_body, refuse_with
from gateway.metrics import REGISTRY
from gateway.refusals import refusal_event
from schemas.errors import ErrorCode, ErrorObject
from schemas.events import Rejected

log = logging.getLogger("gateway.admission")

THROTTLED = Counter(
    "dispatch_handshakes_throttled_total",
    "Handshakes and /api requests answered 429 because their address had too many refusals",
    registry=REGISTRY,
)
REFUSED = Counter(
    "dispatch_handshakes_refused_total",
    "Refused handshakes and /api requests charged to their address, by HTTP status",
    ["status"],
    registry=REGISTRY,
)
# Addresses remembered at most; the least recently refused are forgotten first.
MAX_ADDRESSES = 100_000
AUTH_STATUSES = frozenset({401, 403})  # no or bad token, foreign origin, no permission
CHARGED_STATUSES = AUTH_STATUSES | {400}  # handshakes: a bad edge id in the path too
SLOT_KEY = "dispatch.socket_user"  # scope key: the user whose socket slot this connection holds
ADMISSION_KEY = "dispatch.admission"  # scope key: the Admission that guards this connection

Recorder = Callable[[Rejected], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    refusals_per_s: float = 1.0  # 0 switches the throttle off
    refusal_burst: int = 30
    summary_window_s: float = 60.0
    max_sockets_per_user: int = 16  # 0: no cap

    @classmethod
    def from_settings(cls, settings: Settings) -> AdmissionLimits:
        return cls(
            refusals_per_s=settings.handshake_refusals_per_s,
            refusal_burst=settings.handshake_refusal_burst,
            summary_window_s=settings.handshake_summary_window_s,
            max_sockets_per_user=settings.max_sockets_per_user,
        )

    @property
    def describe(self) -> str:
        return (
            f"refused handshakes per address: {self.refusals_per_s:g}/s burst {self.refusal_burst}"
        )


@dataclass(slots=True)
class _Summary:
    """Refusals of one address throttled during one window, written once at its end."""

    count: int = 0
    paths: set[str] = field(default_factory=set)


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


class Admission:
    """Refusal buckets per client address, throttled-refusal summaries, socket slots."""

    def __init__(
        self, limits: AdmissionLimits, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits = limits
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._summaries: dict[str, _Summary] = {}
        self._sockets: dict[str, int] = {}
        self._recorder: Recorder | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # -- wiring ------------------------------------------------------------------------
    def attach(self, recorder: Recorder) -> None:
        """Where audit records go (the ledger's audit stream), once the gateway is open."""
        self._recorder = recorder

    async def close(self) -> None:
        """Write the summaries of windows still open, then stop."""
        for address in list(self._summaries):
            self._flush(address)
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)

    # -- the refusal buckets -----------------------------------------------------------
    def _bucket(self, address: str) -> _Bucket:
        now = self._clock()
        bucket = self._buckets.get(address)
        if bucket is None:
            bucket = _Bucket(float(self.limits.refusal_burst), now)
            self._buckets[address] = bucket
            if len(self._buckets) > MAX_ADDRESSES:
                self._buckets.popitem(last=False)
        else:
            refill = (now - bucket.at) * self.limits.refusals_per_s
            bucket.tokens = min(float(self.limits.refusal_burst), bucket.tokens + refill)
            bucket.at = now
        self._buckets.move_to_end(address)
        return bucket

    def retry_after_s(self, address: str) -> float | None:
        """Seconds until `address` may try again, or None if it is not throttled."""
        if self.limits.refusals_per_s <= 0 or address not in self._buckets:
            return None
        bucket = self._bucket(address)
        if bucket.tokens >= 1:
            return None
        return (1 - bucket.tokens) / self.limits.refusals_per_s

    def charge(self, address: str) -> None:
        """One refusal from `address` (the caller records it in the audit itself)."""
        if self.limits.refusals_per_s > 0:
            bucket = self._bucket(address)
            bucket.tokens = max(0.0, bucket.tokens - 1)

    def refused_before_app(
        self, address: str, port: int, status: int, err: ErrorObject, detail: str
    ) -> bool:
        """A request the protocol layer refused (431/408/400): charged, then recorded (True)
        or, beyond the address's budget, only summarised (False)."""
        REFUSED.labels(str(status)).inc()
        key = bucket_key(address)
        if self.retry_after_s(key) is not None:
            self.throttled(key, "(request head)")
            return False
        self.charge(key)
        self.record(refusal_event(f"anonymous@{address}:{port}", err, excerpt=detail))
        return True

    def throttled(self, address: str, path: str) -> None:
        """Count a 429 for `address`; the first one in a window opens its summary."""
        THROTTLED.inc()
        summary = self._summaries.get(address)
        if summary is None:
            summary = self._summaries[address] = _Summary()
            log.warning(
                "gateway.admission.throttled address=%s limit=%r window_s=%g",
                address,
                self.limits.describe,
                self.limits.summary_window_s,
            )
            loop = asyncio.get_running_loop()
            loop.call_later(self.limits.summary_window_s, self._flush, address)
        summary.count += 1
        if len(summary.paths) < 8:
            summary.paths.add(path[:80])

    def _flush(self, address: str) -> None:
        summary = self._summaries.pop(address, None)
        if summary is None:
            return
        err = ErrorObject(
            code=ErrorCode.RATE_LIMITED,
            message=f"{summary.count} refused handshake(s) from {address} within "
            f"{self.limits.summary_window_s:g} s beyond the limit (answered 429, or 431/408 "
            "for bad request heads); counted here, not recorded one by one",
            limit=self.limits.describe,
        )
        excerpt = f"throttled {summary.count} from {address}: {', '.join(sorted(summary.paths))}"
        self.record(refusal_event(f"anonymous@{address}", err, excerpt=excerpt))

    def record(self, event: Rejected) -> None:
        if self._recorder is None:
            log.warning("gateway.admission.unrecorded event=%s", event.error.message)
            return
        task = asyncio.get_running_loop().create_task(self._write(self._recorder, event))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _write(recorder: Recorder, event: Rejected) -> None:
        try:
            await recorder(event)
        except Exception as exc:  # the audit is best effort here, like every refusal's
            log.warning("gateway.admission.audit_failed error=%s", exc)

    # -- sockets per user --------------------------------------------------------------
    def claim_socket(self, scope: Scope, user_id: str) -> bool:
        """Take one of `user_id`'s socket slots for this connection (False: at the cap)."""
        cap = self.limits.max_sockets_per_user
        held = self._sockets.get(user_id, 0)
        if cap and held >= cap:
            return False
        self._sockets[user_id] = held + 1
        scope[SLOT_KEY] = user_id
        return True

    def release_socket(self, scope: Scope) -> None:
        user_id = scope.pop(SLOT_KEY, None)
        if user_id is None:
            return
        held = self._sockets.get(user_id, 0) - 1
        if held > 0:
            self._sockets[user_id] = held
        else:
            self._sockets.pop(user_id, None)

    def sockets_of(self, user_id: str) -> int:
        return self._sockets.get(user_id, 0)


def bucket_key(address: str) -> str:
    """What a refusal bucket belongs to: the IPv4 address, or the IPv6 /64 around it.

    One IPv6 host usually holds a whole /64; per address it could refresh its budget at
    will.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address  # "unknown", a unix socket path
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def _client(scope: Scope) -> tuple[str, int]:
    client = scope.get("client")
    if not client:
        return "unknown", 0
    return str(client[0]), int(client[1] or 0)


def _guarded(scope: Scope) -> bool:
    """Handshakes and API requests are throttled; health checks and pages are not."""
    if scope["type"] == "websocket":
        return True
    return scope["type"] == "http" and str(scope.get("path", "")).startswith("/api/")


def _throttle_error(retry_after_s: float, limits: AdmissionLimits) -> ErrorObject:
    return ErrorObject(
        code=ErrorCode.RATE_LIMITED,
        message=f"too many refused handshakes from this address; retry in "
        f"{max(1, math.ceil(retry_after_s))} s with valid credentials",
        limit=limits.describe,
        retry_after_s=round(retry_after_s, 3),
    )


class AdmissionMiddleware:
    """ASGI middleware: answers throttled addresses 429, charges every refusal it sees.

    It also follows the lifespan: once the application has started, refusals are recorded
    through its ledger; before it shuts down, open summaries are written.
    """

    def __init__(self, app: ASGIApp, admission: Admission) -> None:
        self.app = app
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, self._before_shutdown(receive), self._after_startup(scope, send))
            return
        scope[ADMISSION_KEY] = self.admission
        if not _guarded(scope):
            await self.app(scope, receive, send)
            return
        address = bucket_key(_client(scope)[0])
        retry = self.admission.retry_after_s(address)
        if retry is not None:
            self.admission.throttled(address, str(scope.get("path", "")))
            err = _throttle_error(retry, self.admission.limits)
            headers = {"Retry-After": str(max(1, math.ceil(retry)))}
            if scope["type"] == "websocket":
                ws = WebSocket(scope, receive, send)
                await ws.receive()  # websocket.connect
                await refuse_with(ws, 429, err, headers)
            else:
                await JSONResponse(denial_body(err), 429, headers)(scope, receive, send)
            return
        accepted = False
        refused: int | None = None  # the status of a refusal charged to the address

        async def watch(message: Message) -> None:
            nonlocal accepted, refused
            kind = message["type"]
            if kind == "websocket.accept":
                accepted = True
            elif kind in ("websocket.http.response.start", "http.response.start"):
                # Refusals of who or where the caller is; a user at the socket cap (429)
                # is known and audited by name, and is not charged to the address.
                charged = CHARGED_STATUSES if kind.startswith("websocket") else AUTH_STATUSES
                if message["status"] in charged:
                    refused = message["status"]
            elif kind == "websocket.close" and not accepted:
                refused = 403  # what uvicorn answers for a close before accept
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            self.admission.release_socket(scope)
            if refused is not None:
                REFUSED.labels(str(refused)).inc()
                self.admission.charge(address)

    def _after_startup(self, scope: Scope, send: Send) -> Send:
        async def watch(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                self.admission.attach(scope["app"].state.gateway.ledger.record_rejection)
            await send(message)

        return watch

    def _before_shutdown(self, receive: Receive) -> Receive:
        async def watch() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await self.admission.close()  # while the ledger is still open
            return message

        return watch


async def admit_user_socket(ws: WebSocket, user_id: str, actor: str) -> bool:
    """Claim a socket slot for `user_id`; at the cap, refuse with 429 (audited) and say so."""
    admission: Admission = ws.scope[ADMISSION_KEY]
    if admission.claim_socket(ws.scope, user_id):
        return True
    cap = admission.limits.max_sockets_per_user
    err = ErrorObject(
        code=ErrorCode.RATE_LIMITED,
        message=f"user {user_id!r} already has {cap} open connections to this gateway "
        "(DISPATCH_MAX_SOCKETS_PER_USER); close one before opening another",
        limit=f"sockets per user: {cap}",
    )
    address, port = _client(ws.scope)
    event = refusal_event(actor, err, excerpt=f"{ws.url.path} from {address}:{port}")
    admission.record(event)
    await refuse_with(ws, 429, err)
    return False
