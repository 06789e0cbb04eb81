"""Recorded windows replayed at speeds 1 and 10 give the recorded outcomes and lifecycles.

Each window is recorded with real processes (gateway, simulated BMS, a real edge agent
whose link runs through an `EdgeRelay` that plays the network), then replayed with
`dispatch replay` in a sandbox.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from replay_kit import (
    Site,
    iso,
    leftover,
    lifecycles,
    live_site,
    outcomes,
    run_replay,
    snapshot,
    until,
)

from support import DEMO_EDGE, Processes, command, free_port, user_token

ACK_TIMEOUT_MS = 3000


def minsoc(value: int, **extra: object) -> dict[str, object]:
    return command(channel="MinSoc", value=value, unit="%", **extra)


@pytest.mark.slow
async def test_an_online_window_replays_the_same_at_speeds_1_and_10(
    processes: Processes, tmp_path: Path, namespace: str, sites: list[Site]
) -> None:
    """Normal and emergency execution, an edge refusal, an override that reverts."""
    token = user_token(control=[DEMO_EDGE])
    site = await live_site(processes, tmp_path, token, sites)
    edge = next(p for p in processes.procs if p.name == "edge")
    start = datetime.now(UTC) - timedelta(seconds=1)
    await site.send(command(value=0), "executed")
    await site.send(command(value=11_000), "executed")
    refused = await site.send(command(value=150_000), "rejected")
    override = minsoc(40, command_type="config_override", duration_sec=1)
    override_id = await site.send(override, "executed")
    await until(
        lambda: f"override.reverted command_id={override_id}" in edge.log(), 20, "the revert"
    )
    await site.send(command(value=12_000, priority="emergency"), "executed")
    end = datetime.now(UTC) + timedelta(seconds=1)
    processes.stop_all()  # the live system rests; the replay must not touch it
    before = snapshot(namespace)

    window = ("--edge", DEMO_EDGE, "--from", iso(start), "--to", iso(end))
    reports = []
    for speed in ("1", "10"):
        code, report, out = await run_replay(processes, *window, "--speed", speed)
        assert code == 0, out
        assert report["different"] == 0 and not report["notes"], out
        assert outcomes(report, "replayed") == outcomes(report, "recorded")
        assert lifecycles(report, "replayed") == lifecycles(report, "recorded")
        assert report["sandbox"].startswith("replay-") and not leftover(report["sandbox"])
        reports.append(report)
    recorded = outcomes(reports[0], "recorded")
    assert recorded[refused] == ("rejected", "out_of_range")
    assert [s for s, _ in recorded.values()].count("executed") == 4

    # What if the BMS had been down: every write fails, the refusal stays a refusal.
    dead = f"bms_main=127.0.0.1:{free_port()}"
    code, whatif, out = await run_replay(processes, *window, "--speed", "10", "--modbus", dead)
    assert code == 1, out
    for row in whatif["commands"]:
        if row["command_id"] == refused:
            assert row["same"] and row["parted"] is None
            continue
        assert row["replayed"]["status"] == "failed" and not row["same"], row
        assert row["parted"].startswith("recorded: executed at +"), row
        assert "; replay: failed (" in row["parted"], row
    assert whatif["different"] == 4

    after = snapshot(namespace)
    assert set(after) <= set(before)
    for key, (dump, volatile) in before.items():
        if key in after:
            assert after[key][0] == dump, key
        else:
            assert volatile, f"{key!r} vanished during the replays"


@pytest.mark.slow
async def test_an_outage_and_a_silent_edge_replay_the_same_at_speeds_1_and_10(
    processes: Processes, tmp_path: Path, namespace: str, sites: list[Site]
) -> None:
    """Offline: coalesced setpoints, an expiry, a cancel; then a timed_out and a late ack."""
    processes.env["DISPATCH_ACK_TIMEOUT_MS"] = str(ACK_TIMEOUT_MS)
    token = user_token(control=[DEMO_EDGE])
    site = await live_site(processes, tmp_path, token, sites)
    processes.dispatch("projector", "projector")  # reaches the live timeouts and expiries
    start = datetime.now(UTC) - timedelta(seconds=1)
    first = await site.send(command(value=1_000), "executed")

    await site.offline()
    older = await site.send(command(value=20_000), "queued")
    newer = await site.send(command(value=30_000), "queued")
    await site.wait(older, "failed")
    stale = await site.send(minsoc(30, expiry_sec=1), "queued")
    await site.wait(stale, "expired")
    cancel = command(device_id="core", channel="balancing", value="stop", unit="")
    cancel["command_type"] = "scheduler_control"
    cancelled = await site.send(cancel, "queued")
    code, reply = await site.post(f"/api/commands/{cancelled}/cancel")
    assert code == 200 and reply["status"] == "cancelled", reply
    await site.online()
    await site.wait(newer, "executed")

    silent = command(value=5_000)
    site.relay.hold(str(silent["command_id"]), frozenset({"executed", "failed", "rejected"}))
    await site.send(silent, "delivered", "timed_out")
    await site.wait(str(silent["command_id"]), "timed_out")
    await site.relay.release(str(silent["command_id"]))
    await site.wait(str(silent["command_id"]), "executed")
    last = await site.send(command(value=0), "executed")
    end = datetime.now(UTC) + timedelta(seconds=1)
    processes.stop_all()

    window = ("--edge", DEMO_EDGE, "--from", iso(start), "--to", iso(end))
    expected = {
        first: ("executed", None),
        older: ("failed", "superseded"),
        newer: ("executed", None),
        stale: ("expired", "expired"),
        cancelled: ("cancelled", "cancelled"),
        str(silent["command_id"]): ("executed", None),
        last: ("executed", None),
    }
    for speed in ("1", "10"):
        code, report, out = await run_replay(processes, *window, "--speed", speed)
        assert code == 0, out
        assert outcomes(report, "recorded") == expected
        assert outcomes(report, "replayed") == expected, out
        assert lifecycles(report, "replayed") == lifecycles(report, "recorded"), out
        assert "timed_out" in lifecycles(report, "replayed")[str(silent["command_id"])]
        assert not report["notes"] and not leftover(report["sandbox"])
