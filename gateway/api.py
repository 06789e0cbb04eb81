"""HTTP endpoints: commands for automated services, lifecycle and audit reads, health."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import psycopg
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from psycopg_pool import PoolTimeout
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse

from gateway import cancels, metrics
from gateway.auth import AuthError, User, bearer_token
from gateway.grants import CAN_VIEW
from gateway.state import GatewayState
from ledger.errors import LedgerUnavailable
from ledger.keys import SAFE_ID
from ledger.store import CommandRecord, to_utc
from projections import queries, stats
from schemas.errors import ErrorCode, error
from schemas.events import Event, status_of

_encode = msgspec.json.Encoder().encode
STATIC = __file__.rsplit("/", 1)[0] + "/static"


def _state(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.gateway
    return state


def problem(status: int, code: ErrorCode | str, message: str, **extra: Any) -> JSONResponse:
    body = {
        "status": "rejected",
        "error": {"code": str(getattr(code, "value", code)), "message": message, **extra},
    }
    return JSONResponse(body, status_code=status)


async def authenticate(request: Request) -> User:
    """The caller, or AuthError; every refusal is recorded in the audit stream."""
    token = bearer_token(request.headers.get("authorization"))
    return await _state(request).authenticate_user(request, token)


UserHandler = Callable[[Request, User], Awaitable[Response]]


def user_route(handler: UserHandler) -> Callable[[Request], Awaitable[Response]]:
    """Authenticate the caller before `handler`; a refusal is answered 401 (and audited)."""

    @functools.wraps(handler)
    async def route(request: Request) -> Response:
        try:
            user = await authenticate(request)
        except AuthError as exc:
            return problem(401, ErrorCode.UNAUTHENTICATED, str(exc))
        except LedgerUnavailable as exc:  # revocations cannot be checked now: say so, not 500
            return problem(503, ErrorCode.UNAVAILABLE, str(exc))
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
    state = _state(request)
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
    state = _state(request)
    command_id = request.path_params["command_id"]
    record = await state.ledger.lookup(command_id) if _safe(command_id) else None
    if record is None:
        return problem(404, "not_found", f"no command {command_id!r} in the ledger")
    if await state.grants.allows(user, record.edge_id, CAN_VIEW) is None:
        return problem(403, ErrorCode.FORBIDDEN, f"no can_view on edge {record.edge_id!r}")
    return JSONResponse(command_view(record))


@user_route
async def cancel_command(request: Request, user: User) -> Response:
    state = _state(request)
    outcome = await cancels.cancel(state, user, request.path_params["command_id"])
    return Response(
        _encode(outcome.reply), status_code=outcome.http_status, media_type="application/json"
    )


def _safe(command_id: str) -> bool:
    return bool(SAFE_ID.fullmatch(command_id))


@user_route
async def list_commands(request: Request, user: User) -> Response:
    """Audit history from the projection: a page, or (`format=csv|json`) every match."""
    return await _audit_listing(request, user, refusals=False)


@user_route
async def list_rejections(request: Request, user: User) -> Response:
    """Inputs the gateway refused before admission (they never became commands)."""
    return await _audit_listing(request, user, refusals=True)


async def _audit_listing(request: Request, user: User, *, refusals: bool) -> Response:
    state = _state(request)
    if state.pg is None:
        return problem(503, "unavailable", "the audit database is not configured")
    params = request.query_params
    fmt = params.get("format") or None
    if fmt is not None and fmt not in queries.FORMATS:
        return problem(
            400,
            "invalid_query",
            f"`format` must be one of {list(queries.FORMATS)}, got {fmt[:16]!r}",
        )
    try:
        query: queries.AuditQuery | queries.RefusalQuery = (
            queries.RefusalQuery.from_params(params, export=fmt is not None)
            if refusals
            else queries.AuditQuery.from_params(params, export=fmt is not None)
        )
    except queries.QueryError as exc:
        return problem(400, "invalid_query", str(exc))
    visible = await _visible_edges(state, user)
    schema = state.settings.namespace
    try:
        async with state.pg.connection() as conn:
            if fmt is not None:
                await queries.check_projected(conn, schema)
                return _export(state, schema, query, visible, fmt)
            if isinstance(query, queries.RefusalQuery):
                page = await queries.list_refusals(conn, schema, query, visible)
            else:
                page = await queries.list_commands(conn, schema, query, visible)
    except queries.QueryError as exc:
        return problem(503, "unavailable", str(exc))
    except (PoolTimeout, psycopg.OperationalError) as exc:
        return problem(503, "unavailable", f"the audit database does not answer ({exc})")
    key = "rejections" if refusals else "commands"
    return JSONResponse({key: page.rows, "count": len(page.rows), "next_cursor": page.next_cursor})


@user_route
async def get_stats(request: Request, user: User) -> Response:
    """Commands per hour or day by status (`?bucket=hour|day&edge_id=&since=&until=`)."""
    state = _state(request)
    if state.pg is None:
        return problem(503, "unavailable", "the audit database is not configured")
    try:
        query = stats.StatsQuery.from_params(request.query_params)
    except queries.QueryError as exc:
        return problem(400, "invalid_query", str(exc))
    visible = await _visible_edges(state, user)
    try:
        async with state.pg.connection() as conn:
            buckets = await stats.stats(conn, state.settings.namespace, query, visible)
    except queries.NotProjected as exc:
        return problem(503, "unavailable", str(exc))
    except queries.QueryError as exc:
        return problem(400, "invalid_query", str(exc))
    except (PoolTimeout, psycopg.OperationalError) as exc:
        return problem(503, "unavailable", f"the audit database does not answer ({exc})")
    return JSONResponse({"bucket": query.bucket, "buckets": buckets})


def _export(
    state: GatewayState,
    schema: str,
    query: queries.AuditQuery | queries.RefusalQuery,
    visible: frozenset[str] | None,
    fmt: str,
) -> Response:
    pool = state.pg
    assert pool is not None

    async def body() -> AsyncIterator[bytes]:
        async with pool.connection() as conn:
            if isinstance(query, queries.RefusalQuery):
                rows = queries.export_refusals(conn, schema, query, visible)
                columns = queries.REFUSAL_COLUMNS
            else:
                rows = queries.export_commands(conn, schema, query, visible)
                columns = queries.COLUMNS
            async for chunk in queries.encode_export(rows, columns, fmt):
                yield chunk

    name = "rejections" if isinstance(query, queries.RefusalQuery) else "commands"
    media = "text/csv; charset=utf-8" if fmt == "csv" else "application/json"
    return StreamingResponse(
        body(),
        media_type=media,
        headers={"Content-Disposition": f'attachment; filename="{name}.{fmt}"'},
    )


async def _visible_edges(state: GatewayState, user: User) -> frozenset[str] | None:
    """Edges the user may view; None means all of them (an auditor: `*` in a grant/claim)."""
    return await state.grants.visible_edges(user)


async def edge_config(request: Request) -> Response:
    from edge.capabilities import shipped_config  # noqa: PLC0415 (lands with the edge agent)

    state = _state(request)
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
    return JSONResponse({"status": "ok", "gateway_id": _state(request).gateway_id})


async def readyz(request: Request) -> Response:
    state = _state(request)
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
        if state.pg is None:
            raise RuntimeError("not configured")
        async with state.pg.connection(timeout=2) as conn:
            await conn.execute("SELECT 1")
        checks["postgres"] = {"ok": True}
    except Exception as exc:
        checks["postgres"] = {"ok": False, "error": str(exc) or type(exc).__name__}
    # Only Redis decides readiness: an audit (PostgreSQL) outage degrades the audit routes
    # (503 there) and is reported here, but never takes a gateway out of rotation.
    checks["postgres"]["required"] = False
    ready = bool(checks["redis"]["ok"])
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)


async def metrics_endpoint(request: Request) -> Response:
    return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)


async def index(request: Request) -> Response:
    return FileResponse(f"{STATIC}/index.html", media_type="text/html")
