"""HTTP endpoints: commands for automated services, lifecycle reads, health.

The audit reads (history, refusals, stats) live with the audit: projections/api.py."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response

from edge.capabilities import shipped_config
from gateway import cancels, metrics
from gateway.auth import AuthError, User, bearer_token
from gateway.grants import CAN_VIEW
from gateway.state import GatewayState
from ledger.errors import LedgerUnavailable
from ledger.keys import SAFE_ID
from ledger.records import CommandRecord, to_utc
from schemas.errors import ErrorCode, error, problem_body
from schemas.events import Event, status_of

_encode = msgspec.json.Encoder().encode
STATIC = __file__.rsplit("/", 1)[0] + "/static"
TAIL_STALE_S = 10.0  # ten of its one-second reads missed


def state_of(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.gateway
    return state


def problem(status: int, code: ErrorCode | str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse(problem_body(code, message, **extra), status_code=status)


async def authenticate(request: Request) -> User:
    """The caller, or AuthError; every refusal is recorded in the audit stream."""
    token = bearer_token(request.headers.get("authorization"))
    return await state_of(request).authenticate_user(request, token)


async def caller(request: Request) -> User | Response:
    """The authenticated caller, or the response refusing it: 401, or 503 when revocations
    cannot be checked now (said so, not 500)."""
    try:
        return await authenticate(request)
    except AuthError as exc:
        return problem(401, ErrorCode.UNAUTHENTICATED, str(exc))
    except LedgerUnavailable as exc:
        return problem(503, ErrorCode.UNAVAILABLE, str(exc))


UserHandler = Callable[[Request, User], Awaitable[Response]]


def user_route(handler: UserHandler) -> Callable[[Request], Awaitable[Response]]:
    """Authenticate the caller before `handler`; a refusal is answered 401 (and audited)."""

    @functools.wraps(handler)
    async def route(request: Request) -> Response:
        user = await caller(request)
        if isinstance(user, Response):
            return user
        return await handler(request, user)

    return route


async def read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None as soon as it exceeds `limit` (nothing more is buffered)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


@user_route
async def post_command(request: Request, user: User) -> Response:
    state = state_of(request)
    limit = state.settings.max_message_bytes
    raw = await read_body(request, limit)
    if raw is None:
        outcome = await state.intake.refuse(
            b"", user, error(ErrorCode.TOO_LARGE, f"body exceeds the {limit}-byte limit")
        )
    else:
        outcome = await state.intake.submit(raw, user)
    headers = {}
    if outcome.reply.error is not None and outcome.reply.error.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(outcome.reply.error.retry_after_s + 0.499)))
    return Response(
        _encode(outcome.reply),
        status_code=outcome.http_status,
        media_type="application/json",
        headers=headers,
    )


def _event_view(event: Event) -> dict[str, Any]:
    view: dict[str, Any] = msgspec.to_builtins(event)
    view["status"] = status_of(event).value
    view["at"] = to_utc(event.at).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    view.pop("command", None)
    return view


def command_view(record: CommandRecord) -> dict[str, Any]:
    return {
        "command_id": record.command_id,
        "edge_id": record.edge_id,
        "status": record.status,
        "late": record.late,
        "command": msgspec.to_builtins(record.command),
        "events": [_event_view(e) for e in record.events],
    }


@user_route
async def get_command(request: Request, user: User) -> Response:
    state = state_of(request)
    command_id = request.path_params["command_id"]
    record = await state.ledger.lookup(command_id) if _safe(command_id) else None
    if record is None:
        return problem(404, "not_found", f"no command {command_id!r} in the ledger")
    if await state.grants.allows(user, record.edge_id, CAN_VIEW) is None:
        return problem(403, ErrorCode.FORBIDDEN, f"no can_view on edge {record.edge_id!r}")
    return JSONResponse(command_view(record))


@user_route
async def cancel_command(request: Request, user: User) -> Response:
    state = state_of(request)
    outcome = await cancels.cancel(state, user, request.path_params["command_id"])
    return Response(
        _encode(outcome.reply), status_code=outcome.http_status, media_type="application/json"
    )


def _safe(command_id: str) -> bool:
    return bool(SAFE_ID.fullmatch(command_id))


async def edge_config(request: Request) -> Response:
    state = state_of(request)
    edge_id = request.path_params["edge_id"]
    token = bearer_token(request.headers.get("authorization"))
    try:
        if token is None or not _safe(edge_id):
            raise AuthError("an edge credential for this edge is required")
        identity = await state.auth.edge(token, edge_id)
        await state.check_not_revoked(identity.jti)
    except AuthError as exc:
        err = error(ErrorCode.UNAUTHENTICATED, str(exc))
        await state.audit_refusal(request, edge_id if _safe(edge_id) else "", err)
        return problem(401, ErrorCode.UNAUTHENTICATED, str(exc))
    stored = await state.redis.get(state.ledger.keys.edge_config(edge_id))
    raw = stored if stored is not None else shipped_config(edge_id)
    if raw is None:
        return problem(404, "not_found", f"no capability config for edge {edge_id!r}")
    return Response(raw, media_type="application/json")


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok", "gateway_id": state_of(request).gateway_id})


async def readyz(request: Request) -> Response:
    state = state_of(request)
    checks: dict[str, Any] = {}
    try:
        await state.redis.ping()
        persistence = await state.ledger.persistence()
        checks["redis"] = {
            "ok": True,
            "persistence": persistence.mode,
            "aof_enabled": persistence.aof_enabled,
            "appendfsync": persistence.appendfsync,
        }
        if persistence.warning:
            checks["redis"]["warning"] = persistence.warning
    except Exception as exc:
        checks["redis"] = {"ok": False, "error": str(exc)}
    try:
        probe = request.app.state.audit_probe
        if probe is None:
            raise RuntimeError("not configured")
        await probe(2.0)
        checks["postgres"] = {"ok": True}
    except Exception as exc:
        checks["postgres"] = {"ok": False, "error": str(exc) or type(exc).__name__}
    # Every status a sender hears comes through the ledger tail: a gateway whose tail has
    # stopped reading answers nobody, so it leaves the rotation.
    age_s = state.hub.tail_age_s()
    checks["tail"] = {"ok": age_s < TAIL_STALE_S, "age_s": round(age_s, 1)}
    if age_s >= TAIL_STALE_S:
        checks["tail"]["error"] = (
            f"the ledger tail has not read for {age_s:.0f} s (at least once a second when "
            "well); see ledger.tail.* lines in this gateway's log"
        )
    # Only Redis (and the tail reading it) decides readiness: an audit (PostgreSQL) outage degrades the audit routes
    # (503 there) and is reported here, but never takes a gateway out of rotation.
    checks["postgres"]["required"] = False
    ready = bool(checks["redis"]["ok"]) and bool(checks["tail"]["ok"])
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)


async def metrics_endpoint(request: Request) -> Response:
    return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)


async def index(request: Request) -> Response:
    return FileResponse(f"{STATIC}/index.html", media_type="text/html")
