"""Auditor queries over the projected history (`GET /api/commands`, `dispatch audit`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection, sql
from psycopg.errors import UndefinedTable
from psycopg.rows import dict_row

from ledger.keys import SAFE_ID
from schemas.events import Status

MAX_LIMIT = 1000


class QueryError(ValueError):
    """A filter that cannot be applied; the message names it."""


def _time(name: str, raw: str | None) -> datetime | None:
    if raw is None or raw == "":
        return None
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise QueryError(f"`{name}` must be an ISO 8601 time, got {raw!r}") from None
    if value.tzinfo is None:
        raise QueryError(f"`{name}` needs a timezone (e.g. 2026-02-15T14:30:00Z), got {raw!r}")
    return value


@dataclass(frozen=True, slots=True)
class AuditQuery:
    edge_id: str | None = None
    source: str | None = None
    status: str | None = None
    command_type: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int = 100

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> AuditQuery:
        edge_id = params.get("edge_id") or None
        if edge_id is not None and not SAFE_ID.match(edge_id):
            raise QueryError(f"`edge_id` {edge_id[:64]!r} is not a valid edge id")
        status = params.get("status") or None
        if status is not None and status not in {s.value for s in Status}:
            raise QueryError(f"`status` must be one of {sorted(s.value for s in Status)}")
        raw_limit = params.get("limit") or "100"
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_LIMIT:
            raise QueryError(f"`limit` must be a whole number from 1 to {MAX_LIMIT}")
        return cls(
            edge_id=edge_id,
            source=params.get("source") or None,
            status=status,
            command_type=params.get("command_type") or None,
            since=_time("since", params.get("since")),
            until=_time("until", params.get("until")),
            limit=int(raw_limit),
        )


COLUMNS = (
    "command_id, edge_id, command_type, device_id, channel, value, unit, priority, source,"
    " actor, status, error_code, error_message, late, deliveries, issued_at, routed_at,"
    " delivered_at, finished_at, expires_at"
)


async def list_commands(
    conn: AsyncConnection, schema: str, query: AuditQuery, visible: frozenset[str] | None
) -> list[dict[str, Any]]:
    where: list[sql.Composable] = []
    args: list[Any] = []
    for column, value in (
        ("edge_id", query.edge_id),
        ("source", query.source),
        ("status", query.status),
        ("command_type", query.command_type),
    ):
        if value is not None:
            where.append(sql.SQL("{} = %s").format(sql.Identifier(column)))
            args.append(value)
    if query.since is not None:
        where.append(sql.SQL("issued_at >= %s"))
        args.append(query.since)
    if query.until is not None:
        where.append(sql.SQL("issued_at < %s"))
        args.append(query.until)
    if visible is not None:
        where.append(sql.SQL("edge_id = ANY(%s)"))
        args.append(sorted(visible))
    statement = sql.SQL(
        "SELECT {cols} FROM {s}.commands {where} ORDER BY issued_at DESC, command_id LIMIT %s"
    ).format(
        cols=sql.SQL(COLUMNS),
        s=sql.Identifier(schema),
        where=sql.SQL("WHERE ") + sql.SQL(" AND ").join(where) if where else sql.SQL(""),
    )
    args.append(query.limit)
    try:
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(statement, args)
            rows = await cur.fetchall()
    except UndefinedTable:
        raise QueryError("the audit tables do not exist yet: start `dispatch projector`") from None
    return [{k: _json(v) for k, v in row.items()} for row in rows]


def _json(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return value
