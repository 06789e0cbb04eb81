"""The agent and the simulator as real processes: SIGKILL, restart, re-exec, CLI."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pymodbus.client import AsyncModbusTcpClient

from edge.simulator import BmsSimulator

from edge_testkit import (
    EDGE_ID,
    TOKEN,
    FakeCloud,
    command,
    edge_cli,
    eventually,
    subprocess_env,
)
from support import free_port

pytestmark = pytest.mark.slow


class AgentProcess:
    """`python -m edge.cli edge ...` as a child process, its log in a file."""

    def __init__(self, cloud: FakeCloud, bms_port: int, state_dir: Path, log: Path) -> None:
        self.args = edge_cli(
            "edge", "--edge-id", EDGE_ID, "--gateway", cloud.url, "--token", TOKEN,
            "--modbus", f"bms_main=127.0.0.1:{bms_port}", "--state-dir", str(state_dir),
            "--cycle-period-ms", "50", "--ping-interval-s", "1", "--ping-timeout-s", "1",
        )  # fmt: skip
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> AgentProcess:
        with self.log.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                *self.args, stdout=out, stderr=out, env=subprocess_env()
            )
        return self

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()  # SIGKILL: no clean-up of any kind
        await self.proc.wait()

    async def terminate(self) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            return await self.proc.wait()

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
async def agents() -> AsyncIterator[list[AgentProcess]]:
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        if agent.proc is not None and agent.proc.returncode is None:
            agent.proc.kill()
            await agent.proc.wait()


async def launch(
    agents: list[AgentProcess], cloud: FakeCloud, bms: BmsSimulator, tmp_path: Path
) -> AgentProcess:
    agent = AgentProcess(cloud, bms.port, tmp_path / "state", tmp_path / "agent.log")
    agents.append(agent)
    return await agent.start()


async def test_sigkill_between_execute_and_ack_neither_repeats_nor_loses_the_ack(
    cloud: FakeCloud, bms: BmsSimulator, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    agent = await launch(agents, cloud, bms, tmp_path)
    await cloud.wait_online(within_s=15)
    bms.state.hold_write_answers = True  # the write lands, its answer never leaves
    await cloud.route(command("kill_me", value=42000))
    async with asyncio.timeout(10):
        await bms.wait_for(lambda: bms.active_power_w == 42000)
    await agent.kill()  # executed on the device, not yet recorded, no final ack
    bms.release()
    assert cloud.final("kill_me") is None
    assert [a["status"] for a in cloud.acks_of("kill_me")] == ["accepted"]
    writes = len(bms.state.writes)
    await agent.start()  # same state dir
    final = await cloud.wait_final("kill_me", within_s=15)
    assert final["status"] == "executed"  # confirmed by read-back, not by a second write
    assert len(bms.state.writes) == writes == 1
    # A redelivery after the restart is answered from the journal, too.
    cloud.routed["kill_me"].delivered = False
    await cloud.kick(1001)
    await cloud.wait_for(lambda: cloud.routed["kill_me"].deliveries == 2, within_s=15)
    # accepted, executed (after the restart), executed (resent on reconnect), executed
    # (the answer to the redelivery, sent after its log line).
    await cloud.wait_for(lambda: len(cloud.acks_of("kill_me")) >= 4, within_s=15)
    assert len(bms.state.writes) == 1
    assert "command.duplicate command_id=kill_me delivery=2" in agent.text()
    assert await agent.terminate() == 0
    # The local command log tells the story.
    shown = await run_cli("edge", "log", "--state-dir", str(tmp_path / "state"),
                          "--command-id", "kill_me", "--json")  # fmt: skip
    events = [json.loads(line)["event"] for line in shown.splitlines()]
    assert events[:4] == ["received", "accepted", "executing", "executed"]
    assert "duplicate" in events


async def test_an_acked_command_killed_before_the_ack_left_is_forwarded_after_restart(
    cloud: FakeCloud, bms: BmsSimulator, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    agent = await launch(agents, cloud, bms, tmp_path)
    await cloud.wait_online(within_s=15)
    port = cloud.port
    bms.state.frozen = True
    await cloud.route(command("offline_ack", channel="MinSoc", unit="%", value=33))
    await cloud.wait_for(lambda: bool(cloud.acks_of("offline_ack")))
    await cloud.stop()  # the cloud is unreachable from here on
    bms.release()
    await bms.wait_for(lambda: bms.min_soc_percent == 33)
    await asyncio.sleep(0.5)  # executed; the ack sits in the outbox
    await agent.kill()
    await cloud.start(port)
    await agent.start()
    final = await cloud.wait_final("offline_ack", within_s=15)
    assert final["status"] == "executed"
    assert len(bms.state.writes) == 1


async def test_an_override_reverts_on_time_after_a_sigkill_restart(
    cloud: FakeCloud, bms: BmsSimulator, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    agent = await launch(agents, cloud, bms, tmp_path)
    await cloud.wait_online(within_s=15)
    await cloud.route(command("base", channel="MinSoc", unit="%", value=10))
    await cloud.wait_final("base")
    await cloud.route(command("ov", "config_override", channel="MinSoc", unit="%", value=15,
                              duration_sec=3))  # fmt: skip
    async with asyncio.timeout(10):
        await bms.wait_for(lambda: bms.min_soc_percent == 15)
    written_at = time.monotonic()
    await cloud.wait_final("ov")
    await agent.kill()
    await agent.start()
    async with asyncio.timeout(15):
        await bms.wait_for(lambda: bms.min_soc_percent == 10)
    after_s = time.monotonic() - written_at
    assert 3 - 0.1 <= after_s <= 3 + 1.0, after_s
    await eventually(lambda: "override.reverted command_id=ov" in agent.text())


async def test_system_restart_reexecs_the_agent_which_reconnects(
    cloud: FakeCloud, bms: BmsSimulator, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    agent = await launch(agents, cloud, bms, tmp_path)
    await cloud.wait_online(within_s=15)
    assert agent.proc is not None
    pid = agent.proc.pid
    await cloud.route(command("restart", "system", device_id="core", channel="system",
                              value="restart", unit=None))  # fmt: skip
    assert (await cloud.wait_final("restart"))["status"] == "executed"
    await cloud.wait_for(lambda: cloud.connections >= 2 and cloud.online, within_s=15)
    assert agent.proc.returncode is None and agent.proc.pid == pid  # replaced in place
    assert "edge.agent.reexec" in agent.text()
    await cloud.route(command("after_restart", value=777))
    assert (await cloud.wait_final("after_restart"))["status"] == "executed"
    assert len(cloud.acks_of("restart")) >= 2  # accepted + executed, never executed twice
    assert [a["status"] for a in cloud.acks_of("restart")].count("executed") >= 1
    assert await agent.terminate() == 0


async def test_simulate_device_serves_the_demo_bms_to_any_modbus_client(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "sim.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *edge_cli("simulate-device", "--port", str(port)),
            stdout=out, stderr=out, env=subprocess_env(),
        )  # fmt: skip
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=1, retries=0)
    try:
        async with asyncio.timeout(15):
            while not await client.connect():  # noqa: ASYNC110 (waiting for a child process)
                await asyncio.sleep(0.1)
        regs = client.convert_to_registers(50000, client.DATATYPE.INT32)
        assert not (await client.write_registers(0, regs, device_id=1)).isError()
        assert (await client.read_holding_registers(0, count=2, device_id=1)).registers == [
            0,
            50000,
        ]
        too_much = client.convert_to_registers(150000, client.DATATYPE.INT32)
        refused = await client.write_registers(0, too_much, device_id=1)
        assert refused.isError() and refused.exception_code == 3
        assert (await client.read_input_registers(0, count=1, device_id=1)).registers[0] <= 100
    finally:
        client.close()
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            assert await proc.wait() == 0


async def test_bad_settings_exit_2_with_a_message_that_says_what_to_do(tmp_path: Path) -> None:
    output = await run_cli("edge", "--edge-id", EDGE_ID, expect=2)
    assert "pass --token or set DISPATCH_EDGE_TOKEN" in output
    output = await run_cli(
        "edge", "--edge-id", EDGE_ID, "--token", "t", "--modbus", "bms_main", expect=2
    )
    assert "is not DEVICE=HOST:PORT" in output
    output = await run_cli("edge", "log", "--state-dir", str(tmp_path / "nothing"), expect=2)
    assert "no command log" in output


async def run_cli(*args: str, expect: int = 0, env: dict[str, Any] | None = None) -> str:
    proc = await asyncio.create_subprocess_exec(
        *edge_cli(*args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env or subprocess_env(),
        cwd=os.getcwd(),
    )
    async with asyncio.timeout(20):
        out, _ = await proc.communicate()
    assert proc.returncode == expect, out.decode()
    return out.decode()
