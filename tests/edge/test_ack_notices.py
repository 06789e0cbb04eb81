"""Acks are resent until the gateway says they are recorded (or can never be).

A stand-in gateway answers acks with `ack_recorded` / `ack_unrecorded` / `ack_refused`
notices, as the ledgered gateway does; the real agent, journal and pymodbus BMS."""

from __future__ import annotations

import sqlite3
from typing import Any

from edge.journal import JOURNAL_FILE
from edge.simulator import BmsSimulator

from edge_testkit import FINAL, FakeCloud, command, eventually


def recorded(frame: dict[str, Any]) -> dict[str, Any]:
    return {"type": "ack_recorded", "command_id": frame["command_id"], "status": frame["status"]}


async def test_an_unrecorded_ack_is_resent_with_backoff_until_recorded(
    cloud: FakeCloud, bms: BmsSimulator, start_agent: Any
) -> None:
    refusals = {"n": 0}

    def flaky_ledger(frame: dict[str, Any]) -> dict[str, Any]:
        if frame["status"] == "executed" and refusals["n"] < 2:
            refusals["n"] += 1
            return {"type": "ack_unrecorded", "command_id": frame["command_id"],
                    "status": "executed",
                    "error": {"code": "unavailable", "message": "Redis did not answer"}}  # fmt: skip
        return recorded(frame)

    cloud.notice_for = flaky_ledger
    running = await start_agent(cloud, bms.port)
    await cloud.wait_online()
    await cloud.route(command("retry_me", value=4000))
    await cloud.wait_for(lambda: len(cloud.acks_of("retry_me")) == 4)  # accepted + 3 executed
    times = [t for a, t in zip(cloud.acks, cloud.ack_times, strict=True)
             if a["command_id"] == "retry_me" and a["status"] == "executed"]  # fmt: skip
    assert len(times) == 3
    assert times[1] - times[0] >= 0.45  # 0.5 s, then doubling
    assert times[2] - times[1] >= 0.95
    assert len(bms.state.writes) == 1  # resending an ack never executes again
    agent = running.agent
    await eventually(lambda: agent.metrics.acks_awaiting._value.get() == 0)
    db = sqlite3.connect(running.agent.settings.state_dir / JOURNAL_FILE)
    rows = db.execute("SELECT status, recorded FROM outbox WHERE command_id = 'retry_me'")
    assert {(status, mark) for status, mark in rows} == {
        ("accepted", "recorded"),
        ("executed", "recorded"),
    }
    db.close()


async def test_after_a_reconnect_only_unconfirmed_acks_are_resent(
    cloud: FakeCloud, bms: BmsSimulator, start_agent: Any
) -> None:
    def ledger(frame: dict[str, Any]) -> dict[str, Any] | None:
        command_id = frame["command_id"]
        if command_id == "refused" and frame["status"] in FINAL:
            return {"type": "ack_refused", "command_id": command_id, "status": frame["status"],
                    "error": {"code": "unknown_command", "message": "no such command"}}  # fmt: skip
        if command_id == "silent" and frame["status"] in FINAL:
            return None  # lost on the way: never confirmed
        return recorded(frame)

    cloud.notice_for = ledger
    running = await start_agent(cloud, bms.port)
    await cloud.wait_online()
    for command_id, value in (("kept", 1000), ("refused", 2000), ("silent", 3000)):
        await cloud.route(command(command_id, value=value))
        await cloud.wait_final(command_id)
    agent = running.agent
    await eventually(lambda: agent.metrics.acks_awaiting._value.get() == 1)  # "silent"
    assert agent.metrics.acks_refused._value.get() == 1
    before = {c: len(cloud.acks_of(c)) for c in ("kept", "refused", "silent")}
    await cloud.kick(1001)
    await cloud.wait_for(lambda: len(cloud.acks_of("silent")) == before["silent"] + 1)
    # Resent in journal order, so "kept" and "refused" would have come first.
    assert len(cloud.acks_of("kept")) == before["kept"]
    assert len(cloud.acks_of("refused")) == before["refused"]
    await eventually(lambda: agent.metrics.acks_awaiting._value.get() == 1)
