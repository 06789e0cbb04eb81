"""The offline queue end to end: real gateway, projector, edge agent and simulated BMS.

The edge here is the real `dispatch edge` agent writing to `dispatch simulate-device`
over Modbus TCP; its durable journal tells how often it wrote each command.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
import websockets
from delivery_kit import (
    DEMO_EDGE,
    DemoSite,
    ScriptedEdge,
    enroll,
    events,
    post,
    projector,
    view,
    wait_status,
)

from support import Gateway, Processes, command, http, user_token

pytestmark = pytest.mark.slow


@pytest.fixture
def gateway(processes: Processes) -> Gateway:
    enroll(processes.env, DEMO_EDGE, "edge_plain")
    return processes.gateway(gateway_id="gw-a")


@pytest.fixture
def site(processes: Processes, tmp_path: Path) -> DemoSite:
    return DemoSite(processes, tmp_path / "edge-state").start_device()


OPERATOR = user_token("op_1", control=[DEMO_EDGE, "edge_plain"])


def test_offline_edge_gets_both_queued_commands_in_order_on_reconnect(
    gateway: Gateway, site: DemoSite
) -> None:
    first = command(edge_id=DEMO_EDGE, value=42_000)
    second = command(edge_id=DEMO_EDGE, channel="MinSoc", value=20, unit="%")
    for body in (first, second):
        assert post(gateway, OPERATOR, body)["status"] == "queued"
    site.start_agent(gateway)
    done = [wait_status(gateway, OPERATOR, b["command_id"], "executed") for b in (first, second)]
    for body in done:
        assert [e["status"] for e in body["events"]] == [
            "issued",
            "authorized",
            "queued",
            "routed",
            "delivered",
            "executed",
        ]
    assert events(done[0], "routed")[0]["at"] <= events(done[1], "routed")[0]["at"]
    executing = [cid for cid, event in site.journal() if event == "executing"]
    assert executing == [first["command_id"], second["command_id"]]  # in order, once each
    assert asyncio.run(site.register_value()) == 42_000


def test_command_expiring_while_offline_is_expired_by_a_verdict_and_never_executed(
    processes: Processes, gateway: Gateway, site: DemoSite
) -> None:
    projector(processes)
    stale = command(edge_id=DEMO_EDGE, value=11_000, expiry_sec=2)
    queued_at = time.monotonic()
    post(gateway, OPERATOR, stale)
    body = wait_status(gateway, OPERATOR, stale["command_id"], "expired", timeout_s=10)
    [expired] = events(body, "expired")
    # The verdict (run by every gateway and projector), not a trim or a delivery.
    assert expired["actor"].startswith(("projector:", "gateway:")), expired
    assert expired["error"]["code"] == "expired"
    time.sleep(max(0.0, 4 - (time.monotonic() - queued_at)))  # offline for 4 s in all
    site.start_agent(gateway)
    fresh = command(edge_id=DEMO_EDGE, value=12_000)
    post(gateway, OPERATOR, fresh)
    wait_status(gateway, OPERATOR, fresh["command_id"], "executed")
    assert stale["command_id"] not in {cid for cid, _ in site.journal()}  # never sent
    assert view(gateway, OPERATOR, stale["command_id"])["status"] == "expired"
    assert asyncio.run(site.register_value()) == 12_000


def test_six_queued_setpoints_on_one_channel_make_one_write_and_five_superseded(
    gateway: Gateway, site: DemoSite
) -> None:
    bodies = [command(edge_id=DEMO_EDGE, value=v * 1000) for v in range(1, 7)]
    for body in bodies:
        post(gateway, OPERATOR, body)
    for body in bodies[:-1]:
        older = wait_status(gateway, OPERATOR, body["command_id"], "failed")
        assert events(older, "failed")[0]["error"]["code"] == "superseded"
    site.start_agent(gateway)
    wait_status(gateway, OPERATOR, bodies[-1]["command_id"], "executed")
    assert site.executions() == {bodies[-1]["command_id"]: 1}  # one write
    assert {cid for cid, _ in site.journal()} == {bodies[-1]["command_id"]}
    assert asyncio.run(site.register_value()) == 6000
    for body in bodies[:-1]:
        assert view(gateway, OPERATOR, body["command_id"])["status"] == "failed"


def test_resending_a_command_id_returns_its_status_and_appends_nothing(gateway: Gateway) -> None:
    body = command(edge_id="edge_plain")
    assert post(gateway, OPERATOR, body)["status"] == "queued"
    before = view(gateway, OPERATOR, body["command_id"])
    status, _, again = http("POST", f"{gateway.http}/api/commands", OPERATOR, body)
    assert status == 200 and again["status"] == "queued"
    assert view(gateway, OPERATOR, body["command_id"])["events"] == before["events"]
    status, _, dup = http("POST", f"{gateway.http}/api/commands", OPERATOR, {**body, "value": 1})
    assert status == 409 and dup["error"]["code"] == "duplicate"
    assert view(gateway, OPERATOR, body["command_id"])["events"] == before["events"]


async def _recv(ws: Any, command_id: str, *statuses: str) -> dict[str, Any]:
    """The next message about `command_id` with one of `statuses`."""
    async with asyncio.timeout(10):
        while True:
            msg = json.loads(await ws.recv())
            if msg.get("command_id") == command_id and msg["status"] in statuses:
                return msg


async def test_cancel_from_the_dashboard_websocket_and_a_cancelled_command_is_never_sent(
    gateway: Gateway, tmp_path: Path
) -> None:
    headers = {"Authorization": f"Bearer {OPERATOR}"}
    async with websockets.connect(f"{gateway.ws}/ws/dashboard", additional_headers=headers) as d:
        doomed = command(edge_id="edge_plain", channel="A")
        kept = command(edge_id="edge_plain", channel="B")
        for body in (doomed, kept):
            await d.send(json.dumps(body))
            await _recv(d, body["command_id"], "queued")
        await d.send(json.dumps({"type": "cancel", "command_id": doomed["command_id"]}))
        answer = await _recv(d, doomed["command_id"], "cancelled")
        assert answer["edge_id"] == "edge_plain" and answer["at"].endswith("Z")
        await d.send(json.dumps({"type": "cancel", "command_id": doomed["command_id"]}))
        # Three frames, in any order: the first cancel's answer, the lifecycle status it
        # caused (error code `cancelled`) and the refusal of the second cancel.
        codes = [answer.get("error", {}).get("code")]
        while len(codes) < 3:
            again = await _recv(d, doomed["command_id"], "cancelled")
            codes.append(again.get("error", {}).get("code"))
        assert sorted(codes, key=str) == sorted([None, "cancelled", "not_cancellable"], key=str)
        await d.send(json.dumps({"type": "cancel", "command_id": "cmd_nobody_sent"}))
        unknown = await _recv(d, "cmd_nobody_sent", "rejected")
        assert unknown["error"]["code"] == "unknown_command"
        await d.send(json.dumps({"type": "cancel"}))
        invalid = json.loads(await asyncio.wait_for(d.recv(), 10))
        assert invalid["status"] == "rejected" and invalid["error"]["code"] == "invalid_command"
        viewer = user_token("viewer", view=["edge_plain"])
        async with websockets.connect(
            f"{gateway.ws}/ws/dashboard", additional_headers={"Authorization": f"Bearer {viewer}"}
        ) as d2:
            await d2.send(json.dumps({"type": "cancel", "command_id": kept["command_id"]}))
            refused = await _recv(d2, kept["command_id"], "rejected")
            assert refused["error"]["code"] == "forbidden"
        edge = await ScriptedEdge("edge_plain", tmp_path / "record.json").connect(gateway)
        try:
            await _recv(d, kept["command_id"], "executed")
        finally:
            await edge.close()
        assert [f["command_id"] for f in edge.frames] == [kept["command_id"]]
        # After delivery a cancellation is refused and the answer tells the true status.
        status, _, late = http(
            "POST", f"{gateway.http}/api/commands/{kept['command_id']}/cancel", OPERATOR
        )
        assert status == 409 and late["status"] == "executed"
        assert late["error"]["code"] == "not_cancellable"
    body = view(gateway, OPERATOR, doomed["command_id"])
    assert [e["status"] for e in body["events"]][-1] == "cancelled"
    assert events(body, "cancelled")[0]["actor"] == "user:op_1"
