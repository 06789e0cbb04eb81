"""One command, one trace: spans of a real gateway and a real edge agent share a trace id.

The "dashboard" (a websockets client) sends a W3C `traceparent`; the gateway's admission
span is its child, and the edge's spans are children of the admission span, linked by
the `traceparent` the gateway put in the command. Both processes log JSON lines, and
the gateway's transition lines carry the trace id.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path
from typing import Any

import pytest
import websockets
from test_e2e import cli_output, start_edge, start_site
from test_metrics_live import run_command

from support import DEMO_EDGE, Processes, command, wait_until

pytestmark = pytest.mark.slow

GATEWAY_SPANS = {"dispatch.admit", "dispatch.deliver", "dispatch.ack"}
EDGE_SPANS = {"edge.validate", "edge.queue", "edge.modbus.write", "edge.ack"}


def spans(path: Path, trace_id: str) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line]
    return [s for s in lines if s["trace_id"] == trace_id]


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


async def test_one_command_yields_one_cross_process_trace(
    processes: Processes, tmp_path: Path
) -> None:
    traces = tmp_path / "traces.jsonl"
    processes.env.update(
        OTEL_TRACES_EXPORTER="file",
        DISPATCH_TRACES_FILE=str(traces),
        DISPATCH_LOG_FORMAT="json",
    )
    gw = processes.gateway()
    modbus_port, cred = start_site(processes, gw, tmp_path)
    start_edge(processes, gw, modbus_port, cred, tmp_path)
    token = cli_output(processes, "token", "--user", "user_456", "--can-control", DEMO_EDGE)
    trace_id, dashboard_span = secrets.token_hex(16), secrets.token_hex(8)
    body = command(traceparent=f"00-{trace_id}-{dashboard_span}-01")

    await run_command(gw, token, body)
    # A resend with another trace context is the same command, not a reused id.
    async with websockets.connect(
        f"{gw.ws}/ws/dashboard", additional_headers={"Authorization": f"Bearer {token}"}
    ) as ws:
        await ws.send(
            json.dumps(
                {**body, "traceparent": f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"}
            )
        )
        reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert reply["command_id"] == body["command_id"] and reply["status"] == "executed", reply

    def complete() -> list[dict[str, Any]] | None:
        found = spans(traces, trace_id)
        return found if {s["name"] for s in found} >= GATEWAY_SPANS | EDGE_SPANS else None

    found = wait_until(complete, 15, what="the gateway's and the edge's spans in the trace file")
    by_name = {s["name"]: s for s in found}
    admit = by_name["dispatch.admit"]
    assert admit["parent_span_id"] == dashboard_span
    assert admit["service"] == "dispatch-gateway"
    assert admit["attributes"]["command_id"] == body["command_id"]
    for name in EDGE_SPANS:
        assert by_name[name]["service"] == "dispatch-edge", name
        assert by_name[name]["parent_span_id"] == admit["span_id"], name
    acks = [s for s in found if s["name"] == "dispatch.ack"]
    assert {s["attributes"]["status"] for s in acks} == {"accepted", "executed"}
    for name in ("dispatch.deliver", "dispatch.ack"):
        assert by_name[name]["parent_span_id"] == admit["span_id"], name
    assert {s["service"] for s in found} == {"dispatch-gateway", "dispatch-edge"}

    gateway_log = next(p for p in processes.procs if p.name == "gateway").log()
    not_json = [line for line in gateway_log.splitlines() if not line.startswith("{")]
    assert not not_json, f"DISPATCH_LOG_FORMAT=json left plain lines: {not_json[:3]}"
    transitions = [
        line
        for line in json_lines(gateway_log)
        if line.get("logger") == "dispatch.transition"
        and line.get("command_id") == body["command_id"]
    ]
    assert [t["status"] for t in transitions] == [
        "issued",
        "authorized",
        "routed",
        "delivered",
        "executed",
    ]
    assert {t["trace_id"] for t in transitions} == {trace_id}
    edge_log = next(p for p in processes.procs if p.name == "edge").log()
    edge_transitions = [
        line
        for line in json_lines(edge_log)
        if line.get("event") == "command.transition" and line["command_id"] == body["command_id"]
    ]
    assert [t["status"] for t in edge_transitions] == ["accepted", "executing", "executed"]
    assert edge_transitions[-1]["trace_id"] == trace_id, edge_log[-2000:]
