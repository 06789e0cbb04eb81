"""`dispatch replay`: a recorded incident re-run against a sandboxed simulated edge."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import websockets

from dispatch.replay import Outcome, Recorded, schedule
from ledger.keys import Keys
from schemas.commands import CommandType, EdgeCommand, Target

from support import (
    DEMO_EDGE,
    REDIS_URL,
    Gateway,
    Processes,
    command,
    edge_token,
    free_port,
    http,
    projected_status,
    user_token,
    wait_until,
)


def iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def status_of(gw: Gateway, token: str, command_id: str) -> str:
    code, _, body = http("GET", f"{gw.http}/api/commands/{command_id}", token)
    return str(body["status"]) if code == 200 else ""


def send(gw: Gateway, token: str, value: int) -> str:
    body = command(value=value)
    code, _, reply = http("POST", f"{gw.http}/api/commands", token, body)
    assert code == 202, reply
    return str(body["command_id"])


def live_site(processes: Processes, tmp_path: Path) -> Gateway:
    """The recorded system: gateway, simulated BMS, real edge agent."""
    gw = processes.gateway()
    port = free_port()
    processes.dispatch("simulator", "simulate-device", "--port", str(port))
    cred = processes.dispatch("token", "token", "--edge", DEMO_EDGE)
    assert cred.popen.wait(20) == 0
    processes.dispatch(
        "edge",
        "edge",
        "--edge-id",
        DEMO_EDGE,
        "--gateway",
        gw.ws,
        "--token",
        cred.log().strip().splitlines()[-1],
        "--modbus",
        f"bms_main=127.0.0.1:{port}",
        "--state-dir",
        str(tmp_path / "live-edge"),
    )
    client = redis.Redis.from_url(REDIS_URL)
    wait_until(
        lambda: any(
            client.scan_iter(match=f"{processes.env['DISPATCH_NAMESPACE']}:*online:{DEMO_EDGE}")
        ),
        30,
        what="the live edge agent to connect",
    )
    return gw


def run_replay(processes: Processes, *args: str) -> tuple[int, dict[str, Any], str]:
    proc = processes.dispatch("replay", "replay", "--json", *args)
    code = proc.popen.wait(120)
    out = proc.log()
    line = next((ln for ln in out.splitlines() if ln.startswith("{")), "{}")
    return code, json.loads(line), out


def log_lengths(namespace: str) -> dict[bytes, int]:
    client = redis.Redis.from_url(REDIS_URL)
    return {k: client.xlen(k) for k in client.scan_iter(match=f"{namespace}:*:log")}


def leftover(sandbox: str) -> list[bytes]:
    return list(redis.Redis.from_url(REDIS_URL).scan_iter(match=f"{sandbox}:*"))


@pytest.mark.slow
async def test_replay_reproduces_a_rejected_then_corrected_setpoint(
    processes: Processes, tmp_path: Path, namespace: str
) -> None:
    gw = live_site(processes, tmp_path)
    token = user_token(control=[DEMO_EDGE])
    start = datetime.now(UTC) - timedelta(seconds=1)
    too_big = send(gw, token, 150_000)  # beyond the channel's 100 kW limit
    wait_until(lambda: status_of(gw, token, too_big) == "rejected", 20, what="the edge to refuse")
    await asyncio.sleep(1.5)
    corrected = send(gw, token, 50_000)
    wait_until(lambda: status_of(gw, token, corrected) == "executed", 20, what="the execution")
    end = datetime.now(UTC) + timedelta(seconds=1)
    before = log_lengths(namespace)

    window = ("--edge", DEMO_EDGE, "--from", iso(start), "--to", iso(end), "--speed", "2")
    code, report, out = run_replay(processes, *window)
    assert code == 0, out
    assert [c["command_id"] for c in report["commands"]] == [too_big, corrected]
    assert [c["recorded"] for c in report["commands"]] == [
        {"status": "rejected", "error_code": "out_of_range"},
        {"status": "executed", "error_code": None},
    ]
    assert all(c["same"] for c in report["commands"]) and report["different"] == 0
    assert report["sandbox"].startswith("replay-") and not leftover(report["sandbox"])

    # Deterministic: the same window gives the same outcomes again, in a new sandbox.
    code2, again, out2 = run_replay(processes, *window)
    assert code2 == 0, out2
    assert [c["replayed"] for c in again["commands"]] == [c["replayed"] for c in report["commands"]]
    assert again["sandbox"] != report["sandbox"] and not leftover(again["sandbox"])
    # The live streams were only read.
    assert log_lengths(namespace) == before

    assert report["source"] == "ledger"

    # Weeks later retention has trimmed the ledger's log: the audit tables hold the window.
    processes.dispatch("projector", "projector")
    wait_until(
        lambda: projected_status(namespace, corrected) == "executed", 30, what="the projection"
    )
    client = redis.Redis.from_url(REDIS_URL)
    keys = Keys(namespace, 4)
    log_key = keys.log(keys.partition(DEMO_EDGE))
    client.xtrim(log_key, minid=f"{int(time.time() * 1000)}-0")
    assert client.xlen(log_key) == 0
    code3, late, out3 = run_replay(processes, *window)
    assert code3 == 0, out3
    assert late["source"] == "audit tables"
    assert [c["recorded"] for c in late["commands"]] == [c["recorded"] for c in report["commands"]]
    assert [c["replayed"] for c in late["commands"]] == [c["replayed"] for c in report["commands"]]

    # The human-readable form: side by side, one line per command.
    text = processes.dispatch("replay-text", "replay", *window)
    assert text.popen.wait(120) == 0
    lines = text.log().splitlines()
    assert any(
        too_big in ln and ln.count("rejected (out_of_range)") == 2 and ln.endswith("=")
        for ln in lines
    )
    assert any("2 of 2 commands replayed with the recorded outcome" in ln for ln in lines)


@pytest.mark.slow
async def test_replay_shows_where_outcomes_differ(
    processes: Processes, tmp_path: Path, namespace: str
) -> None:
    """A faulty edge executed an out-of-range setpoint; the reference agent refuses it."""
    gw = processes.gateway()
    assert processes.dispatch("enroll", "token", "--edge", DEMO_EDGE).popen.wait(20) == 0
    token = user_token(control=[DEMO_EDGE])
    start = datetime.now(UTC) - timedelta(seconds=1)
    async with websockets.connect(
        f"{gw.ws}/ws/edge/{DEMO_EDGE}",
        additional_headers={"Authorization": f"Bearer {edge_token(DEMO_EDGE)}"},
    ) as edge:
        await asyncio.sleep(0.3)
        bad = send(gw, token, 150_000)
        msg = json.loads(await asyncio.wait_for(edge.recv(), 10))
        assert msg["command_id"] == bad
        for status in ("accepted", "executed"):  # no limit check: the incident
            await edge.send(json.dumps({"command_id": bad, "status": status, "error": None}))
        wait_until(lambda: status_of(gw, token, bad) == "executed", 20, what="the faulty ack")
    end = datetime.now(UTC) + timedelta(seconds=1)
    code, report, out = run_replay(
        processes, "--edge", DEMO_EDGE, "--from", iso(start), "--to", iso(end)
    )
    assert code == 1, out
    [row] = report["commands"]
    assert row["recorded"] == {"status": "executed", "error_code": None}
    assert row["replayed"] == {"status": "rejected", "error_code": "out_of_range"}
    assert not row["same"] and report["different"] == 1


def test_replay_of_an_empty_window_says_so(processes: Processes) -> None:
    proc = processes.dispatch(
        "replay",
        "replay",
        "--edge",
        "nowhere",
        "--from",
        "2020-01-01T00:00:00Z",
        "--to",
        "2020-01-01T01:00:00Z",
    )
    assert proc.popen.wait(30) == 2
    assert "no commands for edge 'nowhere' were issued between" in proc.log()


def test_schedule_keeps_spacing_and_age_on_arrival() -> None:
    def recorded(cid: str, issued_ms: int, sent: datetime) -> Recorded:
        cmd = EdgeCommand(
            command_id=cid,
            command_type=CommandType.SETPOINT,
            target=Target(edge_id="e", device_id="bms_main", channel="SetActivePower"),
            value=1,
            unit="W",
            expiry_sec=30,
            source="u",
            timestamp=sent,
            priority="normal",
            expires_at=sent + timedelta(seconds=30),
        )
        return Recorded(cmd, issued_ms, f"{issued_ms}-0", Outcome("executed"))

    t0 = datetime(2026, 2, 15, 14, 30, tzinfo=UTC)
    ms0 = int(t0.timestamp() * 1000)
    # The second command was 20 s old when it arrived, 10 s after the first.
    rows = [
        recorded("a", ms0 + 100, t0),
        recorded("b", ms0 + 10_100, t0 - timedelta(seconds=10)),
    ]
    start = int(time.time() * 1000)
    plan = schedule(rows, 4.0, start)
    assert [p.offset_s for p in plan] == [0.0, 2.5]
    for item, row in zip(plan, rows, strict=True):
        submitted_ms = start + item.offset_s * 1000
        stamp = datetime.fromisoformat(item.body["timestamp"].replace("Z", "+00:00"))
        age_then = row.issued_ms - row.command.timestamp.timestamp() * 1000
        assert submitted_ms - stamp.timestamp() * 1000 == pytest.approx(age_then, abs=1)
        assert item.body["expiry_sec"] == 30 and "duration_sec" not in item.body
