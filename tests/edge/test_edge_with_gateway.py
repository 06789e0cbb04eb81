"""End to end with real processes: the uvicorn gateway, `dispatch edge --metrics-port`,
the simulated BMS; a dashboard sends a command and the edge's own /metrics are scraped."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
import websockets

from edge_testkit import scrape
from support import DEMO_EDGE, Processes, command, free_port, http, wait_until

pytestmark = pytest.mark.slow


def last_line(procs: Processes, *args: str) -> str:
    proc = procs.dispatch("cli", *args)
    assert proc.popen.wait(30) == 0, proc.log()
    return proc.log().strip().splitlines()[-1]


async def test_a_command_through_the_real_gateway_moves_the_edge_metrics(
    env: dict[str, str], tmp_path: Path
) -> None:
    procs = Processes(env, tmp_path)
    try:
        gw = procs.gateway()
        modbus_port, metrics_port = free_port(), free_port()
        procs.dispatch("simulator", "simulate-device", "--port", str(modbus_port))
        cred = last_line(procs, "token", "--edge", DEMO_EDGE)
        edge = procs.dispatch(
            "edge", "edge", "--edge-id", DEMO_EDGE, "--gateway", gw.ws, "--token", cred,
            "--modbus", f"bms_main=127.0.0.1:{modbus_port}", "--state-dir",
            str(tmp_path / "edge"), "--metrics-port", str(metrics_port),
        )  # fmt: skip

        def connected() -> bool:
            _, _, text = http("GET", f"{gw.http}/metrics")
            return re.search(r"^dispatch_edges_connected 1(\.0)?$", text, re.M) is not None

        wait_until(connected, 20, what="the edge agent to connect")
        before = await asyncio.to_thread(scrape, metrics_port)
        token = last_line(procs, "token", "--user", "user_456", "--can-control", DEMO_EDGE)
        body = command(value=1500)
        async with websockets.connect(
            f"{gw.ws}/ws/dashboard", additional_headers={"Authorization": f"Bearer {token}"}
        ) as ws:
            await ws.send(json.dumps(body))
            async with asyncio.timeout(20):
                while True:
                    msg = json.loads(await ws.recv())
                    if msg.get("command_id") == body["command_id"] and msg.get("status") in (
                        "executed", "failed", "rejected", "timed_out",
                    ):  # fmt: skip
                        break
        assert msg["status"] == "executed", msg
        after = await asyncio.to_thread(scrape, metrics_port)
        write = (
            "dispatch_edge_modbus_seconds_count",
            (("device", "bms_main"), ("operation", "write")),
        )
        assert after[write] == before.get(write, 0) + 1
        commits = ("dispatch_edge_journal_commit_seconds_count", ())
        assert after[commits] >= before[commits] + 2  # before and after the device write

        def settled() -> bool:  # every ack sent (and, with a newer gateway, recorded)
            return scrape(metrics_port)[("dispatch_edge_acks_awaiting_recording", ())] == 0

        wait_until(settled, 10, what="the edge's acks to be forwarded")
        assert "edge.frame.unanswerable" not in edge.log()
    finally:
        procs.stop_all()
