"""Flow control: an edge gets at most DISPATCH_EDGE_INFLIGHT commands it has not
accepted yet; the rest waits in Redis and is not timed out while it waits."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

import redis
from hotpath_kit import Dashboard, Edge, enroll, keys
from redis.asyncio import Redis

from dispatch.settings import Settings
from ledger.store import Ledger

from support import Processes, command, user_token

EDGE = "hot_flow_edge"
INFLIGHT = 4
ACK_TIMEOUT_MS = 1500


def handed_out(env: dict[str, str], command_ids: list[str]) -> int:
    """How many of the commands the ledger has handed to an edge (its own record)."""
    ks = keys(env)
    client = redis.Redis.from_url(env["DISPATCH_REDIS_URL"])
    try:
        return sum(
            int(client.hget(ks.command(EDGE, c), "deliveries") or 0) > 0 for c in command_ids
        )
    finally:
        client.close()


async def verdicts_later(env: dict[str, str], later_ms: int) -> int:
    """Run the timeout verdicts as they would run `later_ms` from now (shifted clock)."""
    settings = Settings.from_env(env)
    client = Redis.from_url(settings.redis_url)
    ledger = Ledger(client, replace(settings.ledger(), clock_offset_ms=later_ms))
    await ledger.start()
    try:
        p = ledger.keys.partition(EDGE)
        return await ledger.reach_verdicts(p, actor="test:verdicts")
    finally:
        await ledger.close()
        await client.aclose()


async def test_an_edge_gets_only_what_it_has_room_for_and_waiting_is_no_timeout(
    processes: Processes,
) -> None:
    processes.env["DISPATCH_EDGE_INFLIGHT"] = str(INFLIGHT)
    processes.env["DISPATCH_ACK_TIMEOUT_MS"] = str(ACK_TIMEOUT_MS)
    enroll(processes.env, EDGE)
    gw = processes.gateway()
    edge = await Edge().connect(gw, EDGE)
    dash = await Dashboard().connect(gw, user_token("op", control=[EDGE]))
    try:
        # An edge paces its deliveries once it acknowledges: this one has.
        warmup = command(edge_id=EDGE, channel="Warmup")
        await dash.send(warmup)
        await edge.command(0)
        await edge.ack(warmup["command_id"], "executed")
        await dash.status(warmup["command_id"], "executed")
        ids = []
        for i in range(10):
            body = command(edge_id=EDGE, channel=f"C{i}")
            ids.append(body["command_id"])
            await dash.send(body)
        for cid in ids:
            await dash.status(cid, "routed")
        await edge.command(INFLIGHT)
        assert handed_out(processes.env, ids) == INFLIGHT
        # Past the ack timeout: the four sent and unanswered time out, the six waiting
        # in Redis do not (no ack is due before a command is sent) ...
        assert await verdicts_later(processes.env, ACK_TIMEOUT_MS + 500) == INFLIGHT
        for cid in ids[:INFLIGHT]:
            await dash.status(cid, "timed_out")
        # ... and the freed places go to the next ones, in order.
        await edge.command(2 * INFLIGHT)
        assert handed_out(processes.env, ids) == 2 * INFLIGHT
        # Each `accepted` frees one place.
        await edge.ack(ids[INFLIGHT], "accepted")
        await edge.command(2 * INFLIGHT + 1)
        await edge.ack(ids[INFLIGHT + 1], "accepted")
        await edge.command(2 * INFLIGHT + 2)
        assert [c["command_id"] for c in edge.commands] == [warmup["command_id"], *ids]
        for frame in edge.commands:
            assert datetime.fromisoformat(frame["sent_at"]).tzinfo is not None
            assert 0 < frame["remaining_ms"] <= 300_000  # expiry_sec 300
        for cid in ids[INFLIGHT:]:
            await edge.ack(cid, "executed")
            await dash.status(cid, "executed")
            assert "timed_out" not in dash.statuses(cid)
    finally:
        await dash.close()
        await edge.close()
