"""Auditor summary: commands per hour or day by status (`dispatch audit stats`,
`GET /api/stats`).

Buckets are by the time a command was issued, in UTC. On TimescaleDB the bucketing is
`time_bucket`; on native partitions it is `date_bin` with the same origin (Monday
2000-01-03 00:00 UTC, TimescaleDB's default), so both storages give the same answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from psycopg import AsyncConnection, sql

from projections.queries import NotProjected, QueryError, iso
from projections.schema import TIMESCALEDB, storage_of
from schemas.identifiers import is_edge_id

BUCKETS = {"hour": "1 hour", "day": "1 day"}
ORIGIN = "2000-01-03T00:00:00Z"
MAX_BUCKETS = 10_000  # hours in about 14 months: bounds the answer's size


def _time(name: str, raw: str | None) -> datetime | None:
    if not raw:
        return None
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise QueryError(f"`{name}` must be an ISO 8601 time, got {raw[:64]!r}") from None
    if value.tzinfo is None:
        raise QueryError(f"`{name}` needs a timezone (e.g. 2026-02-15T14:30:00Z), got {raw[:64]!r}")
    return value


@dataclass(frozen=True, slots=True)
class StatsQuery:
    bucket: str = "hour"
    edge_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> StatsQuery:
        unknown = sorted(set(params) - {"bucket", "edge_id", "since", "until"})
        if unknown:
            raise QueryError(f"unknown parameter(s) {unknown}: use bucket, edge_id, since, until")
        bucket = params.get("bucket") or "hour"
        if bucket not in BUCKETS:
            raise QueryError(f"`bucket` must be one of {list(BUCKETS)}, got {bucket[:16]!r}")
        edge_id = params.get("edge_id") or None
        if edge_id is not None and not is_edge_id(edge_id):
            raise QueryError(f"`edge_id` is not a valid edge id: {edge_id[:64]!r}")
        since, until = _time("since", params.get("since")), _time("until", params.get("until"))
        if since is not None and until is not None and since >= until:
            raise QueryError("`since` must be before `until`")
        return cls(bucket, edge_id, since, until)


async def _bucket_expression(conn: AsyncConnection, schema: str) -> sql.Composable:
    storage = await storage_of(conn, schema)
    if storage is None:
        raise NotProjected("the audit tables do not exist yet: start `dispatch projector`")
    if storage == TIMESCALEDB:
        cur = await conn.execute(
            "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace"
            " WHERE e.extname = 'timescaledb'"
        )
        row = await cur.fetchone()
        if row is not None:
            return sql.SQL("{}.time_bucket(%(width)s::interval, issued_at)").format(
                sql.Identifier(row[0])
            )
    return sql.SQL("date_bin(%(width)s::interval, issued_at, %(origin)s::timestamptz)")


async def stats(
    conn: AsyncConnection, schema: str, query: StatsQuery, visible: frozenset[str] | None
) -> list[dict[str, Any]]:
    """Oldest bucket first, JSON-ready: {bucket (its UTC start), total, final (commands in
    a final status), statuses: {status: count}}. `visible` None means every edge."""
    bucket = await _bucket_expression(conn, schema)
    where: list[sql.Composable] = []
    args: dict[str, Any] = {"width": BUCKETS[query.bucket], "origin": ORIGIN}
    for name, clause in (
        ("edge_id", "edge_id = %(edge_id)s"),
        ("since", "issued_at >= %(since)s"),
        ("until", "issued_at < %(until)s"),
    ):
        value = getattr(query, name)
        if value is not None:
            where.append(sql.SQL(clause))
            args[name] = value
    if visible is not None:
        where.append(sql.SQL("edge_id = ANY(%(visible)s)"))
        args["visible"] = sorted(visible)
    statement = sql.SQL(
        "SELECT {b} AS bucket, status, bool_or(final), count(*) FROM {s}.commands {w}"
        " GROUP BY 1, 2 ORDER BY 1, 2"
    ).format(
        b=bucket,
        s=sql.Identifier(schema),
        w=sql.SQL("WHERE ") + sql.SQL(" AND ").join(where) if where else sql.SQL(""),
    )
    cur = await conn.execute(statement, args)
    out: dict[datetime, dict[str, Any]] = {}
    for start, status, final, count in await cur.fetchall():
        row = out.setdefault(
            start,
            {"bucket": iso(start.astimezone(UTC)), "total": 0, "final": 0, "statuses": {}},
        )
        if len(out) > MAX_BUCKETS:
            raise QueryError(
                f"more than {MAX_BUCKETS} buckets: narrow `since`/`until` or use bucket=day"
            )
        row["statuses"][status] = int(count)
        row["total"] += int(count)
        row["final"] += int(count) if final else 0
    return list(out.values())
