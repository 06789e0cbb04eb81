"""The lifecycle metrics and fleet gauges of a real gateway, projector and edge agent."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import websockets
from obs_kit import scrape, value
from test_e2e import cli_output, start_edge, start_site

from support import DEMO_EDGE, Gateway, Processes, command, wait_until

pytestmark = pytest.mark.slow

FAST = {"DISPATCH_METRICS_INTERVAL_S": "0.2"}
STEPS = ("issued_routed", "routed_delivered", "delivered_executed", "issued_final")


async def run_command(gw: Gateway, token: str, body: dict[str, object]) -> None:
    async with websockets.connect(
        f"{gw.ws}/ws/dashboard", additional_headers={"Authorization": f"Bearer {token}"}
    ) as ws:
        await ws.send(json.dumps(body))
        while True:
            msg = json.loads(await asyncio.wait_for(ws.recv(), 20))
            if msg.get("command_id") == body["command_id"] and msg["status"] == "executed":
                return


def lag(gw: Gateway, name: str) -> float:
    return value(scrape(gw.http), name)


async def test_steps_move_and_projector_lag_rises_and_falls(
    processes: Processes, tmp_path: Path
) -> None:
    processes.env.update(FAST)
    gw = processes.gateway()
    other = processes.gateway()  # sees the same fleet: its copy must match, not add up
    projector = processes.dispatch("projector", "projector")
    modbus_port, cred = start_site(processes, gw, tmp_path)
    start_edge(processes, gw, modbus_port, cred, tmp_path)
    token = cli_output(processes, "token", "--user", "user_456", "--can-control", DEMO_EDGE)
    before = scrape(gw.http)
    labels = {"command_type": "setpoint", "priority": "emergency"}
    for step in STEPS:
        assert value(before, "dispatch_command_step_seconds_count", step=step, **labels) == 0

    await run_command(gw, token, command(priority="emergency"))

    def final_in(scraped: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> bool:
        return bool(
            value(scraped, "dispatch_command_step_seconds_count", step="issued_final", **labels)
        )

    def final_observed(at: Gateway) -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
        now = scrape(at.http)
        return now if final_in(now) else None

    after = wait_until(lambda: final_observed(gw), 10, what="the issued->final step to be observed")
    for step in STEPS:
        assert value(after, "dispatch_command_step_seconds_count", step=step, **labels) == 1, step
    assert value(after, "dispatch_command_finals_total", status="executed", **labels) == 1
    copy = wait_until(lambda: final_observed(other), 10, what="the other gateway's copy")
    for step in STEPS:
        assert value(copy, "dispatch_command_step_seconds_count", step=step, **labels) == 1
        assert value(copy, "dispatch_command_step_seconds_sum", step=step, **labels) == value(
            after, "dispatch_command_step_seconds_sum", step=step, **labels
        ), f"{step}: both gateways compute it from the same Redis timestamps"
    assert value(after, "dispatch_redis_up") == 1
    wait_until(lambda: lag(gw, "dispatch_edges_online") == 1, 10, what="one edge online")
    wait_until(lambda: lag(gw, "dispatch_postgres_up") == 1, 10, what="PostgreSQL reachable")
    # The projector stores everything: no lag once it caught up.
    wait_until(
        lambda: lag(gw, "dispatch_projector_lag_entries") == 0, 45, what="the projector to catch up"
    )

    projector.stop()
    await run_command(gw, token, command())
    wait_until(
        lambda: lag(gw, "dispatch_projector_lag_entries") >= 5,
        10,
        what="projector lag (entries) to rise while it is stopped",
    )
    wait_until(
        lambda: lag(gw, "dispatch_projector_lag_seconds") > 0.5,
        10,
        what="projector lag (seconds) to rise while it is stopped",
    )

    processes.dispatch("projector", "projector")
    wait_until(
        lambda: (
            lag(gw, "dispatch_projector_lag_entries") == 0
            and lag(gw, "dispatch_projector_lag_seconds") == 0
        ),
        45,
        what="projector lag to fall after the projector restarts",
    )
