"""The edge's /metrics (scraped over HTTP after a command) and the journal's group commit."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from edge.journal import JOURNAL_FILE, CommandMeta, Journal
from edge.simulator import BmsSimulator
from schemas.commands import Ack

from edge_testkit import FakeCloud, command, scrape


async def test_metrics_move_when_a_command_runs(
    cloud: FakeCloud, bms: BmsSimulator, start_agent: Any
) -> None:
    running = await start_agent(cloud, bms.port, metrics_port=0)
    port = running.agent.metrics_port
    assert port
    before = await asyncio.to_thread(scrape, port)
    await cloud.wait_online()
    await cloud.route(command("metered", value=2500))
    assert (await cloud.wait_final("metered"))["status"] == "executed"
    after = await asyncio.to_thread(scrape, port)
    write = ("dispatch_edge_modbus_seconds_count", (("device", "bms_main"), ("operation", "write")))
    assert after[write] >= 1 > before.get(write, 0)
    commits = ("dispatch_edge_journal_commit_seconds_count", ())
    assert after[commits] > before[commits]
    cycles = ("dispatch_edge_cycle_seconds_count", ())
    assert after[cycles] > 0
    assert ("dispatch_edge_queue_depth", ()) in after
    assert ("dispatch_edge_clock_offset_seconds", ()) in after
    assert ("dispatch_edge_acks_awaiting_recording", ()) in after
    # An unreachable device is counted per device.
    await bms.stop()
    await cloud.route(command("unplugged", value=2600))
    assert (await cloud.wait_final("unplugged", within_s=15))["status"] == "failed"
    errors = await asyncio.to_thread(scrape, port)
    assert any(
        name == "dispatch_edge_modbus_errors_total" and ("device", "bms_main") in labels
        for name, labels in errors
    )


async def test_concurrent_journal_writes_share_durable_commits_off_the_event_loop(
    tmp_path: Path,
) -> None:
    commits: list[tuple[str, int]] = []

    def observed(seconds: float, writes: int) -> None:
        commits.append((threading.current_thread().name, writes))

    journal = Journal(tmp_path / JOURNAL_FILE, on_commit=observed)
    try:
        metas = [CommandMeta(f"gc_{i}", "setpoint", "normal", "user_1") for i in range(40)]
        for meta in metas:  # receipts: no fsync of their own
            await journal.record(meta, b"{}", Ack(command_id=meta.command_id, status="accepted"))
        assert commits == []
        # Hold the writer inside one commit while 40 durable writes (`executing`, each
        # before a device write) queue up behind it, as they do behind a real fsync; they
        # must then share the next commit.
        gate, inside = threading.Event(), threading.Event()

        def hold(db: object) -> bool:
            inside.set()
            return gate.wait(10)

        held = asyncio.ensure_future(journal._write(hold))
        assert await asyncio.to_thread(inside.wait, 10)
        writes = asyncio.gather(*(journal.start(m.command_id) for m in metas))
        await asyncio.sleep(0)  # let every write reach the queue (the loop is not blocked)
        gate.set()
        assert await held is True
        await writes
        assert [n for _, n in commits] == [1, 40]
        assert {name for name, _ in commits} == {"journal-writer"}
        assert all(len(journal.events_of(m.command_id, "executing")) == 1 for m in metas)
        # One failing write (a duplicate id) fails alone; the others in its commit land.
        results = await asyncio.gather(
            journal.record(metas[0], b"{}", Ack(command_id="gc_0", status="accepted")),
            journal.note("gc_1", "remark", "still here"),
            return_exceptions=True,
        )
        assert isinstance(results[0], Exception) and results[1] is None
        assert journal.events_of("gc_1", "remark")
    finally:
        journal.close()
