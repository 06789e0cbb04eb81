"""Statuses from replies and from the tail, real processes: each once, in log order.

The sender's gateway records the admission (its statuses go out from the script's
reply); the edge's gateway records the acks, which the sender's gateway only learns
from its log tail. A viewer on the edge's gateway hears the admission from its tail
and the acks from the replies. Every session must get each status once, in order.
"""

from __future__ import annotations

from typing import Any

from hotpath_kit import Dashboard, Edge, dashboards_ready, enroll, metric

from support import Gateway, Processes, command, user_token

EDGE_A = "direct_edge_a"  # on the sender's gateway: every status from replies there
EDGE_B = "direct_edge_b"  # on the other gateway
LIFECYCLE = ["issued", "authorized", "routed", "delivered", "executed"]


def _reply_frames(gw: Gateway) -> float:
    return metric(gw, 'dispatch_status_frames_total{path="reply"}')


def _frames(dash: Dashboard, command_id: str) -> list[dict[str, Any]]:
    return [f for f in dash.frames if f.get("command_id") == command_id]


async def test_statuses_reach_every_session_once_in_order_from_either_path(
    processes: Processes,
) -> None:
    enroll(processes.env, EDGE_A, EDGE_B)
    gw1, gw2 = processes.gateway(), processes.gateway()
    edge_a = await Edge().connect(gw1, EDGE_A)
    edge_b = await Edge().connect(gw2, EDGE_B)
    sender = await Dashboard().connect(gw1, user_token("op", control=[EDGE_A, EDGE_B]))
    viewer = await Dashboard().connect(gw2, user_token("watcher", view=[EDGE_A, EDGE_B]))
    try:
        await dashboards_ready(gw2, 1)
        sent: list[str] = []
        for round_ in range(3):
            for edge_id, edge in ((EDGE_A, edge_a), (EDGE_B, edge_b)):
                body = command(edge_id=edge_id)
                cid = body["command_id"]
                sent.append(cid)
                await sender.send(body)
                await edge.command(round_)
                await edge.ack(cid, "accepted")
                await edge.ack(cid, "executed")
                for dash in (sender, viewer):
                    await dash.status(cid, "executed")
        # A last command through both gateways: once both have heard it end, each one's
        # tail has passed every earlier event, so a doubled status would be here by now.
        last = command(edge_id=EDGE_B)
        await sender.send(last)
        await edge_b.command(3)
        await edge_b.ack(last["command_id"], "executed")
        for dash in (sender, viewer):
            await dash.status(last["command_id"], "executed")
        for dash in (sender, viewer):
            for cid in sent:
                assert dash.statuses(cid) == LIFECYCLE, (cid, dash.statuses(cid))
        # Built from a reply on one gateway and from the logged event on the other, the
        # frames are the same, field for field.
        for cid in sent:
            assert _frames(sender, cid) == _frames(viewer, cid)
        # The direct path carried the statuses each gateway recorded itself: the
        # admissions (3 statuses each) on gw1, and the acks of EDGE_A on gw1, of EDGE_B
        # on gw2 (2 each).
        assert _reply_frames(gw1) >= 6 * 3 + 3 * 2
        assert _reply_frames(gw2) >= 3 * 2
    finally:
        for peer in (sender, viewer, edge_a, edge_b):
            await peer.close()
