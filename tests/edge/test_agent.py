"""The agent in-process against a real WebSocket stand-in cloud and a real pymodbus BMS."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from edge.agent import EXIT_RESTART
from edge.capabilities import CONFIG_FILE, ConfigSource
from edge.errors import StateDirBusy
from edge.link import CLOSE_TIMEOUT_S, LinkState
from edge.simulator import BmsSimulator

from edge_testkit import EDGE_ID, FakeCloud, command, demo_config, eventually


def config_version(version: str, min_soc_max: int) -> bytes:
    raw = json.loads(demo_config())
    raw["version"] = version
    raw["devices"][0]["channels"][1]["max"] = min_soc_max
    return json.dumps(raw).encode()


async def test_a_setpoint_is_accepted_executed_and_acknowledged(
    cloud: FakeCloud, bms: BmsSimulator, start_agent: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    running = await start_agent(cloud, bms.port)
    assert running.agent.config_source is ConfigSource.SHIPPED  # the cloud has none (404)
    await cloud.wait_online()
    await cloud.route(command("cmd_12345"))
    final = await cloud.wait_final("cmd_12345")
    assert [a["status"] for a in cloud.acks_of("cmd_12345")] == ["accepted", "executed"]
    assert final["error"] is None
    assert final["executed_at"].endswith("Z")
    assert bms.active_power_w == 50000
    text = caplog.text
    assert "edge.session.opened" in text
    assert "command.transition command_id=cmd_12345 edge_id=site1_edge_prod status=executed" in text


async def test_validation_failures_are_rejected_acks_naming_the_check(
    cloud: FakeCloud, bms: BmsSimulator, start_agent: Any
) -> None:
    await start_agent(cloud, bms.port)
    await cloud.wait_online()
    past = command("late", expiry_sec=1)
    past["expires_at"] = "2020-01-01T00:00:00Z"
    cases = {
        "late": ("expired", past),
        "far": ("out_of_range", command("far", value=250, unit="kW")),
        "ro": ("not_writable", command("ro", channel="Soc", unit="%", value=5)),
        "amps": ("wrong_unit", command("amps", unit="A")),
    }
    for body in (b for _, b in cases.values()):
        await cloud.route(body)
    for command_id, (code, _) in cases.items():
        final = await cloud.wait_final(command_id)
        assert final["status"] == "rejected"
        assert final["error"]["code"] == code
        assert len(cloud.acks_of(command_id)) == 1  # no `accepted` first
    assert bms.state.writes == []


async def test_a_redelivered_command_is_answered_from_the_journal_not_executed_again(
    cloud: FakeCloud, bms: BmsSimulator, start_agent: Any
) -> None:
    await start_agent(cloud, bms.port)
    await cloud.wait_online()
    await cloud.route(command("once", value=1234))
    await cloud.wait_final("once")
    cloud.routed["once"].delivered = False  # as if the acks were lost
    await cloud.kick(1001)
    await cloud.wait_for(lambda: cloud.connections == 2 and len(cloud.acks_of("once")) >= 3)
    assert cloud.routed["once"].deliveries == 2
    assert cloud.acks_of("once")[-1]["status"] == "executed"
    assert len(bms.state.writes) == 1


async def test_after_a_reconnect_it_gets_what_was_queued_in_order(
    cloud: FakeCloud, bms: BmsSimulator, start_agent: Any
) -> None:
    running = await start_agent(cloud, bms.port)
    await cloud.wait_online()
    port = cloud.port
    await cloud.stop()  # the gateway goes away; the edge keeps retrying
    bodies = [
        command("q1", value=1000),
        command("q2", channel="MinSoc", unit="%", value=20),
        command("q3", "mode_change", device_id="core", channel="peak_shaving", value="enabled",
                unit=None),
    ]  # fmt: skip
    for body in bodies:
        await cloud.route(body)  # offline: kept for the edge
    await cloud.start(port)
    for body in bodies:
        final = await cloud.wait_final(body["command_id"])
        assert final["status"] == "executed"
    assert bms.state.writes == [(0, [0, 1000]), (2, [20])]
    accepted = [a["command_id"] for a in cloud.acks if a["status"] == "accepted"]
    assert accepted == ["q1", "q2", "q3"]
    assert running.agent.core.controllers.states["peak_shaving"].mode == "enabled"


async def test_acks_made_while_the_cloud_is_unreachable_are_sent_when_it_is_back(
    cloud: FakeCloud, bms: BmsSimulator, start_agent: Any
) -> None:
    await start_agent(cloud, bms.port)
    await cloud.wait_online()
    bms.state.frozen = True  # the write will hang until released
    await cloud.route(command("slow", value=3000))
    await cloud.wait_for(lambda: bool(cloud.acks_of("slow")))
    port = cloud.port
    await cloud.stop()
    bms.release()  # executed while the cloud is away: the ack waits in the outbox
    await bms.wait_for(lambda: bms.active_power_w == 3000)
    await asyncio.sleep(0.2)
    assert cloud.final("slow") is None
    await cloud.start(port)
    final = await cloud.wait_final("slow")
    assert final["status"] == "executed"


async def test_a_half_open_connection_is_noticed_and_replaced(
    cloud: FakeCloud, bms: BmsSimulator, start_agent: Any, proxy_factory: Any
) -> None:
    proxy = await proxy_factory(cloud.port)
    fake = FakeCloud()
    fake.port = proxy.port
    running = await start_agent(fake, bms.port, ping_interval_s=0.3, ping_timeout_s=0.3)
    await cloud.wait_online()
    link = running.agent.link
    await eventually(lambda: link.state is LinkState.OPEN)
    proxy.blackhole()  # packets vanish, nobody closes anything
    started = time.monotonic()
    await eventually(lambda: link.state is not LinkState.OPEN, within_s=5)
    # Generous slack for a loaded CI machine; the bound that matters (30 s) is far above.
    assert time.monotonic() - started < 0.3 + 0.3 + CLOSE_TIMEOUT_S + 2.0
    proxy.restore()
    # The agent may have begun its reconnect while the link was still dark: that
    # handshake was swallowed and would wait out the 10 s open timeout. Connections
    # opened during a black hole are dead once it heals; end them, as the network would.
    proxy.cut()
    await cloud.wait_for(lambda: cloud.connections >= 2)
    await cloud.route(command("after", value=10))
    assert (await cloud.wait_final("after"))["status"] == "executed"


async def test_refused_handshakes_back_off_then_connect(
    cloud: FakeCloud, bms: BmsSimulator, start_agent: Any
) -> None:
    cloud.refuse_status = 403
    await start_agent(cloud, bms.port, backoff_max_s=0.4)
    await asyncio.sleep(1.5)
    attempts = [t for t in cloud.handshakes]
    # With no backoff there would be hundreds of attempts; with a 0.4 s cap a handful.
    assert 2 <= len(attempts) <= 40
    cloud.refuse_status = None
    await cloud.wait_online(within_s=3)


async def test_a_replaced_session_reconnects(
    cloud: FakeCloud, bms: BmsSimulator, start_agent: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    await start_agent(cloud, bms.port)
    await cloud.wait_online()
    await cloud.kick(4001, "replaced by a newer connection")
    await cloud.wait_for(lambda: cloud.connections == 2)
    assert "code=4001" in caplog.text


async def test_config_comes_from_the_cloud_is_cached_and_sync_config_refreshes_it(
    cloud: FakeCloud, bms: BmsSimulator, start_agent: Any, tmp_path: Path
) -> None:
    cloud.config = config_version("v2", 50)
    running = await start_agent(cloud, bms.port)
    agent = running.agent
    assert agent.config_source is ConfigSource.CLOUD
    assert agent.site.version == "v2"
    assert json.loads((tmp_path / "state" / CONFIG_FILE).read_bytes())["version"] == "v2"
    await cloud.wait_online()
    await cloud.route(command("too_high", channel="MinSoc", unit="%", value=70))
    assert (await cloud.wait_final("too_high"))["error"]["code"] == "out_of_range"
    cloud.config = config_version("v3", 80)
    await cloud.route(command("sync", "system", device_id="core", channel="system",
                              value="sync_config", unit=None))  # fmt: skip
    assert (await cloud.wait_final("sync"))["status"] == "executed"
    assert agent.site.version == "v3"
    await cloud.route(command("fine_now", channel="MinSoc", unit="%", value=70))
    assert (await cloud.wait_final("fine_now"))["status"] == "executed"
    await running.stop()
    # Without the cloud, the next start uses the cache.
    await cloud.stop()
    again = await start_agent(cloud, bms.port)
    assert again.agent.config_source is ConfigSource.CACHE
    assert again.agent.site.version == "v3"


async def test_a_sync_config_the_cloud_cannot_answer_fails_and_keeps_the_old_config(
    cloud: FakeCloud, bms: BmsSimulator, start_agent: Any
) -> None:
    running = await start_agent(cloud, bms.port)
    await cloud.wait_online()
    await cloud.route(command("sync", "system", device_id="core", channel="system",
                              value="sync_config", unit=None))  # fmt: skip
    final = await cloud.wait_final("sync")
    assert final["status"] == "failed"
    assert final["error"]["code"] == "config_sync_failed"
    assert running.agent.site.version == "2026-02-15.1"


async def test_notices_and_bad_frames_never_stop_the_agent(
    cloud: FakeCloud, bms: BmsSimulator, start_agent: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    await start_agent(cloud, bms.port)
    await cloud.wait_online()
    await cloud.send_raw(
        '{"type":"ack_refused","command_id":"x1","error":{"code":"unknown_command","message":"?"}}'
    )
    await cloud.send_raw('{"type":"from_the_future"}')
    await cloud.send_raw("not json at all")
    await cloud.send_raw('{"command_id":"broken","command_type":"teleport"}')
    final = await cloud.wait_final("broken")
    assert final["status"] == "rejected"
    assert final["error"]["code"] == "invalid_command"
    await cloud.route(command("fine", value=5))
    assert (await cloud.wait_final("fine"))["status"] == "executed"
    assert "edge.notice type=ack_refused command_id=x1 code=unknown_command" in caplog.text


async def test_system_restart_is_acknowledged_before_the_agent_exits(
    cloud: FakeCloud, bms: BmsSimulator, start_agent: Any
) -> None:
    running = await start_agent(cloud, bms.port)
    await cloud.wait_online()
    await cloud.route(command("reboot", "system", device_id="core", channel="system",
                              value="restart", unit=None))  # fmt: skip
    async with asyncio.timeout(5):
        code = await running.task
    assert code == EXIT_RESTART
    assert cloud.final("reboot") is not None
    assert cloud.final("reboot")["status"] == "executed"  # type: ignore[index]


async def test_a_second_agent_on_the_same_state_dir_is_refused(
    cloud: FakeCloud, bms: BmsSimulator, start_agent: Any, tmp_path: Path
) -> None:
    await start_agent(cloud, bms.port)
    with pytest.raises(StateDirBusy, match="in use by pid"):
        await start_agent(cloud, bms.port)
    assert EDGE_ID
