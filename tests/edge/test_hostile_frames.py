"""Frames the edge cannot read are answered (or counted and logged), never dropped silently;
over-long overrides are refused. Real agent, real WebSocket stand-in cloud, real pymodbus BMS."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

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
