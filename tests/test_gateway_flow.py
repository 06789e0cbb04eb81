"""Commands through real uvicorn gateways, with WebSocket clients as dashboard and edge."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import websockets
from websockets.exceptions import InvalidStatus

from support import Gateway, Processes, command, edge_token, http, user_token

EDGE = "edge_flow_1"


async def recv_json(ws: Any, timeout_s: float = 10) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout_s))


_BACKLOG: dict[int, list[dict[str, Any]]] = {}


async def statuses_until(ws: Any, command_id: str, final: str, timeout_s: float = 15) -> list[str]:
    """Statuses of one command until `final`; other commands' messages wait their turn."""
    backlog = _BACKLOG.setdefault(id(ws), [])
    seen: list[str] = []
    while final not in seen:
        mine = next((m for m in backlog if m.get("command_id") == command_id), None)
        if mine is not None:
            backlog.remove(mine)
        else:
            msg = await recv_json(ws, timeout_s)
            if msg.get("command_id") != command_id:
                backlog.append(msg)
                continue
            mine = msg
        seen.append(mine["status"])
    return seen


def dashboard(gw: Gateway, token: str) -> Any:
    # Unbounded client queue: a test that ignores some updates must still close at once
    # (with a full queue the client stops reading and never sees the close frame).
    return websockets.connect(
        f"{gw.ws}/ws/dashboard",
        additional_headers={"Authorization": f"Bearer {token}"},
        max_queue=None,
    )


def edge(gw: Gateway, edge_id: str = EDGE, token: str | None = None) -> Any:
    return websockets.connect(
        f"{gw.ws}/ws/edge/{edge_id}",
        additional_headers={"Authorization": f"Bearer {token or edge_token(edge_id)}"},
    )


async def until_offline(gw: Gateway, token: str, edge_id: str = EDGE) -> None:
    """Until the gateway has closed the edge's session and cleared its presence: a client
    that closed its socket is still routed to until then (the gateway notices the close
    after the client has moved on)."""
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        _, _, listing = await asyncio.to_thread(http, "GET", f"{gw.http}/api/edges", token)
        online = {e["edge_id"]: e["online"] for e in listing["edges"]}
        if not online.get(edge_id, False):
            return
        assert asyncio.get_running_loop().time() < deadline, f"{edge_id} still online: {online}"
        await asyncio.sleep(0.02)


async def run_edge(ws: Any, count: int) -> list[dict[str, Any]]:
    """A minimal edge: accept and execute `count` commands."""
    got: list[dict[str, Any]] = []
    while len(got) < count:
        msg = await recv_json(ws)
        if "type" in msg:
            continue  # a notice about an ack (ack_recorded), not a command
        got.append(msg)
        await ws.send(json.dumps({"command_id": msg["command_id"], "status": "accepted"}))
        await ws.send(
            json.dumps(
                {
                    "command_id": msg["command_id"],
                    "status": "executed",
                    "executed_at": "2026-02-15T14:30:01.050Z",
                    "error": None,
                }
            )
        )
    return got


@pytest.fixture
def gateway(processes: Processes) -> Gateway:
    processes.dispatch("token", "token", "--edge", EDGE).popen.wait(20)
    return processes.gateway()


async def test_online_edge_full_lifecycle_reaches_the_dashboard(gateway: Gateway) -> None:
    token = user_token(control=[EDGE])
    async with edge(gateway) as e, dashboard(gateway, token) as d:
        await asyncio.sleep(0.2)  # let the edge session register its presence
        body = command(edge_id=EDGE)
        await d.send(json.dumps(body))
        edge_task = asyncio.create_task(run_edge(e, 1))
        seen = await statuses_until(d, body["command_id"], "executed")
        assert seen == ["issued", "authorized", "routed", "delivered", "executed"]
        [received] = await edge_task
        assert received["value"] == 50000 and received["priority"] == "normal"
        assert received["target"] == body["target"] and received["delivery"] == 1
    status, _, view = http("GET", f"{gateway.http}/api/commands/{body['command_id']}", token)
    assert status == 200 and view["status"] == "executed"
    assert [ev["status"] for ev in view["events"]] == seen
    assert all(ev["at"].endswith("Z") for ev in view["events"])


async def test_offline_edge_is_queued_and_served_on_connect(gateway: Gateway) -> None:
    token = user_token(control=[EDGE])
    async with dashboard(gateway, token) as d:
        first, second = (
            command(edge_id=EDGE, channel="MinSoc", value=10),
            command(edge_id=EDGE, channel="Other", value=20),
        )
        for body in (first, second):
            await d.send(json.dumps(body))
            assert await statuses_until(d, body["command_id"], "queued") == [
                "issued",
                "authorized",
                "queued",
            ]
        async with edge(gateway) as e:
            got = await run_edge(e, 2)
            assert [m["command_id"] for m in got] == [first["command_id"], second["command_id"]]
            for body in (first, second):
                assert await statuses_until(d, body["command_id"], "executed") == [
                    "routed",
                    "delivered",
                    "executed",
                ]


async def test_bad_frames_are_rejected_and_the_connection_stays_usable(gateway: Gateway) -> None:
    token = user_token(control=[EDGE])
    async with dashboard(gateway, token) as d:
        await d.send("{not json")
        reply = await recv_json(d)
        assert reply["status"] == "rejected" and reply["error"]["code"] == "malformed_json"
        await d.send(json.dumps(command(edge_id=EDGE, value="fifty")))
        reply = await recv_json(d)
        assert reply["error"]["code"] == "invalid_command" and "value" in reply["error"]["message"]
        await d.send(json.dumps(command(edge_id="never_enrolled")))
        assert (await recv_json(d))["error"]["code"] == "unknown_edge"
        forbidden = user_token("user_9", control=["other_edge"])
        async with dashboard(gateway, forbidden) as d2:
            await d2.send(json.dumps(command(edge_id=EDGE)))
            assert (await recv_json(d2))["error"]["code"] == "forbidden"
        body = command(edge_id=EDGE)
        await d.send(json.dumps(body))
        assert (await statuses_until(d, body["command_id"], "queued"))[-1] == "queued"
        await d.send(json.dumps({**body, "value": 1}))
        dup = await recv_json(d)
        assert dup["error"]["code"] == "duplicate" and dup["command_id"] == body["command_id"]
        await d.send(json.dumps(body))  # same body again: its current status, nothing new
        assert (await recv_json(d))["status"] == "queued"
        await d.send("x" * (70 * 1024))
        assert (await recv_json(d))["error"]["code"] == "too_large"


async def test_handshakes_without_valid_credentials_are_refused(gateway: Gateway) -> None:
    for headers in (
        {},
        {"Authorization": "Bearer nonsense"},
        {"Authorization": f"Bearer {edge_token(EDGE)}"},
    ):
        with pytest.raises(InvalidStatus) as refused:
            async with websockets.connect(f"{gateway.ws}/ws/dashboard", additional_headers=headers):
                pass
        assert refused.value.response.status_code == 401
    with pytest.raises(InvalidStatus) as wrong_edge:
        async with edge(gateway, EDGE, token=edge_token("another_edge")):
            pass
    assert wrong_edge.value.response.status_code == 401


def test_post_api_commands_for_services(gateway: Gateway) -> None:
    token = user_token("scheduler", control=[EDGE])
    body = command(edge_id=EDGE, source="optimizer")
    status, _, reply = http("POST", f"{gateway.http}/api/commands", token, body)
    assert (
        status == 202 and reply["command_id"] == body["command_id"] and reply["status"] == "queued"
    )
    status, _, reply = http("POST", f"{gateway.http}/api/commands", token, body)
    assert status == 200 and reply["status"] == "queued"
    status, _, reply = http("POST", f"{gateway.http}/api/commands", token, {**body, "value": 3})
    assert status == 409 and reply["error"]["code"] == "duplicate"
    status, _, reply = http("POST", f"{gateway.http}/api/commands", None, body)
    assert status == 401 and reply["error"]["code"] == "unauthenticated"
    status, _, reply = http("POST", f"{gateway.http}/api/commands", token, raw=b'{"command_id": ')
    assert status == 400 and reply["error"]["code"] == "malformed_json"
    status, _, reply = http("GET", f"{gateway.http}/api/commands/nope", token)
    assert status == 404


async def test_two_gateways_dashboard_on_one_edge_on_the_other(processes: Processes) -> None:
    processes.dispatch("token", "token", "--edge", EDGE).popen.wait(20)
    gw_a, gw_b = processes.gateway(gateway_id="gw-a"), processes.gateway(gateway_id="gw-b")
    token = user_token(control=[EDGE])
    async with edge(gw_b) as e, dashboard(gw_a, token) as d:
        await asyncio.sleep(0.2)
        body = command(edge_id=EDGE)
        await d.send(json.dumps(body))
        edge_task = asyncio.create_task(run_edge(e, 1))
        seen = await statuses_until(d, body["command_id"], "executed")
        assert seen == ["issued", "authorized", "routed", "delivered", "executed"]
        await edge_task
    status, _, view = http("GET", f"{gw_b.http}/api/commands/{body['command_id']}", token)
    routed = [ev for ev in view["events"] if ev["status"] == "routed"]
    assert status == 200 and routed[0]["gateway"] == "gw-b"


def test_health_ready_and_metrics(gateway: Gateway) -> None:
    status, _, body = http("GET", f"{gateway.http}/healthz")
    assert status == 200 and body["status"] == "ok"
    status, _, body = http("GET", f"{gateway.http}/readyz")
    assert status == 200 and body["checks"]["redis"]["ok"] and body["checks"]["postgres"]["ok"]
    status, _headers, text = http("GET", f"{gateway.http}/metrics")
    assert status == 200 and "dispatch_edges_connected" in text
    status, _, page = http("GET", f"{gateway.http}/")
    assert status == 200 and "Command Dispatch" in page


async def test_dashboards_only_see_edges_they_may_view(processes: Processes) -> None:
    for edge_id in (EDGE, "edge_flow_2"):
        processes.dispatch("token", "token", "--edge", edge_id).popen.wait(20)
    gw = processes.gateway()
    operator = user_token("op", control=[EDGE, "edge_flow_2"])
    watcher = user_token("watcher", view=["edge_flow_2"])
    async with dashboard(gw, operator) as d, dashboard(gw, watcher) as w:
        hidden, shown = command(edge_id=EDGE), command(edge_id="edge_flow_2")
        await d.send(json.dumps(hidden))
        await d.send(json.dumps(shown))
        assert (await statuses_until(d, shown["command_id"], "queued"))[-1] == "queued"
        seen = [await recv_json(w) for _ in range(3)]
        assert {m["command_id"] for m in seen} == {shown["command_id"]}
        with pytest.raises(TimeoutError):
            await recv_json(w, 0.5)


async def test_one_connection_is_pipelined_but_admitted_in_arrival_order(gateway: Gateway) -> None:
    token = user_token(control=[EDGE])
    async with edge(gateway) as e, dashboard(gateway, token) as d:
        await asyncio.sleep(0.2)
        bodies = [command(edge_id=EDGE, channel=f"Ch{i % 3}", value=i) for i in range(60)]
        for body in bodies:  # no waiting between frames: many are in flight at once
            await d.send(json.dumps(body))
        got = await run_edge(e, len(bodies))
        assert [m["command_id"] for m in got] == [b["command_id"] for b in bodies]
    await until_offline(gateway, token)
    async with dashboard(gateway, token) as d:
        # Offline now: the last of the queued setpoints for one channel must win.
        queued = [command(edge_id=EDGE, channel="Same", value=v) for v in range(30)]
        for body in queued:
            await d.send(json.dumps(body))
        await statuses_until(d, queued[-1]["command_id"], "queued")
    async with edge(gateway) as e:
        [only] = await run_edge(e, 1)
        assert only["command_id"] == queued[-1]["command_id"] and only["value"] == 29
