"""Frames the edge cannot read are answered (or counted and logged), never dropped silently;
over-long overrides are refused. Real agent, real WebSocket stand-in cloud, real pymodbus BMS."""

from __future__ import annotations

import json
import logging
import math
import random
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from edge.journal import JOURNAL_FILE
from edge.simulator import BmsSimulator

from edge_testkit import FakeCloud, command


async def test_every_unreadable_frame_naming_a_command_is_answered_rejected(
    cloud: FakeCloud, bms: BmsSimulator, start_agent: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    running = await start_agent(cloud, bms.port)
    await cloud.wait_online()
    nan = json.dumps(command("nan_1", value=float("nan")))  # Python writes the NaN literal
    assert "NaN" in nan
    await cloud.send_raw(nan)
    await cloud.send_raw(json.dumps({**command("types_1"), "target": "bms_main", "value": [1]}))
    await cloud.send_raw('{"delivery": 1, "command_id": "cut_1", "command_type": "setp')
    await cloud.send_raw(json.dumps(command("x" * 300)))  # no usable id: cannot be acked
    await cloud.send_raw("\x00\x01 not json, no id")
    for command_id in ("nan_1", "types_1", "cut_1"):
        final = await cloud.wait_final(command_id)
        assert final["status"] == "rejected", final
        assert final["error"]["code"] == "invalid_command"
        assert "could not read this command" in final["error"]["message"]
    metrics = running.agent.metrics
    assert metrics.frames_rejected._value.get() == 3
    assert metrics.frames_unanswerable._value.get() == 2
    assert caplog.text.count("edge.frame.unanswerable") == 2
    assert "no valid command id in it" in caplog.text
    # Nothing else was lost: the agent still executes, and wrote nothing for the bad frames.
    assert bms.state.writes == []
    await cloud.route(command("fine", value=7))
    assert (await cloud.wait_final("fine"))["status"] == "executed"
    assert [a["command_id"] for a in cloud.acks if a["command_id"].startswith("x")] == []


async def test_a_command_the_journal_fails_to_take_is_refused_not_left_unanswered(
    cloud: FakeCloud, bms: BmsSimulator, start_agent: Any, tmp_path: Path
) -> None:
    """The journal refuses one command's record (a real SQLite failure, injected with a
    trigger): the agent answers `rejected`/`internal` naming the failure instead of
    leaving the gateway to time the command out, writes nothing for it, and goes on."""
    running = await start_agent(cloud, bms.port)
    await cloud.wait_online()
    with sqlite3.connect(tmp_path / "state" / JOURNAL_FILE) as db:
        db.execute(
            "CREATE TRIGGER refuse_boom BEFORE INSERT ON commands WHEN NEW.command_id = 'boom_1'"
            " BEGIN SELECT RAISE(ABORT, 'injected: disk full'); END"
        )
    await cloud.route(command("boom_1", value=41000))
    refused = await cloud.wait_final("boom_1")
    assert refused["status"] == "rejected", refused
    assert refused["error"]["code"] == "internal"
    assert "injected: disk full" in refused["error"]["message"]
    assert "will not be written" in refused["error"]["message"]
    assert running.agent.metrics.frames_unanswerable._value.get() == 0
    assert bms.state.writes == []  # never queued, so nothing can write it later either
    await cloud.route(command("after_boom", value=42000))
    assert (await cloud.wait_final("after_boom"))["status"] == "executed"
    assert len(bms.state.writes) == 1


async def test_an_override_beyond_the_maximum_duration_is_refused(
    cloud: FakeCloud, bms: BmsSimulator, start_agent: Any
) -> None:
    await start_agent(cloud, bms.port, max_override_s=3600)
    await cloud.wait_online()
    decade = 10 * 365 * 86400
    await cloud.route(command("ov_decade", "config_override", channel="MinSoc", value=15,
                              unit="%", duration_sec=decade))  # fmt: skip
    await cloud.route(command("ov_hour", "config_override", channel="MinSoc", value=15,
                              unit="%", duration_sec=3600))  # fmt: skip
    refused = await cloud.wait_final("ov_decade")
    assert refused["status"] == "rejected"
    assert refused["error"]["code"] == "out_of_range"
    assert "exceeds the maximum 3600 s" in refused["error"]["message"]
    assert (await cloud.wait_final("ov_hour"))["status"] == "executed"


def mangled_frames(count: int) -> dict[str, str]:
    """Commands with one field broken in a different way each (fixed seed), by id."""
    rng = random.Random(20261129)
    breakers: list[Any] = [
        lambda b: b | {"value": [1, 2]},
        lambda b: b | {"value": {"x": 1}},
        lambda b: b | {"value": "\x00" * 70},
        lambda b: b | {"target": "bms_main"},
        lambda b: b | {"target": {"edge_id": 5}},
        lambda b: b | {"command_type": "teleport"},
        lambda b: b | {"timestamp": "yesterday"},
        lambda b: b | {"expires_at": None},
        lambda b: b | {"expiry_sec": "300"},
        lambda b: b | {"priority": "urgent!"},
        lambda b: b | {"remaining_ms": "soon"},
        lambda b: b | {"sent_at": 12},
        lambda b: {k: v for k, v in b.items() if k != "source"},
    ]
    frames: dict[str, str] = {}
    for i in range(count):
        command_id = f"mangled_{i}"
        body = command(command_id, value=rng.randint(0, 1000))
        style = rng.randrange(3)
        if style == 0:  # a broken field
            frames[command_id] = json.dumps(rng.choice(breakers)(body))
        elif style == 1:  # cut short at a random point after the id
            text = json.dumps(body)
            cut = text.index(command_id) + len(command_id) + 1
            frames[command_id] = text[: rng.randrange(cut, len(text) - 1)]
        else:  # a number JSON cannot hold
            frames[command_id] = json.dumps(body | {"value": rng.choice([math.nan, math.inf])})
    return frames


async def test_forty_mangled_frames_each_get_exactly_one_answer(
    cloud: FakeCloud, bms: BmsSimulator, start_agent: Any
) -> None:
    await start_agent(cloud, bms.port)
    await cloud.wait_online()
    frames = mangled_frames(40)
    for text in frames.values():
        await cloud.send_raw(text)
    await cloud.wait_for(lambda: all(cloud.final(c) is not None for c in frames))
    for command_id in frames:
        (answer,) = cloud.acks_of(command_id)
        assert answer["status"] == "rejected", (answer, frames[command_id])
        assert answer["error"]["code"] in ("invalid_command", "wrong_type"), answer
    assert bms.state.writes == []
    await cloud.route(command("after_all_that", value=9))
    assert (await cloud.wait_final("after_all_that"))["status"] == "executed"
