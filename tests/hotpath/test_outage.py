"""A Redis outage of 6 s (private redis-server, AOF always, SIGTERM, restart): every
frame is still answered, and an ack that arrived during the outage is not lost."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hotpath_kit import Dashboard, Edge, enroll, start_redis

from support import Processes, command, free_port, http, user_token

EDGE = "hot_outage_edge"
OUTAGE_S = 6.0


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[tuple[int, Path, list[subprocess.Popen[bytes]]]]:
    port, data = free_port(), tmp_path / "redis"
    data.mkdir()
    servers: list[subprocess.Popen[bytes]] = []
    yield port, data, servers
    for server in servers:
        if server.poll() is None:
            server.kill()
            server.wait(10)


@pytest.mark.slow
async def test_redis_outage_answers_every_frame_and_keeps_the_edge_ack(
    processes: Processes,
    private_redis: tuple[int, Path, list[subprocess.Popen[bytes]]],
) -> None:
    port, data, servers = private_redis
    servers.append(start_redis(port, data))
    processes.env["DISPATCH_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
    processes.env["DISPATCH_ACK_TIMEOUT_MS"] = "60000"  # the outage must not decide it
    enroll(processes.env, EDGE)
    gw = processes.gateway()
    token = user_token("op", control=[EDGE])
    edge = await Edge().connect(gw, EDGE)
    dash = await Dashboard().connect(gw, token)
    try:
        body = command(edge_id=EDGE)
        cid = body["command_id"]
        await dash.send(body)
        await edge.command(0)
        seen = len(edge.frames)
        await edge.ack(cid, "accepted")
        assert (await edge.notice(cid, seen))["type"] == "ack_recorded"
        await dash.status(cid, "delivered")

        servers[0].send_signal(signal.SIGTERM)
        servers[0].wait(10)
        down_at = time.monotonic()
        # The device executed it while Redis was down: the ack cannot be recorded now.
        seen = len(edge.frames)
        await edge.ack(cid, "executed")
        notice = await edge.notice(cid, seen, timeout_s=5)
        assert notice["type"] == "ack_unrecorded" and notice["error"]["code"] == "unavailable"
        # A command sent now is answered `unavailable` after the documented wait.
        during = command(edge_id=EDGE)
        sent_at = time.monotonic()
        await dash.send(during)
        refused = await dash.status(during["command_id"], "rejected", timeout_s=5)
        assert refused["error"]["code"] == "unavailable"
        assert time.monotonic() - sent_at < 4.0
        # The HTTP intake says the same: 503 with the code, never a bare 500.
        code, _, reply = await asyncio.to_thread(
            http, "POST", f"{gw.http}/api/commands", token, command(edge_id=EDGE)
        )
        assert code == 503 and reply["error"]["code"] == "unavailable", (code, reply)

        await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_at)))  # the outage
        servers.append(start_redis(port, data))
        # The edge resends its ack until it is recorded (each try is answered).
        for _ in range(20):
            seen = len(edge.frames)
            await edge.ack(cid, "executed")
            notice = await edge.notice(cid, seen, timeout_s=5)
            if notice["type"] == "ack_recorded":
                break
            assert notice["type"] == "ack_unrecorded", notice
        assert notice == {"type": "ack_recorded", "command_id": cid, "status": "executed"}
        await dash.status(cid, "executed")
        status, _, view = http("GET", f"{gw.http}/api/commands/{cid}", token)
        assert status == 200 and view["status"] == "executed"
        assert "timed_out" not in [e["status"] for e in view["events"]]
        # The refused command may simply be sent again.
        await dash.send(during)
        await dash.status(during["command_id"], "issued", timeout_s=10)
    finally:
        await dash.close()
        await edge.close()
