"""Reading the ledger's logs for projection: decode entries, fetch ranges by position."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from ledger.connection import AnyRedis
from ledger.records import EVENT_DECODER
from projections import quarantine
from projections.quarantine import Quarantined
from projections.writer import Entry, Gap

log = logging.getLogger("projections.logs")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def raw_reads(redis: Any) -> None:
    """Make `redis` (a client of its own) return XREADGROUP replies as Redis sends them:
    redis-py's reshaping of every entry into a tuple and a dict cost more than decoding
    the event itself. `stream_rows` and `decode` read both shapes."""
    redis.set_response_callback("XREADGROUP", lambda response, **_options: response)


def stream_rows(reply: Any) -> list[tuple[Any, list[Any]]]:
    """(stream, rows) pairs of a read reply: RESP3's map, RESP2's list, or redis-py's."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return [(stream, _rows(rows)) for stream, rows in reply.items()]
    return [(stream, _rows(rows)) for stream, rows in reply]


def _rows(rows: Any) -> list[Any]:
    # redis-py's RESP3 shape for one stream wraps its rows in one more list.
    if len(rows) == 1 and isinstance(rows[0], list):
        inner = rows[0]
        if not inner or isinstance(inner[0], list | tuple):
            return list(inner)
    return list(rows)


def _fields(fields: Any) -> dict[bytes, Any]:
    if isinstance(fields, dict):
        return fields
    return dict(zip(fields[::2], fields[1::2], strict=False))


def decode(stream: str, rows: Iterable[Any]) -> tuple[list[Entry], list[str], list[Quarantined]]:
    """Decoded entries, the ids of every row, and the entries to quarantine (undecodable).
    A row's fields are a dict (redis-py) or the flat list Redis sends (`raw_reads`)."""
    entries: list[Entry] = []
    ids: list[str] = []
    bad: list[Quarantined] = []
    for entry_id_raw, fields in rows:
        entry_id = _text(entry_id_raw)
        ids.append(entry_id)
        if not fields:
            continue  # deleted while pending (trimmed): nothing left to project
        if fields.__class__ is list and len(fields) == 2 and fields[0] == b"e":
            raw = fields[1]  # the ledger's entries: one field, `e`
        else:
            raw = _fields(fields).get(b"e")
        if raw is None:
            bad.append(quarantine.undecodable(stream, entry_id, _fields(fields), "no `e` field"))
            continue
        try:
            raw.decode()  # stored as text: must be UTF-8
            event = EVENT_DECODER.decode(raw)
        except Exception as exc:
            bad.append(quarantine.undecodable(stream, entry_id, _fields(fields), exc))
            continue
        entries.append(Entry(stream, entry_id, event, bytes(raw)))
    return entries, ids, bad


class LogReader:
    """Range reads of the ledger's streams (XRANGE), bounded per call."""

    def __init__(self, redis: AnyRedis, *, batch: int = 500, gap_limit: int = 5000) -> None:
        self.redis = redis
        self.batch = batch
        self.gap_limit = gap_limit

    async def fetch(self, stream: str, after: str, before: str, *, upto: str = "+") -> Gap:
        """Entries after `after` and before `before` ('+': up to `upto`, inclusive), bounded."""
        end = upto if before == "+" else f"({before}"
        entries: list[Entry] = []
        examined: list[str] = []
        bad: list[Quarantined] = []
        reached = after
        while len(examined) < self.gap_limit:
            rows: Any = await self.redis.xrange(
                stream, f"({reached}", end, count=min(self.batch, self.gap_limit - len(examined))
            )
            if not rows:
                return Gap(entries, True, reached, examined, bad)
            got, ids, undecodable = decode(stream, rows)
            entries.extend(got)
            examined.extend(ids)
            bad.extend(undecodable)
            reached = ids[-1]
        return Gap(entries, False, reached, examined, bad)

    async def last_id(self, stream: str) -> str | None:
        rows: Any = await self.redis.xrevrange(stream, "+", "-", count=1)
        return _text(rows[0][0]) if rows else None
