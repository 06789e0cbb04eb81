"""`dispatch replay`: the audit-table fallback, an explained difference, the schedule."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
import websockets
from replay_kit import Site, iso, live_site, run_replay

from dispatch.replay.schedule import Gate, Kind, body, plan
from dispatch.replay.window import Window, build
from ledger.keys import Keys
from schemas.commands import CommandType, EdgeCommand, Target
from schemas.errors import ErrorCode, error
from schemas.events import (
    Authorized,
    Cancelled,
    Delivered,
    Event,
    Executed,
    Failed,
    Issued,
    Queued,
    Routed,
    Status,
    TimedOut,
)

from support import (
    DEMO_EDGE,
    REDIS_URL,
    Gateway,
    Processes,
    command,
    edge_token,
    http,
    projected_status,
    user_token,
    wait_until,
)


def status_of(gw: Gateway, token: str, command_id: str) -> str:
    code, _, body = http("GET", f"{gw.http}/api/commands/{command_id}", token)
    return str(body["status"]) if code == 200 else ""


def send(gw: Gateway, token: str, value: int) -> str:
    body = command(value=value)
    code, _, reply = http("POST", f"{gw.http}/api/commands", token, body)
    assert code == 202, reply
    return str(body["command_id"])


@pytest.mark.slow
async def test_replay_reads_the_audit_tables_once_the_log_is_trimmed(
    processes: Processes, tmp_path: Path, namespace: str, sites: list[Site]
) -> None:
    token = user_token(control=[DEMO_EDGE])
    site = await live_site(processes, tmp_path, token, sites)
    start = datetime.now(UTC) - timedelta(seconds=1)
    too_big = await site.send(command(value=150_000), "rejected")  # beyond the 100 kW limit
    corrected = await site.send(command(value=50_000), "executed")
    end = datetime.now(UTC) + timedelta(seconds=1)
    window = ("--edge", DEMO_EDGE, "--from", iso(start), "--to", iso(end), "--speed", "2")

    # Weeks later retention has trimmed the ledger's log: the audit tables hold the window.
    processes.dispatch("projector", "projector")
    await asyncio.to_thread(
        wait_until,
        lambda: projected_status(namespace, corrected) == "executed",
        30,
        what="the projection",
    )
    client = redis.Redis.from_url(REDIS_URL)
    keys = Keys(namespace, 4)
    log_key = keys.log(keys.partition(DEMO_EDGE))
    client.xtrim(log_key, minid=f"{int(time.time() * 1000)}-0")
    assert client.xlen(log_key) == 0
    client.close()

    # The human-readable form: side by side, one line per command.
    text = processes.dispatch("replay-text", "replay", *window)
    assert await asyncio.to_thread(text.popen.wait, 120) == 0, text.log()
    lines = text.log().splitlines()
    assert any("recorded in the audit tables" in ln for ln in lines)
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
    code, report, out = await run_replay(
        processes, "--edge", DEMO_EDGE, "--from", iso(start), "--to", iso(end)
    )
    assert code == 1, out
    [row] = report["commands"]
    assert (row["recorded"]["status"], row["recorded"]["error_code"]) == ("executed", None)
    assert (row["replayed"]["status"], row["replayed"]["error_code"]) == (
        "rejected",
        "out_of_range",
    )
    assert not row["same"] and report["different"] == 1
    # The first event where the two part, with its offset in each run and the edge's reason.
    assert row["parted"].startswith("recorded: delivered at +"), row
    assert "; replay: rejected (out_of_range) at +" in row["parted"], row
    assert "100000" in row["parted"], row  # the edge names its limit


async def test_replay_refuses_an_unreadable_config_before_starting_anything(
    processes: Processes, tmp_path: Path
) -> None:
    broken = tmp_path / "site.json"
    broken.write_text('{"version": 1}')
    window = ("--edge", DEMO_EDGE, "--from", "2020-01-01T00:00:00Z", "--to", "2020-01-01T01:00:00Z")
    for path, says in (
        (tmp_path / "missing.json", "cannot read --config"),
        (broken, "is not a usable capability config"),
    ):
        proc = processes.dispatch("replay", "replay", *window, "--config", str(path))
        assert await asyncio.to_thread(proc.popen.wait, 30) == 2
        assert says in proc.log(), proc.log()


async def test_replay_of_an_empty_window_says_so(processes: Processes) -> None:
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
    assert await asyncio.to_thread(proc.popen.wait, 30) == 2
    assert "no commands for edge 'nowhere' were issued between" in proc.log()


# -- the schedule (pure) -----------------------------------------------------------------------
EDGE = "e1"
USER = "user_1"


def cmd(cid: str, *, channel: str = "SetActivePower", expiry_s: int = 300) -> EdgeCommand:
    sent = datetime(2026, 2, 15, 14, 30, tzinfo=UTC)
    return EdgeCommand(
        command_id=cid,
        command_type=CommandType.SETPOINT,
        target=Target(edge_id=EDGE, device_id="bms_main", channel=channel),
        value=1,
        unit="W",
        expiry_sec=expiry_s,
        source=USER,
        timestamp=sent,
        priority="normal",
        expires_at=sent + timedelta(seconds=expiry_s),
    )


class Log:
    """A recorded timeline written the way the ledger writes it."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, Event]] = []
        self.ms = 1_000_000

    def add(
        self, event_type: type[Event], cid: str, *, actor: str = USER, **fields: object
    ) -> None:
        self.ms += 100
        event = event_type(
            at=self.ms,
            event_id=f"ev{len(self.rows)}",
            command_id=cid,
            edge_id=EDGE,
            actor=actor,
            **fields,
        )
        self.rows.append((f"{self.ms}-0", event))

    def issue(self, cid: str, *, online: bool) -> None:
        self.add(Issued, cid, command=cmd(cid), digest="d")
        self.add(Authorized, cid, grant="g")
        if online:
            self.add(Routed, cid, gateway="gw")
        else:
            self.add(Queued, cid, expires_at=self.ms + 300_000)

    def ack(self, event_type: type[Event], cid: str, **fields: object) -> None:
        self.add(event_type, cid, actor=f"edge:{EDGE}", **fields)

    def window(self) -> Window:
        commands, timeline = build(self.rows, EDGE, 0, 10**13)
        return Window(commands, timeline, "ledger")


def test_plan_follows_what_happened_not_only_when() -> None:
    log = Log()
    log.issue("a", online=True)
    log.ack(Delivered, "a")
    log.ack(Executed, "a")
    log.issue("b", online=False)  # the edge went away after a executed
    log.issue("c", online=False)
    log.add(
        Failed, "b", error=error(ErrorCode.SUPERSEDED, "newer c")
    )  # the cloud's, not the edge's
    log.add(Cancelled, "c", error=error(ErrorCode.CANCELLED, "by user_1"))
    log.issue("d", online=False)
    log.add(Routed, "d", gateway="gw")  # the backlog after the edge came back
    log.ack(Delivered, "d")
    log.add(TimedOut, "d", actor="verdicts", error=error(ErrorCode.TIMEOUT, "silent"))
    log.ack(Executed, "d", late=True)
    log.issue("e", online=True)
    schedule = plan(log.window())

    assert [a.text() for a in schedule.actions] == [
        "submit a",
        "offline",
        "submit b",
        "submit c",
        "cancel c",
        "submit d",
        "online",
        "release d",
        "submit e",
    ]
    by_text = {a.text(): a for a in schedule.actions}
    assert Gate("a", Status.EXECUTED) in by_text["offline"].gates
    assert Gate("b", Status.QUEUED) in by_text["submit c"].gates
    assert Gate("c", Status.QUEUED) in by_text["cancel c"].gates
    assert {Gate("b", Status.FAILED), Gate("c", Status.CANCELLED), Gate("d", Status.QUEUED)} <= set(
        by_text["online"].gates
    )
    assert Gate("d", Status.TIMED_OUT) in by_text["release d"].gates
    assert Gate("d", Status.EXECUTED) in by_text["submit e"].gates
    # d's edge answered only after the verdict: its result is held back until released.
    assert schedule.holds == {"d": frozenset({"executed", "failed", "rejected"})}
    assert by_text["online"].kind is Kind.ONLINE


def test_a_command_is_as_old_on_arrival_as_it_was_recorded() -> None:
    command = cmd("a", expiry_s=30)
    issued_ms = int(command.timestamp.timestamp() * 1000) + 20_000  # 20 s old on arrival
    submit_ms = int(time.time() * 1000)
    sent = body(command, issued_ms, submit_ms)
    stamp = datetime.fromisoformat(sent["timestamp"].replace("Z", "+00:00"))
    assert submit_ms - stamp.timestamp() * 1000 == pytest.approx(20_000, abs=1)
    assert sent["expiry_sec"] == 30 and "duration_sec" not in sent
    assert sent["command_id"] == "a" and sent["target"]["channel"] == "SetActivePower"
