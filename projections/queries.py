"""Auditor queries over the projected history (`GET /api/commands`, `dispatch audit`).

Pages are newest first and use keyset pagination: the opaque cursor names the last row
of a page by (issued_at, command_id), so pages stay stable while new commands arrive.
Exports stream every matching row in chunks (CSV or a JSON array) without one large
transaction.
"""

from __future__ import annotations

import base64
import csv
import io
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, TypeVar

import msgspec
from psycopg import AsyncConnection, sql
from psycopg.errors import InvalidSchemaName, UndefinedFunction, UndefinedTable
from psycopg.rows import dict_row

from ledger.keys import SAFE_ID
from projections.schema import REFUSALS_CHAIN, has_table
from projections.text import pg_text
from schemas.commands import CommandType
from schemas.errors import ErrorObject
from schemas.events import Status

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
EXPORT_CHUNK = 1000
FORMATS = ("csv", "json")


class QueryError(ValueError):
    """A filter that cannot be applied; the message names it."""


class NotProjected(QueryError):
    """The audit tables do not exist (yet)."""


def parse_time(name: str, raw: str | None) -> datetime | None:
    """The time given as query parameter `name` (ISO 8601 with a zone), None if not given."""
    if not raw:
        return None
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise QueryError(f"`{name}` must be an ISO 8601 time, got {raw[:64]!r}") from None
    if value.tzinfo is None:
        raise QueryError(f"`{name}` needs a timezone (e.g. 2026-02-15T14:30:00Z), got {raw[:64]!r}")
    return value


def _choice(name: str, raw: str | None, allowed: list[str]) -> str | None:
    if not raw:
        return None
    if raw not in allowed:
        raise QueryError(f"`{name}` must be one of {allowed}, got {raw[:64]!r}")
    return raw


def _limit(raw: str | None, default: int | None) -> int | None:
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise QueryError(f"`limit` must be a whole number from 1 to {MAX_LIMIT}, got {raw[:16]!r}")
    return int(raw)


def _text_filter(name: str, raw: str | None) -> str | None:
    if not raw:
        return None
    if len(raw) > 128:
        raise QueryError(f"`{name}` is longer than 128 characters")
    return raw


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a page ended: the sort key of its last row."""

    at: datetime
    key: str

    def encode(self) -> str:
        raw = msgspec.json.encode([self.at.isoformat(), self.key])
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, raw: str) -> Cursor:
        try:
            padded = raw + "=" * (-len(raw) % 4)
            at, key = msgspec.json.decode(base64.urlsafe_b64decode(padded), type=tuple[str, str])
            moment = datetime.fromisoformat(at)
        except Exception:
            raise QueryError(
                f"`cursor` {raw[:64]!r} is not a cursor from a previous page; "
                "pass `next_cursor` unchanged"
            ) from None
        if moment.tzinfo is None:
            raise QueryError("`cursor` is damaged (time without zone)")
        return cls(moment, key)


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """Filters of `GET /api/commands` and `dispatch audit list|export`."""

    edge_id: str | None = None
    source: str | None = None  # as claimed in the command
    user: str | None = None  # who was authenticated (the actor `user:<id>`)
    status: str | None = None
    command_type: str | None = None
    since: datetime | None = None  # issued at or after
    until: datetime | None = None  # issued before
    limit: int | None = DEFAULT_LIMIT
    cursor: Cursor | None = None

    @classmethod
    def from_params(cls, params: Mapping[str, str], *, export: bool = False) -> AuditQuery:
        edge_id = params.get("edge_id") or None
        if edge_id is not None and not SAFE_ID.fullmatch(edge_id):
            raise QueryError(f"`edge_id` {edge_id[:64]!r} is not a valid edge id")
        return cls(
            edge_id=edge_id,
            source=_text_filter("source", params.get("source")),
            user=_text_filter("user", params.get("user")),
            status=_choice("status", params.get("status"), sorted(s.value for s in Status)),
            command_type=_choice(
                "command_type", params.get("command_type"), sorted(t.value for t in CommandType)
            ),
            **_window(params, export),
        )


@dataclass(frozen=True, slots=True)
class RefusalQuery:
    """Filters of `GET /api/rejections` and `dispatch audit refusals`."""

    edge_id: str | None = None
    user: str | None = None
    code: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int | None = DEFAULT_LIMIT
    cursor: Cursor | None = None

    @classmethod
    def from_params(cls, params: Mapping[str, str], *, export: bool = False) -> RefusalQuery:
        return cls(
            edge_id=_text_filter("edge_id", params.get("edge_id")),
            user=_text_filter("user", params.get("user")),
            code=_text_filter("code", params.get("code")),
            **_window(params, export),
        )


def _window(params: Mapping[str, str], export: bool) -> dict[str, Any]:
    """The time range and page shared by every listing: `since`, `until`, `limit`, `cursor`."""
    since, until = (
        parse_time("since", params.get("since")),
        parse_time("until", params.get("until")),
    )
    limit = _limit(params.get("limit"), None if export else DEFAULT_LIMIT)
    raw_cursor = params.get("cursor") or None
    cursor = Cursor.decode(raw_cursor) if raw_cursor else None
    if since and until and since >= until:
        raise QueryError("`since` must be earlier than `until`")
    return {"since": since, "until": until, "limit": limit, "cursor": cursor}


COLUMNS: tuple[str, ...] = (
    "command_id",
    "edge_id",
    "command_type",
    "device_id",
    "channel",
    "value",
    "unit",
    "priority",
    "source",
    "actor",
    "grant_basis",
    "status",
    "final",
    "error_code",
    "error_message",
    "late",
    "deliveries",
    "client_timestamp",
    "issued_at",
    "routed_at",
    "delivered_at",
    "finished_at",
    "executed_at",
    "expires_at",
    "route_ms",
    "deliver_ms",
    "execute_ms",
    "total_ms",
)
REFUSAL_COLUMNS: tuple[str, ...] = (
    "event_id",
    "at",
    "edge_id",
    "command_id",
    "actor",
    "error_code",
    "error_message",
    "input_digest",
    "input_excerpt",
)
EVENT_COLUMNS: tuple[str, ...] = (
    "event_id",
    "status",
    "at",
    "actor",
    "error_code",
    "chain",
    "seq",
    "stream",
    "entry_id",
    "prev_hash",
    "hash",
    "payload",
)


@dataclass(frozen=True, slots=True)
class Page:
    rows: list[dict[str, Any]]
    next_cursor: str | None


def _user_actor(user: str) -> str:
    return user if user.startswith("user:") else f"user:{user}"


@dataclass(frozen=True, slots=True)
class Order:
    """A listing's order, newest first: its time column, then its key (the cursor's parts)."""

    at: str
    key: str


COMMANDS_ORDER = Order("issued_at", "command_id")
REFUSALS_ORDER = Order("at", "event_id")


def _command_filters(
    query: AuditQuery, visible: frozenset[str] | None
) -> tuple[list[sql.Composable], list[Any]]:
    equal = [
        ("edge_id", query.edge_id),
        ("source", query.source),
        ("actor", _user_actor(query.user) if query.user else None),
        ("status", query.status),
        ("command_type", query.command_type),
    ]
    return _filters(equal, query, COMMANDS_ORDER, visible)


def _page(rows: list[dict[str, Any]], limit: int, order: Order) -> Page:
    """`limit` rows and a cursor after the last when the query found one row more."""
    more = len(rows) > limit
    rows = rows[:limit]
    last = rows[-1] if more and rows else None
    cursor = Cursor(last[order.at], last[order.key]).encode() if last is not None else None
    return Page([view(r) for r in rows], cursor)


def _filters(
    equal: list[tuple[str, str | None]],
    query: AuditQuery | RefusalQuery,
    order: Order,
    visible: frozenset[str] | None,
    where: Sequence[sql.Composable] = (),
    args: Sequence[Any] = (),
) -> tuple[list[sql.Composable], list[Any]]:
    """WHERE parts and arguments: equalities, the query's time range and cursor (in
    `order`), visible edges."""
    parts, values = list(where), list(args)
    for column, value in equal:
        if value is not None:
            parts.append(sql.SQL("{} = %s").format(sql.Identifier(column)))
            values.append(pg_text(value))  # stored text is escaped the same way
    t = sql.Identifier(order.at)
    if query.since is not None:
        parts.append(sql.SQL("{} >= %s").format(t))
        values.append(query.since)
    if query.until is not None:
        parts.append(sql.SQL("{} < %s").format(t))
        values.append(query.until)
    if visible is not None:
        parts.append(sql.SQL("edge_id = ANY(%s)"))
        values.append(sorted(visible))
    if query.cursor is not None:
        parts.append(sql.SQL("({}, {}) < (%s, %s)").format(t, sql.Identifier(order.key)))
        values.extend([query.cursor.at, pg_text(query.cursor.key)])
    return parts, values


def _where(parts: list[sql.Composable]) -> sql.Composable:
    return sql.SQL("WHERE ") + sql.SQL(" AND ").join(parts) if parts else sql.SQL("")


async def _fetch(conn: AsyncConnection, statement: sql.Composed, args: list[Any]) -> list[Any]:
    try:
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(statement, args)
            return await cur.fetchall()
    except (UndefinedTable, InvalidSchemaName, UndefinedFunction):
        raise NotProjected(
            "the audit tables do not exist yet: start `dispatch projector`"
        ) from None


async def check_projected(conn: AsyncConnection, schema: str) -> None:
    """Raise NotProjected before a streamed export starts, rather than halfway through."""
    if not await has_table(conn, schema, "commands"):
        raise NotProjected("the audit tables do not exist yet: start `dispatch projector`")


async def list_commands(
    conn: AsyncConnection, schema: str, query: AuditQuery, visible: frozenset[str] | None
) -> Page:
    """One page of commands, newest first; `visible` None means every edge."""
    where, args = _command_filters(query, visible)
    limit = query.limit or DEFAULT_LIMIT
    statement = sql.SQL(
        "SELECT {cols} FROM {s}.commands {where} ORDER BY issued_at DESC, command_id DESC LIMIT %s"
    ).format(
        cols=sql.SQL(", ").join(map(sql.Identifier, COLUMNS)),
        s=sql.Identifier(schema),
        where=_where(where),
    )
    return _page(await _fetch(conn, statement, [*args, limit + 1]), limit, COMMANDS_ORDER)


async def show_command(
    conn: AsyncConnection, schema: str, command_id: str
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The command's row and every stored event of it, in chain order."""
    s = sql.Identifier(schema)
    rows = await _fetch(
        conn,
        sql.SQL("SELECT {cols} FROM {s}.commands WHERE command_id = %s").format(
            cols=sql.SQL(", ").join(map(sql.Identifier, COLUMNS)), s=s
        ),
        [pg_text(command_id)],
    )
    events = await _fetch(
        conn,
        sql.SQL(
            "SELECT {cols} FROM {s}.events WHERE command_id = %s AND chain <> %s ORDER BY seq"
        ).format(cols=sql.SQL(", ").join(map(sql.Identifier, EVENT_COLUMNS)), s=s),
        [pg_text(command_id), REFUSALS_CHAIN],
    )
    return (view(rows[0]) if rows else None), [view(e) for e in events]


async def list_refusals(
    conn: AsyncConnection, schema: str, query: RefusalQuery, visible: frozenset[str] | None
) -> Page:
    """Inputs the gateway refused before admission (no command row exists for them)."""
    # Refusals naming no visible edge (bad JSON, failed logins) are for auditors only.
    equal = [
        ("edge_id", query.edge_id),
        ("actor", _user_actor(query.user) if query.user else None),
        ("error_code", query.code),
    ]
    in_chain = [sql.SQL("chain = %s")]
    where, args = _filters(equal, query, REFUSALS_ORDER, visible, in_chain, [REFUSALS_CHAIN])
    limit = query.limit or DEFAULT_LIMIT
    # The payload's details are read here, not with `::jsonb`: jsonb refuses `\u0000`.
    statement = sql.SQL(
        "SELECT event_id, at, edge_id, command_id, actor, error_code, payload"
        " FROM {s}.events {where} ORDER BY at DESC, event_id DESC LIMIT %s"
    ).format(s=sql.Identifier(schema), where=_where(where))
    rows = await _fetch(conn, statement, [*args, limit + 1])
    return _page([_refusal(r) for r in rows], limit, REFUSALS_ORDER)


class _RefusalDetail(msgspec.Struct):
    error: ErrorObject | None = None
    input_digest: str | None = None
    input_excerpt: str | None = None


_REFUSAL_DETAIL = msgspec.json.Decoder(_RefusalDetail)


def _refusal(row: dict[str, Any]) -> dict[str, Any]:
    """A refusal row with its message, digest and excerpt from the payload (escaped)."""
    payload = row.pop("payload")
    try:
        detail = _REFUSAL_DETAIL.decode(payload)
    except msgspec.MsgspecError:
        detail = _RefusalDetail()  # verify reports a payload that is not an event
    message = detail.error.message if detail.error is not None else None
    row["error_message"] = None if message is None else pg_text(message)
    row["input_digest"] = None if detail.input_digest is None else pg_text(detail.input_digest)
    row["input_excerpt"] = None if detail.input_excerpt is None else pg_text(detail.input_excerpt)
    return row


def export_columns(query: AuditQuery | RefusalQuery) -> tuple[str, ...]:
    """The columns of an export, in order: a refusal's or a command's."""
    return REFUSAL_COLUMNS if isinstance(query, RefusalQuery) else COLUMNS


def export_rows(
    conn: AsyncConnection,
    schema: str,
    query: AuditQuery | RefusalQuery,
    visible: frozenset[str] | None,
) -> AsyncIterator[dict[str, Any]]:
    """Every matching refusal or command (up to `query.limit` when set), in chunks."""
    if isinstance(query, RefusalQuery):
        return _export(list_refusals, conn, schema, query, visible)
    return _export(list_commands, conn, schema, query, visible)


Q = TypeVar("Q", AuditQuery, RefusalQuery)


async def _export(
    lister: Callable[[AsyncConnection, str, Q, frozenset[str] | None], Awaitable[Page]],
    conn: AsyncConnection,
    schema: str,
    query: Q,
    visible: frozenset[str] | None,
) -> AsyncIterator[dict[str, Any]]:
    """Page through `lister` by cursor, EXPORT_CHUNK rows at a time."""
    left = query.limit
    current = query
    while left is None or left > 0:
        chunk = EXPORT_CHUNK if left is None else min(EXPORT_CHUNK, left)
        page = await lister(conn, schema, replace(current, limit=chunk), visible)
        for row in page.rows:
            yield row
        if left is not None:
            left -= len(page.rows)
        if page.next_cursor is None:
            return
        current = replace(current, cursor=Cursor.decode(page.next_cursor))


def iso(value: datetime) -> str:
    return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def view(row: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-ready values: times as ISO 8601 UTC with milliseconds."""
    return {k: iso(v) if isinstance(v, datetime) else v for k, v in row.items()}


# -- export encodings --------------------------------------------------------------------
_encode = msgspec.json.Encoder().encode


# A spreadsheet runs a cell that starts with one of these as a formula (OWASP: CSV
# injection); such text gets a leading single quote. Numbers are left as they are.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """One CSV cell: None empty, JSON for objects, text escaped and formula-safe."""
    if value is None:
        return ""
    if isinstance(value, dict | list):
        value = _encode(value).decode()
    if isinstance(value, str):
        value = pg_text(value)  # NUL and lone surrogates, as stored
        if value.startswith(FORMULA_STARTS):
            return "'" + value
    return value


def csv_line(values: list[Any]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerow([csv_cell(v) for v in values])
    return out.getvalue()


async def encode_export(
    rows: AsyncIterator[dict[str, Any]], columns: tuple[str, ...], fmt: str
) -> AsyncIterator[bytes]:
    """Stream rows as CSV (header first) or as one JSON array."""
    if fmt == "csv":
        yield csv_line(list(columns)).encode()
        async for row in rows:
            yield csv_line([row.get(c) for c in columns]).encode()
        return
    yield b"["
    first = True
    async for row in rows:
        yield (b"" if first else b",\n") + _encode(row)
        first = False
    yield b"]\n"
