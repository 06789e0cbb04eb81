"""A pipeline whose reply is lost is resent by redis-py: the delivery script answers the
rerun with its first run's reply, so the command still reaches the edge, once."""

from __future__ import annotations

from hotpath_kit import Dashboard, Edge, enroll
from netproxy import NetProxy

from ledger import scripts

from support import REDIS_URL, Processes, command, user_token

EDGE = "hot_lost_reply_edge"


async def test_a_lost_delivery_reply_still_reaches_the_edge_exactly_once(
    processes: Processes,
) -> None:
    enroll(processes.env, EDGE)
    redis_port = int(REDIS_URL.rsplit(":", 1)[1].split("/")[0])
    proxy = NetProxy("127.0.0.1", redis_port).start_in_thread()
    try:
        processes.env["DISPATCH_REDIS_URL"] = f"redis://127.0.0.1:{proxy.port}/0"
        gw = processes.gateway()
        edge = await Edge().connect(gw, EDGE)
        dash = await Dashboard().connect(gw, user_token("op", control=[EDGE]))
        warmup = command(edge_id=EDGE, channel="Warmup")
        await dash.send(warmup)
        await edge.command(0)  # the session is live and delivering
        proxy.drop_reply_after(scripts.DELIVER.sha.encode())
        body = command(edge_id=EDGE)
        cid = body["command_id"]
        await dash.send(body)
        frame = await edge.command(1)
        assert proxy.dropped_replies == 1 and proxy.reply_dropped.is_set()
        assert frame["command_id"] == cid and frame["delivery"] == 1
        await edge.ack(cid, "executed")
        await dash.status(cid, "executed")
        assert [f["command_id"] for f in edge.commands] == [warmup["command_id"], cid]
        assert dash.statuses(cid) == ["issued", "authorized", "routed", "executed"]
        await dash.close()
        await edge.close()
    finally:
        proxy.stop_thread()
