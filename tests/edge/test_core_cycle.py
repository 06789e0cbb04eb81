"""The Core Cycle with its real journal and a real pymodbus device (no cloud link)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from edge.capabilities import Channel, DataType, SiteConfig, decode_config
from edge.core_cycle import CoreCycle, CycleSettings
from edge.journal import JOURNAL_FILE, CommandMeta, Journal
from edge.modbus import ModbusDevices
from edge.simulator import BmsSimulator
from edge.validation import Rejection, SystemPlan, validate
from schemas.commands import Ack, EdgeCommand
from schemas.errors import ErrorCode

from edge_testkit import EDGE_ID, command, demo_config

_ack = msgspec.json.Decoder(Ack)


def demo_site(port: int, spare_channels: int = 0) -> SiteConfig:
    site = decode_config(demo_config()).with_address("bms_main", "127.0.0.1", port)
    if not spare_channels:
        return site
    device = site.devices[0]
    spares = [
        Channel(name=f"Spare{i}", data_type=DataType.UINT16, access="read_write", address=10 + i)
        for i in range(spare_channels)
    ]
    device = msgspec.structs.replace(device, channels=[*device.channels, *spares])
    return msgspec.structs.replace(site, devices=[device])


class Harness:
    """A Core Cycle on a fresh journal; `restart()` builds a new one on the same journal."""

    def __init__(self, state_dir: Path, site: SiteConfig, **settings: Any) -> None:
        self.state_dir = state_dir
        self.site = site
        self.settings = CycleSettings(edge_id=EDGE_ID, skew_s=5, **settings)
        self.changed = asyncio.Event()
        self.system: list[SystemPlan] = []
        self._open()

    def _open(self) -> None:
        self.journal = Journal(self.state_dir / JOURNAL_FILE)
        self.devices = ModbusDevices()
        self.core = CoreCycle(
            journal=self.journal,
            devices=self.devices,
            site=lambda: self.site,
            settings=self.settings,
            on_ack=self.changed.set,
            on_system=self._on_system,
        )
        self.task: asyncio.Task[None] | None = None

    async def _on_system(self, plan: SystemPlan, cmd: EdgeCommand) -> Rejection | None:
        self.system.append(plan)
        return None

    async def start(self) -> Harness:
        await self.core.recover()
        self.task = asyncio.create_task(self.core.run())
        return self

    async def crash(self) -> None:
        """Stop as abruptly as an in-process test can: cancel the loop, drop the journal."""
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.devices.close()
        self.journal.close()

    async def restart(self) -> Harness:
        await self.crash()
        self._open()
        return await self.start()

    async def close(self) -> None:
        await self.core.stop()
        await self.crash()

    async def submit(self, body: dict[str, Any]) -> Ack:
        cmd = msgspec.convert({"delivery": 1, **body}, EdgeCommand)
        plan = validate(cmd, self.site, cmd.timestamp, edge_id=EDGE_ID, skew_s=5)
        assert not isinstance(plan, Rejection), plan
        return await self.core.submit(cmd, plan, json.dumps(body).encode())

    def acks(self, command_id: str | None = None) -> list[Ack]:
        rows = self.journal._db.execute("SELECT ack FROM outbox ORDER BY seq").fetchall()
        acks = [_ack.decode(r[0]) for r in rows]
        return [a for a in acks if command_id is None or a.command_id == command_id]

    def final(self, command_id: str) -> Ack | None:
        return next(
            (a for a in self.acks(command_id) if a.status in ("executed", "failed", "rejected")),
            None,
        )

    async def wait_final(self, command_id: str, within_s: float = 5.0) -> Ack:
        async with asyncio.timeout(within_s):
            while (found := self.final(command_id)) is None:
                self.changed.clear()
                await self.changed.wait()
        return found


@pytest.fixture
async def harness_factory(tmp_path: Path, bms: BmsSimulator) -> Any:
    made: list[Harness] = []

    async def make(spare_channels: int = 0, **settings: Any) -> Harness:
        harness = Harness(tmp_path / "state", demo_site(bms.port, spare_channels), **settings)
        made.append(harness)
        return await harness.start()

    yield make
    for harness in made:
        if harness.task is not None and not harness.task.done():
            await harness.close()


async def test_an_emergency_overtakes_fifty_queued_normal_commands(
    harness_factory: Any, bms: BmsSimulator
) -> None:
    h: Harness = await harness_factory(spare_channels=50, period_ms=1500, per_cycle=64)
    await asyncio.sleep(0.05)  # past the first (immediate) tick: the next is 1.5 s away
    for i in range(50):
        ack = await h.submit(command(f"n{i}", channel=f"Spare{i}", value=i + 1, unit=None))
        assert ack.status == "accepted"
    assert h.core.queued == 50
    started = time.monotonic()
    assert (
        await h.submit(command("boom", value=-90000, priority="emergency"))
    ).status == "accepted"
    final = await h.wait_final("boom", within_s=1.0)
    assert final.status == "executed"
    assert time.monotonic() - started < 0.5, "the emergency waited for the tick"
    assert bms.state.writes[0] == (0, [0xFFFE, 0xA070])  # -90000, high word first
    assert all(h.final(f"n{i}") is None for i in range(50))  # all still queued
    for i in range(50):
        assert (await h.wait_final(f"n{i}", within_s=5)).status == "executed"
    assert [address for address, _ in bms.state.writes] == [0] + [10 + i for i in range(50)]


async def test_a_newer_queued_setpoint_supersedes_the_older(
    harness_factory: Any, bms: BmsSimulator
) -> None:
    h: Harness = await harness_factory(period_ms=500)
    await asyncio.sleep(0.05)
    await h.submit(command("old", value=1000))
    await h.submit(command("new", value=2000))
    old = await h.wait_final("old", within_s=0.2)
    assert old.status == "failed"
    assert old.error is not None and old.error.code == "superseded"
    assert "new" in old.error.message
    assert (await h.wait_final("new")).status == "executed"
    assert bms.active_power_w == 2000
    assert [w for _, w in bms.state.writes] == [[0, 2000]]  # the old value never reached it


async def test_a_full_queue_rejects_with_edge_busy_but_takes_emergencies(
    harness_factory: Any,
) -> None:
    h: Harness = await harness_factory(period_ms=2000, capacity=3)
    await asyncio.sleep(0.05)
    for name in ("peak_shaving", "balancing", "peak_shaving"):
        mode = "enabled" if name == "peak_shaving" else "active"
        ack = await h.submit(
            command(f"m{len(h.acks())}", "mode_change", device_id="core", channel=name,
                    value=mode, unit=None)
        )  # fmt: skip
        assert ack.status == "accepted"
    busy = await h.submit(command("one_too_many", "scheduler_control", device_id="core",
                            channel="balancing", value="stop", unit=None))  # fmt: skip
    assert busy.status == "rejected"
    assert busy.error is not None and busy.error.code == "edge_busy"
    assert "queue is full (3 commands waiting)" in busy.error.message
    urgent = await h.submit(command("urgent", value=0, priority="emergency"))
    assert urgent.status == "accepted"
    assert (await h.wait_final("urgent", within_s=1)).status == "executed"


async def test_mode_change_and_scheduler_control_persist_across_restart(
    harness_factory: Any,
) -> None:
    h: Harness = await harness_factory(period_ms=20)
    await h.submit(command("pm", "mode_change", device_id="core", channel="peak_shaving",
                     value="enabled", unit=None))  # fmt: skip
    await h.submit(command("bs", "scheduler_control", device_id="core", channel="balancing",
                     value="stop", unit=None))  # fmt: skip
    assert (await h.wait_final("pm")).status == "executed"
    assert (await h.wait_final("bs")).status == "executed"
    await h.restart()
    states = h.core.controllers.states
    assert (states["peak_shaving"].mode, states["peak_shaving"].running) == ("enabled", True)
    assert (states["balancing"].mode, states["balancing"].running) == ("passive", False)


async def test_an_override_reverts_on_time_even_across_a_restart(
    harness_factory: Any, bms: BmsSimulator
) -> None:
    h: Harness = await harness_factory(period_ms=20)
    await h.submit(command("base", channel="MinSoc", value=10, unit="%"))
    await h.wait_final("base")
    await h.submit(command("ov", "config_override", channel="MinSoc", value=15, unit="%",
                     duration_sec=1))  # fmt: skip
    assert (await h.wait_final("ov")).status == "executed"
    assert bms.min_soc_percent == 15
    (pending,) = h.journal.pending_overrides()
    assert pending.restore_value == 10
    await h.restart()  # the pending revert is read back from the journal
    assert bms.min_soc_percent == 15
    async with asyncio.timeout(3):
        await bms.wait_for(lambda: bms.min_soc_percent == 10)
    assert pending.revert_at <= time.time() < pending.revert_at + 0.5
    await asyncio.sleep(0.2)  # the read-back, then the journal settles it
    assert h.journal.pending_overrides() == []


async def test_an_overdue_override_reverts_at_once_after_restart(
    harness_factory: Any, bms: BmsSimulator
) -> None:
    h: Harness = await harness_factory(period_ms=20)
    await h.submit(command("ov", "config_override", channel="MinSoc", value=30, unit="%",
                     duration_sec=1))  # fmt: skip
    await h.wait_final("ov")
    await h.crash()
    await asyncio.sleep(1.1)  # the agent is "down" past the revert time
    assert bms.min_soc_percent == 30
    h._open()
    await h.start()
    async with asyncio.timeout(1):
        await bms.wait_for(lambda: bms.min_soc_percent == 0)


async def test_a_setpoint_cancels_the_pending_revert_of_its_channel(
    harness_factory: Any, bms: BmsSimulator
) -> None:
    h: Harness = await harness_factory(period_ms=20)
    await h.submit(command("ov", "config_override", channel="MinSoc", value=30, unit="%",
                     duration_sec=1))  # fmt: skip
    await h.wait_final("ov")
    await h.submit(command("sp", channel="MinSoc", value=40, unit="%"))
    await h.wait_final("sp")
    assert h.journal.pending_overrides() == []
    await asyncio.sleep(1.1)
    assert bms.min_soc_percent == 40


async def test_a_device_that_stops_answering_fails_commands_and_the_cycle_goes_on(
    harness_factory: Any, bms: BmsSimulator
) -> None:
    h: Harness = await harness_factory(period_ms=20)
    h.site = msgspec.structs.replace(
        h.site, devices=[msgspec.structs.replace(h.site.devices[0], timeout_s=0.2, retries=1)]
    )
    bms.state.frozen = True
    started = time.monotonic()
    await h.submit(command("hang", value=1000))
    final = await h.wait_final("hang", within_s=3)
    assert time.monotonic() - started < 0.2 * 2 + 0.5 + 0.3
    assert final.status == "failed"
    assert final.error is not None and final.error.code == "device_timeout"
    assert "did not answer" in final.error.message or "no answer" in final.error.message
    await h.submit(command("hang2", value=1500))
    assert (await h.wait_final("hang2", within_s=3)).status == "failed"
    ticks = h.core.ticks
    await asyncio.sleep(0.1)
    assert h.core.ticks > ticks  # still cycling
    bms.release()
    await h.submit(command("back", value=2000))
    assert (await h.wait_final("back", within_s=3)).status == "executed"


async def test_restart_recovery_never_writes_again(tmp_path: Path, bms: BmsSimulator) -> None:
    site = demo_site(bms.port)
    journal = Journal(tmp_path / "state" / JOURNAL_FILE)

    async def seed(command_id: str, value: int, state: str) -> None:
        body = command(command_id, value=value)
        cmd = msgspec.convert(body, EdgeCommand)
        plan = validate(cmd, site, cmd.timestamp, edge_id=EDGE_ID, skew_s=5)
        meta = CommandMeta(command_id, "setpoint", "normal", "user_456")
        await journal.record(
            meta,
            json.dumps(body).encode(),
            Ack(command_id=command_id, status="accepted"),
            plan=msgspec.json.encode(plan),
        )
        if state == "executing":
            await journal.start(command_id)

    await seed("landed", 7000, "executing")  # the device has 7000: the write landed
    await seed("queued", 8000, "accepted")  # never started
    journal.close()
    devices = ModbusDevices()
    device = site.devices[0]
    sp = device.channel("SetActivePower")
    assert sp is not None
    await devices.write(device, sp, 7000)
    writes_before = len(bms.state.writes)
    h = Harness(tmp_path / "state", site, period_ms=20)
    await h.start()
    try:
        landed, queued = h.final("landed"), h.final("queued")
        assert landed is not None and landed.status == "executed"
        assert queued is not None and queued.status == "failed"
        assert queued.error is not None and queued.error.code == "interrupted"
        assert len(bms.state.writes) == writes_before  # nothing written again
    finally:
        await h.close()
        await devices.close()
    # A write whose outcome the device contradicts is reported, not repeated.
    journal = Journal(tmp_path / "state" / JOURNAL_FILE)
    await seed("lost", 9000, "executing")
    journal.close()
    h = Harness(tmp_path / "state", site, period_ms=20)
    await h.start()
    try:
        lost = h.final("lost")
        assert lost is not None and lost.status == "failed"
        assert lost.error is not None and lost.error.code == ErrorCode.OUTCOME_UNKNOWN.value
        assert "now reads 7000, not 9000" in lost.error.message
        assert len(bms.state.writes) == writes_before
    finally:
        await h.close()
