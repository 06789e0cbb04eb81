"""An edge whose wall clock is wrong (injected: 5 min ahead) against a gateway that sends
`sent_at` and `remaining_ms`: expiry follows the handed-over lifetime, acks carry the
measured offset and report `executed_at` on the gateway's timeline; past the limit the
edge alarms and refuses control with `clock_skew`."""

from __future__ import annotations

import asyncio
import logging
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from edge.simulator import BmsSimulator

from edge_testkit import EDGE_ID, TOKEN, FakeCloud, command, edge_cli, subprocess_env

AHEAD = timedelta(minutes=5)


def edge_wall() -> datetime:
    return datetime.now(UTC) + AHEAD


def timed(command_id: str, expiry_s: int, **kw: Any) -> dict[str, Any]:
    """A command as a newer gateway sends it: its clock at send and the lifetime left."""
    now = datetime.now(UTC)
    return command(command_id, expiry_sec=expiry_s, sent_at=now, remaining_ms=expiry_s * 1000,
                   expires_at=now + timedelta(seconds=expiry_s), **kw)  # fmt: skip


def parse(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


async def test_an_edge_5_min_ahead_executes_30_s_and_120_s_commands_on_the_gateway_timeline(
    cloud: FakeCloud, bms: BmsSimulator, start_agent: Any
) -> None:
    await start_agent(cloud, bms.port, wall=edge_wall, max_clock_offset_s=600)
    await cloud.wait_online()
    for command_id, expiry_s in (("short", 30), ("long", 120)):
        await cloud.route(timed(command_id, expiry_s, value=100 * expiry_s))
        final = await cloud.wait_final(command_id)
        assert final["status"] == "executed", final
        # Measured from sent_at: 300 s plus at most the (loopback) latency.
        assert 300_000 <= final["clock_offset_ms"] < 302_000
        executed_at = parse(final["executed_at"])
        assert abs(executed_at - datetime.now(UTC)) < timedelta(seconds=2), "not corrected"
    accepted = cloud.acks_of("short")[0]
    assert accepted["status"] == "accepted" and accepted["clock_offset_ms"] >= 300_000
    assert bms.active_power_w == 12000
    # Expiry still holds: a command whose lifetime has run out is refused, whatever the clock.
    await cloud.route(timed("stale", 30) | {"remaining_ms": -1})
    stale = await cloud.wait_final("stale")
    assert stale["status"] == "rejected" and stale["error"]["code"] == "expired"


async def test_beyond_the_offset_limit_the_edge_alarms_and_refuses_control(
    cloud: FakeCloud, bms: BmsSimulator, start_agent: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    running = await start_agent(cloud, bms.port, wall=edge_wall)  # default limit 30 s
    await cloud.wait_online()
    await cloud.route(timed("refused", 30, value=3000))
    final = await cloud.wait_final("refused")
    assert final["status"] == "rejected"
    assert final["error"]["code"] == "clock_skew"
    assert "more than the 30 s allowed" in final["error"]["message"]
    assert final["clock_offset_ms"] >= 300_000
    assert "edge.clock.skew_alarm" in caplog.text
    assert bms.state.writes == []
    assert running.agent.metrics.clock_offset._value.get() >= 300
    # `system` still works, so the site can be reconfigured while the clock is fixed.
    await cloud.route(timed("sync", 30, command_type="system", device_id="core",
                            channel="system", value="sync_config", unit=None))  # fmt: skip
    sync = await cloud.wait_final("sync")
    assert sync["error"] is None or sync["error"]["code"] != "clock_skew"


async def test_without_sent_at_an_older_gateway_keeps_the_wall_clock_rule(
    cloud: FakeCloud, bms: BmsSimulator, start_agent: Any
) -> None:
    await start_agent(cloud, bms.port, wall=edge_wall)
    await cloud.wait_online()
    await cloud.route(command("old_gw", expiry_sec=30))  # no sent_at, no remaining_ms
    final = await cloud.wait_final("old_gw")
    # 5 min ahead is beyond the 60 s expiry tolerance: refused, and nothing measured.
    assert final["status"] == "rejected" and final["error"]["code"] == "expired"
    assert final.get("clock_offset_ms") is None


# The library itself (not the `faketime` wrapper, which would not pass SIGTERM on).
LIBFAKETIME = next(iter(sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))), None)


@pytest.mark.slow
@pytest.mark.skipif(
    LIBFAKETIME is None,
    reason="libfaketime is missing: apt-get install faketime (scripts/test-tools.sh does)",
)
async def test_a_real_agent_process_under_libfaketime_5_min_ahead(
    cloud: FakeCloud, bms: BmsSimulator, tmp_path: Path
) -> None:
    env = {**subprocess_env(), "LD_PRELOAD": str(LIBFAKETIME), "FAKETIME": "+5m"}
    args = [*edge_cli(
        "edge", "--edge-id", EDGE_ID, "--gateway", cloud.url, "--token", TOKEN,
        "--modbus", f"bms_main=127.0.0.1:{bms.port}", "--state-dir", str(tmp_path / "state"),
        "--cycle-period-ms", "50", "--max-clock-offset-s", "600",
    )]  # fmt: skip
    log = tmp_path / "agent.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(*args, stdout=out, stderr=out, env=env)
    try:
        await cloud.wait_online(within_s=20)
        for command_id, expiry_s in (("ft_short", 30), ("ft_long", 120)):
            await cloud.route(timed(command_id, expiry_s, value=100 * expiry_s))
            final = await cloud.wait_final(command_id)
            assert final["status"] == "executed", (final, log.read_text())
            assert 299_000 <= final["clock_offset_ms"] < 302_000
            assert abs(parse(final["executed_at"]) - datetime.now(UTC)) < timedelta(seconds=2)
        assert bms.active_power_w == 12000
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            assert await proc.wait() == 0, log.read_text()
