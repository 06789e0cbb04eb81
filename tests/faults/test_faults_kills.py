"""kill -9 of each process at the moment that matters, then I1-I6.

- the gateway right after it appended a command (the POST answered), and after it sent
  a command to the edge (the agent journaled the receipt, nothing acknowledged);
- the edge agent before the Modbus write (received, waiting in a slow Core Cycle) and
  after it (the device took the value and never answered);
- the projector mid-batch (audit rows written exactly once) and while verdicts are due.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from faults_clients import Dashboard, HttpSender, setpoint
from faults_kit import assert_invariants, checker_for, deploy, enroll, presence, wait_for
from websockets.sync.client import connect

from edge.recording_device import read_record

from support import DEMO_EDGE, Processes, edge_token, free_port, user_token

pytestmark = pytest.mark.slow

OPERATOR = user_token("op_kills", control=[DEMO_EDGE, "edge_silent"], view=[DEMO_EDGE])


@pytest.mark.parametrize("moment", ["after-append", "after-send"])
def test_gateway_kill9_then_restart_delivers_once(
    processes: Processes, tmp_path: Path, moment: str
) -> None:
    port = free_port()
    # A slow Core Cycle leaves the command received but not executed when the gateway dies.
    slow = ("--cycle-period-ms", "1500") if moment == "after-send" else ()
    # The ack timeout outlasts the restart: a gateway start-up takes 3-10 s on the loaded
    # 2-core machine, and with the default 3 s a command routed to the dead gateway's
    # session was rightly `timed_out` before the new gateway could redeliver it.
    gw, site = deploy(
        processes, tmp_path, gateway_port=port, agent_args=slow, ack_timeout_ms=15_000
    )
    sender = HttpSender(gw.http, OPERATOR)
    first, body = setpoint(), setpoint()
    assert sender.send(first) in (200, 202)
    assert sender.send(body) in (200, 202)
    if moment == "after-send":
        wait_for(
            lambda: any(cid == body["command_id"] for cid, _ in site.journal()),
            10,
            "the agent to journal the command",
        )
    gw.proc.kill()
    restarted = processes.gateway(port=port, gateway_id="gw-a")
    later = setpoint()
    assert HttpSender(restarted.http, OPERATOR).send(later) in (200, 202)
    report = assert_invariants(checker_for(processes, site, sender.log))
    assert report.figures["statuses"].get("timed_out", 0) == 0, report


@pytest.mark.parametrize("moment", ["before-write", "after-write"])
def test_agent_kill9_then_restart_writes_at_most_once(
    processes: Processes, tmp_path: Path, moment: str
) -> None:
    gw, site = deploy(processes, tmp_path, agent=False, ack_timeout_ms=10_000)
    if moment == "after-write":
        assert site.device is not None
        site.device.kill()  # the same port again, now withholding the first write's answer
        site.start_device("--hold-write", "1")
        site.start_agent(gw.ws)
    else:
        site.start_agent(gw.ws, "--cycle-period-ms", "3000")
    body = setpoint()
    sender = HttpSender(gw.http, OPERATOR)
    assert sender.send(body) in (200, 202)
    if moment == "after-write":
        wait_for(lambda: read_record(site.record), 10, "the device to take the write")
    else:
        wait_for(
            lambda: (body["command_id"], "received") in site.journal(),
            10,
            "the agent to receive the command",
        )
        assert not read_record(site.record)
    assert site.agent is not None
    site.agent.kill()
    site.start_agent(gw.ws)
    report = assert_invariants(checker_for(processes, site, sender.log))
    if moment == "after-write":  # read back after the restart: the value is there
        assert report.figures["device_writes"] == 1
        assert report.figures["statuses"] == {"executed": 1}, report
    else:  # never started: the restarted agent refuses to run it late (`interrupted`)
        assert report.figures["device_writes"] == 0
        assert report.figures["statuses"] == {"failed": 1}, report


def test_projector_kill9_mid_batch_stores_every_event_once(
    processes: Processes, tmp_path: Path
) -> None:
    gw, site = deploy(processes, tmp_path, projector=False)
    proj = processes.dispatch("projector", "projector", "--batch", "20")
    dash = Dashboard(gw.ws, OPERATOR)
    for i in range(100):
        dash.send(setpoint())
        if i == 50:
            wait_for(lambda: "projector.started" in proj.log(), 20, "the projector to start")
            proj.kill()  # mid-batch: some events stored, their positions maybe not
            processes.dispatch("projector", "projector", "--batch", "20")
    assert dash.wait_answers()
    assert_invariants(checker_for(processes, site, dash.log), drain_s=40)
    dash.close()


def test_verdict_worker_kill9_while_verdicts_are_due_gives_one_each(
    processes: Processes, tmp_path: Path
) -> None:
    """A silent edge: 40 commands time out together. Verdict loops run in the projector
    and in every gateway: both die (kill -9) as the first verdict lands, and new ones
    take over."""
    port = free_port()
    gw, _ = deploy(
        processes, tmp_path, agent=False, ack_timeout_ms=1500, projector=False, gateway_port=port
    )
    enroll(processes.env, "edge_silent")
    first = processes.dispatch("projector", "projector")
    with connect(
        f"{gw.ws}/ws/edge/edge_silent",
        additional_headers={"Authorization": f"Bearer {edge_token('edge_silent')}"},
    ) as ws:
        wait_for(lambda: presence(processes.env, "edge_silent"), 10, "the silent edge online")
        sender = HttpSender(gw.http, OPERATOR)
        ids = []
        for i in range(40):
            body = setpoint("edge_silent", channel=f"C{i}")
            sender.send(body)
            ids.append(body["command_id"])
        received = 0
        while received < 40:  # every command reached the edge (and stays unacknowledged)
            if "command_id" in json.loads(ws.recv(timeout=10)):
                received += 1
        checker = checker_for(processes, None, sender.log)
        wait_for(
            lambda: checker.ledger().status(ids[0]) == "timed_out", 10, "the first verdict", 0.005
        )
        first.kill()
        gw.proc.kill()
        processes.gateway(port=port, gateway_id="gw-a")
        processes.dispatch("projector", "projector")
        report = assert_invariants(checker)
    assert report.figures["statuses"] == {"timed_out": 40}, report
