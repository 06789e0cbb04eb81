"""The sender is answered directly: every status of its commands, whatever its views.

Real gateway processes, real WebSockets, real Redis. The race of issue 9: the view of a
dashboard is refreshed between a command's admission and its fan-out, and the sender
heard nothing more while the edge executed it.
"""

from __future__ import annotations

import base64
import json
import time

import pytest
from hotpath_kit import Dashboard, Edge, dashboards_ready, enroll, keys
from redis.asyncio import Redis

from gateway import grants
from gateway.revocations import revoke_token

from support import Processes, command, user_token

EDGE = "hot_edge_1"
OTHER = "hot_edge_2"


def _jti(token: str) -> str:
    payload = token.split(".")[1]
    return str(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["jti"])


async def test_sender_hears_every_status_after_the_refresh_dropped_its_view(
    processes: Processes,
) -> None:
    """Its only right on the edge is a stored can_control grant, revoked right after the
    command was admitted: the sender still gets `delivered` and `executed`."""
    enroll(processes.env, EDGE)
    ks = keys(processes.env)
    store = Redis.from_url(processes.env["DISPATCH_REDIS_URL"])
    await grants.grant(store, ks, "grantee", EDGE, grants.CAN_CONTROL)
    gw = processes.gateway()
    edge = await Edge().connect(gw, EDGE)
    canary_token = user_token("canary", view=[OTHER])
    sender = await Dashboard().connect(gw, user_token("grantee"))
    canary = await Dashboard().connect(gw, canary_token)
    try:
        body = command(edge_id=EDGE)
        await sender.send(body)
        cid = body["command_id"]
        await sender.status(cid, "routed")
        assert (await edge.command(0))["command_id"] == cid
        await grants.revoke(store, ks, "grantee", EDGE, grants.CAN_CONTROL)
        # The gateway saw the change once a command is refused for it ...
        while True:
            probe = command(edge_id=EDGE)
            await sender.send(probe)
            reply = await sender.status(probe["command_id"], "rejected", "issued")
            if reply["status"] == "rejected":
                assert reply["error"]["code"] == "forbidden"
                break
        # ... and has refreshed every view once a later housekeeping pass closed the
        # canary (token revocations are polled after the views are refreshed).
        await revoke_token(store, ks, _jti(canary_token), time.time() + 3600)
        assert await canary.wait_closed() == 4003
        await edge.ack(cid, "accepted")
        await edge.ack(cid, "executed")
        await sender.status(cid, "executed", timeout_s=5)
        assert sender.statuses(cid) == ["issued", "authorized", "routed", "delivered", "executed"]
    finally:
        for peer in (sender, canary, edge):
            await peer.close()
        await store.aclose()


async def test_viewer_and_sender_get_one_frame_each_and_a_viewer_only_its_edges(
    processes: Processes,
) -> None:
    enroll(processes.env, EDGE, OTHER)
    gw = processes.gateway()
    edge = await Edge().connect(gw, EDGE)
    sender = await Dashboard().connect(gw, user_token("op", control=[EDGE]))
    watcher = await Dashboard().connect(gw, user_token("watcher", view=[EDGE]))
    stranger = await Dashboard().connect(gw, user_token("stranger", view=[OTHER]))
    try:
        await dashboards_ready(gw, 3)
        body = command(edge_id=EDGE)
        cid = body["command_id"]
        await sender.send(body)
        await edge.command(0)
        await edge.ack(cid, "executed")
        for dash in (sender, watcher):
            await dash.status(cid, "executed")
            assert dash.statuses(cid) == ["issued", "authorized", "routed", "executed"]
        # The stranger may not view EDGE: a frame about OTHER proves it is listening.
        other = command(edge_id=OTHER)
        other_sender = await Dashboard().connect(gw, user_token("op2", control=[OTHER]))
        await other_sender.send(other)
        await stranger.status(other["command_id"], "queued")
        assert stranger.statuses(cid) == []
        await other_sender.close()
    finally:
        for peer in (sender, watcher, stranger, edge):
            await peer.close()


async def test_subscribe_after_a_reconnect_gives_current_status_then_every_later_one(
    processes: Processes,
) -> None:
    enroll(processes.env, EDGE, OTHER)
    gw = processes.gateway()
    edge = await Edge().connect(gw, EDGE)
    token = user_token("op", control=[EDGE])
    first = await Dashboard().connect(gw, token)
    body = command(edge_id=EDGE)
    cid = body["command_id"]
    foreign = command(edge_id=OTHER)
    try:
        await first.send(body)
        await first.status(cid, "routed")
        await edge.command(0)
        await first.close()
        elsewhere = await Dashboard().connect(gw, user_token("other", control=[OTHER]))
        await elsewhere.send(foreign)
        await elsewhere.status(foreign["command_id"], "queued")
        again = await Dashboard().connect(gw, token)
        await again.send(
            {"type": "subscribe", "command_ids": [cid, foreign["command_id"], "cmd_nothing"]}
        )
        answer = await again.wait_for(lambda f: f.get("type") == "subscribed")
        assert [s["command_id"] for s in answer["statuses"]] == [cid]
        assert answer["statuses"][0]["status"] == "routed"
        assert answer["unknown"] == [foreign["command_id"], "cmd_nothing"]  # no leak
        await edge.ack(cid, "executed")
        await again.status(cid, "executed")
        await again.send({"type": "subscribe", "command_ids": []})
        refused = await again.wait_for(lambda f: f.get("status") == "rejected")
        assert refused["error"]["code"] == "invalid_command"
        assert "subscribe" in refused["error"]["message"]
        await again.close()
        await elsewhere.close()
    finally:
        await edge.close()


@pytest.mark.parametrize("frame", [b"\xff\xfe", b'{"type": "nonsense"}', b"[]"])
async def test_every_frame_is_answered(processes: Processes, frame: bytes) -> None:
    gw = processes.gateway()
    dash = await Dashboard().connect(gw, user_token("op", control=[EDGE]))
    try:
        await dash.ws.send(frame.decode("latin-1"))
        reply = await dash.wait_for(lambda f: f.get("status") == "rejected")
        assert reply["error"]["code"] in ("malformed_json", "invalid_command")
    finally:
        await dash.close()
