"""The projector reads XREADGROUP replies as Redis sends them (no redis-py reshaping):
every shape a reply can take gives the same entries, quarantined ones included."""

from __future__ import annotations

import msgspec
import pytest
from redis.asyncio import Redis

from ledger.keys import PROJECTOR_GROUP
from projections.logs import decode, raw_reads, stream_rows
from schemas.events import Authorized

from support import REDIS_URL

EVENT = Authorized(
    at=1_795_000_000_000,
    event_id="e1",
    command_id="cmd_1",
    edge_id="edge_00",
    actor="user:a",
    grant="grant:can_control:*",
)


@pytest.mark.parametrize("protocol", [2, 3])
@pytest.mark.parametrize("raw", [True, False])
async def test_every_reply_shape_gives_the_same_entries(
    namespace: str, protocol: int, raw: bool
) -> None:
    client = Redis.from_url(REDIS_URL, protocol=protocol)
    reader = Redis(connection_pool=client.connection_pool)
    if raw:
        raw_reads(reader)
    stream, empty = f"{namespace}:{{p0}}:log", f"{namespace}:{{p1}}:log"
    body = msgspec.json.encode(EVENT)
    try:
        ids = [
            (await client.xadd(stream, {"e": body})).decode(),
            (await client.xadd(stream, {"x": b"1", "y": b"2"})).decode(),  # no `e` field
            (await client.xadd(stream, {"e": b"\xff not utf-8"})).decode(),
            (await client.xadd(stream, {"e": body})).decode(),  # deleted while pending
        ]
        for name in (stream, empty):
            await client.xgroup_create(name, PROJECTOR_GROUP, id="0", mkstream=True)
        first = await reader.xreadgroup(PROJECTOR_GROUP, "c", {stream: ">", empty: ">"}, count=9)
        assert [(s, len(rows)) for s, rows in stream_rows(first) if rows] == [(stream.encode(), 4)]
        await client.xdel(stream, ids[3])
        pending = await reader.xreadgroup(PROJECTOR_GROUP, "c", {stream: "0"}, count=9)
        for reply in (first, pending):
            [(_, rows)] = [(s, r) for s, r in stream_rows(reply) if r]
            entries, seen, bad = decode(stream, rows)
            assert seen == ids
            assert [(e.entry_id, e.event, e.raw) for e in entries][:1] == [(ids[0], EVENT, body)]
            assert [(q.entry_id, q.raw) for q in bad] == [
                (ids[1], b"x=1\ny=2"),
                (ids[2], b"\xff not utf-8"),
            ]
        assert len(decode(stream, stream_rows(pending)[0][1])[0]) == 1  # the deleted one: none
    finally:
        await client.delete(stream, empty)
        await client.aclose()
