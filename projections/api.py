"""The audit HTTP routes: command history, refusals, stats and exports from the projection.

They know nothing of the gateway: the composition root (dispatch/app.py) mounts them,
opens their `AuditDatabase` for the life of the app and hands each request's `AuditAccess`
(the pool, the schema, the edges the caller may view) through a `Gate`, which answers the
refusal itself when the caller may not read.
A PostgreSQL outage degrades these routes only (503 here), never a gateway's readiness.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from projections import quarantine, queries, stats
from schemas.errors import problem_body

log = logging.getLogger("projections.api")


class AuditDatabase:
    """The audit's PostgreSQL pool, open while the composed app runs (`opened`).

    `pool` is None outside that span. Opening never waits for PostgreSQL: commands flow
    without it, and the audit routes answer 503 until it answers.
    """

    def __init__(self, url: str, schema: str) -> None:
        self.url = url
        self.schema = schema
        self.pool: AsyncConnectionPool | None = None

    @asynccontextmanager
    async def opened(self) -> AsyncIterator[AsyncConnectionPool]:
        pool = AsyncConnectionPool(
            self.url, min_size=1, max_size=4, open=False, timeout=5, kwargs={"autocommit": True}
        )
        try:
            await pool.open(wait=False)
        except Exception as exc:  # the pool keeps trying; the routes answer 503 meanwhile
            log.warning("audit.postgres.unavailable error=%s", exc)
        self.pool = pool
        try:
            yield pool
        finally:
            self.pool = None
            with suppress(Exception):
                await pool.close()

    async def probe(self, timeout_s: float) -> int | None:
        """Raises unless PostgreSQL answers within `timeout_s`; the number of quarantined
        log entries (None: no quarantine table in this deployment)."""
        if self.pool is None:
            raise RuntimeError("the audit database is not open")
        async with self.pool.connection(timeout=timeout_s) as conn:
            await conn.execute("SELECT 1")
            return await quarantine.count(conn, self.schema)


@dataclass(frozen=True)
class AuditAccess:
    """What one authenticated caller may read, and where from."""

    pool: AsyncConnectionPool | None  # None: no audit database is configured
    schema: str
    visible: frozenset[str] | None  # edges the caller may view; None means all (an auditor)


# The caller's access, or the response that refuses it (401, 503).
Gate = Callable[[Request], Awaitable[AuditAccess | Response]]


def routes(gate: Gate) -> list[Route]:
    """GET /api/commands (history, `format=csv|json` export), /api/rejections, /api/stats."""

    async def list_commands(request: Request) -> Response:
        access = await gate(request)
        if isinstance(access, Response):
            return access
        return await audit_listing(access, request, refusals=False)

    async def list_rejections(request: Request) -> Response:
        """Inputs the gateway refused before admission (they never became commands)."""
        access = await gate(request)
        if isinstance(access, Response):
            return access
        return await audit_listing(access, request, refusals=True)

    async def get_stats(request: Request) -> Response:
        access = await gate(request)
        if isinstance(access, Response):
            return access
        return await stats_response(access, request)

    return [
        Route("/api/commands", list_commands, methods=["GET"]),
        Route("/api/rejections", list_rejections, methods=["GET"]),
        Route("/api/stats", get_stats, methods=["GET"]),
    ]


def problem(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(problem_body(code, message), status_code=status)


def not_configured() -> JSONResponse:
    return problem(503, "unavailable", "the audit database is not configured")


def not_answering(exc: Exception) -> JSONResponse:
    return problem(503, "unavailable", f"the audit database does not answer ({exc})")


async def audit_listing(access: AuditAccess, request: Request, *, refusals: bool) -> Response:
    """Audit history from the projection: a page, or (`format=csv|json`) every match."""
    if access.pool is None:
        return not_configured()
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
    try:
        async with access.pool.connection() as conn:
            if fmt is not None:
                await queries.check_projected(conn, access.schema)
                return export(access, query, fmt)
            if isinstance(query, queries.RefusalQuery):
                page = await queries.list_refusals(conn, access.schema, query, access.visible)
            else:
                page = await queries.list_commands(conn, access.schema, query, access.visible)
    except queries.QueryError as exc:
        return problem(503, "unavailable", str(exc))
    except (PoolTimeout, psycopg.OperationalError) as exc:
        return not_answering(exc)
    key = "rejections" if refusals else "commands"
    return JSONResponse({key: page.rows, "count": len(page.rows), "next_cursor": page.next_cursor})


async def stats_response(access: AuditAccess, request: Request) -> Response:
    """Commands per hour or day by status (`?bucket=hour|day&edge_id=&since=&until=`)."""
    if access.pool is None:
        return not_configured()
    try:
        query = stats.StatsQuery.from_params(request.query_params)
    except queries.QueryError as exc:
        return problem(400, "invalid_query", str(exc))
    try:
        async with access.pool.connection() as conn:
            buckets = await stats.stats(conn, access.schema, query, access.visible)
    except queries.NotProjected as exc:
        return problem(503, "unavailable", str(exc))
    except queries.QueryError as exc:
        return problem(400, "invalid_query", str(exc))
    except (PoolTimeout, psycopg.OperationalError) as exc:
        return not_answering(exc)
    return JSONResponse({"bucket": query.bucket, "buckets": buckets})


def export(
    access: AuditAccess, query: queries.AuditQuery | queries.RefusalQuery, fmt: str
) -> Response:
    """Every match streamed from its own connection, so the export is not held in memory."""
    pool, schema, visible = access.pool, access.schema, access.visible
    assert pool is not None

    async def body() -> AsyncIterator[bytes]:
        async with pool.connection() as conn:
            rows = queries.export_rows(conn, schema, query, visible)
            async for chunk in queries.encode_export(rows, queries.export_columns(query), fmt):
                yield chunk

    name = "rejections" if isinstance(query, queries.RefusalQuery) else "commands"
    media = "text/csv; charset=utf-8" if fmt == "csv" else "application/json"
    return StreamingResponse(
        body(),
        media_type=media,
        headers={"Content-Disposition": f'attachment; filename="{name}.{fmt}"'},
    )
