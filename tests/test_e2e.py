"""End to end with real processes: uvicorn gateway, projector, simulated BMS, edge agent.

The dashboard is a `websockets` client sending the specification's command; the proof
of effect is a Modbus client reading the BMS registers, and the projected audit row.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
import websockets
from pymodbus.client import AsyncModbusTcpClient

from support import (
    DEMO_EDGE,
    Gateway,
    Processes,
    command,
    free_port,
    http,
    projected_status,
    wait_until,
)

pytestmark = pytest.mark.slow


def cli_output(processes: Processes, *args: str) -> str:
    proc = processes.dispatch("cli", *args)
    assert proc.popen.wait(30) == 0, proc.log()
    return proc.log().strip().splitlines()[-1]


def edges_connected(gw: Gateway) -> int:
    _, _, text = http("GET", f"{gw.http}/metrics")
    match = re.search(r"^dispatch_edges_connected (\S+)$", text, re.M)
    return int(float(match.group(1))) if match else 0


async def read_power(port: int) -> int:
    client = AsyncModbusTcpClient("127.0.0.1", port=port)
    await client.connect()
    try:
        regs = await client.read_holding_registers(0, count=2, device_id=1)
        assert not regs.isError(), regs
        return int(client.convert_from_registers(regs.registers, client.DATATYPE.INT32))
    finally:
        client.close()


async def statuses(ws: websockets.ClientConnection, command_id: str, final: str) -> list[str]:
    seen: list[str] = []
    while final not in seen:
        msg = json.loads(await asyncio.wait_for(ws.recv(), 20))
        if msg.get("command_id") == command_id:
            seen.append(msg["status"])
            assert msg["at"].endswith("Z")
    return seen


def start_site(processes: Processes, gw: Gateway, tmp_path: Path) -> tuple[int, str]:
    modbus_port = free_port()
    processes.dispatch("simulator", "simulate-device", "--port", str(modbus_port))
    edge_cred = cli_output(processes, "token", "--edge", DEMO_EDGE)
    return modbus_port, edge_cred


def start_edge(
    processes: Processes, gw: Gateway, modbus_port: int, cred: str, tmp_path: Path
) -> None:
    processes.dispatch(
        "edge",
        "edge",
        "--edge-id",
        DEMO_EDGE,
        "--gateway",
        gw.ws,
        "--token",
        cred,
        "--modbus",
        f"bms_main=127.0.0.1:{modbus_port}",
        "--state-dir",
        str(tmp_path / "edge"),
    )
    wait_until(lambda: edges_connected(gw) == 1, 20, what="the edge agent to connect")


async def test_spec_command_reaches_the_device_and_the_audit(
    processes: Processes, tmp_path: Path, namespace: str
) -> None:
    gw = processes.gateway()
    processes.dispatch("projector", "projector")
    modbus_port, cred = start_site(processes, gw, tmp_path)
    start_edge(processes, gw, modbus_port, cred, tmp_path)
    token = cli_output(processes, "token", "--user", "user_456", "--can-control", DEMO_EDGE)
    body = command()  # the specification's example: SetActivePower = 50000 W on bms_main
    async with websockets.connect(
        f"{gw.ws}/ws/dashboard", additional_headers={"Authorization": f"Bearer {token}"}
    ) as ws:
        await ws.send(json.dumps(body))
        seen = await statuses(ws, body["command_id"], "executed")
    assert seen == ["issued", "authorized", "routed", "delivered", "executed"]
    assert await read_power(modbus_port) == 50000
    wait_until(
        lambda: projected_status(namespace, body["command_id"]) == "executed",
        20,
        what="the projector to record the executed command",
    )
    status, _, view = http("GET", f"{gw.http}/api/commands/{body['command_id']}", token)
    assert status == 200 and view["status"] == "executed"
    status, _, listing = http("GET", f"{gw.http}/api/commands?edge_id={DEMO_EDGE}", token)
    assert status == 200 and [c["command_id"] for c in listing["commands"]] == [body["command_id"]]


async def test_offline_edge_gets_the_command_when_it_connects(
    processes: Processes, tmp_path: Path
) -> None:
    gw = processes.gateway()
    modbus_port, cred = start_site(processes, gw, tmp_path)
    token = cli_output(processes, "token", "--user", "user_456", "--can-control", DEMO_EDGE)
    body = command(value=-25000, priority="emergency")
    async with websockets.connect(
        f"{gw.ws}/ws/dashboard", additional_headers={"Authorization": f"Bearer {token}"}
    ) as ws:
        await ws.send(json.dumps(body))
        assert await statuses(ws, body["command_id"], "queued") == [
            "issued",
            "authorized",
            "queued",
        ]
        start_edge(processes, gw, modbus_port, cred, tmp_path)
        assert await statuses(ws, body["command_id"], "executed") == [
            "routed",
            "delivered",
            "executed",
        ]
    assert await read_power(modbus_port) == -25000
