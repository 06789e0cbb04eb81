"""Redis faults under traffic, with the real agent and the recording device: SIGTERM and
kill -9 of a Redis with AOF `always`, restarted after 1 s and 6 s while dashboards and an
HTTP client keep sending. Afterwards the checker must find I1-I6 intact."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest
from faults_clients import Dashboard, HttpSender, setpoint
from faults_kit import PrivateRedis, assert_invariants, checker_for, deploy

from support import DEMO_EDGE, Processes, user_token

pytestmark = pytest.mark.slow

OPERATOR = user_token("op_faults", control=[DEMO_EDGE], view=[DEMO_EDGE])


def test_quiet_traffic_holds_every_invariant(processes: Processes, tmp_path: Path) -> None:
    """The baseline the checker is calibrated on: no fault, 20 setpoints, all invariants."""
    gw, site = deploy(processes, tmp_path)
    dash, sender = Dashboard(gw.ws, OPERATOR), HttpSender(gw.http, OPERATOR)
    for i in range(20):
        (dash if i % 2 else sender).send(setpoint())
    assert dash.wait_answers()
    checker = checker_for(processes, site, dash.log, sender.log)
    took = checker.drain(30)
    report = checker.check()
    print(f"drained in {took:.1f} s\n{report}")
    assert report.ok, report
    statuses = report.figures["statuses"]
    # The edge coalesces: a setpoint overtaken in its queue ends `failed` (superseded).
    assert statuses["executed"] + statuses.get("failed", 0) == 20
    assert report.figures["device_writes"] == statuses["executed"]
    dash.close()
    # The checker sees a doubled write (I1) and an unanswered frame (I5) when there is one.
    with site.record.open("a") as record:
        record.write(site.record.read_text().splitlines()[-1] + "\n")
    dash.log.sent["cmd_never_answered"] = 0.0
    checker.check_audit = False  # I4 was just proven; this run is about I1 and I5
    broken = checker.check()
    assert broken.violations["I1"] and broken.violations["I5"], broken


def _traffic(stop: threading.Event, client: Dashboard | HttpSender, period_s: float) -> None:
    """Send a setpoint every period until stopped (an HTTP send waits for its answer)."""
    while not stop.is_set():
        client.send(setpoint())
        stop.wait(period_s)


@pytest.mark.parametrize(
    ("sig", "outage_s"),
    [
        pytest.param(signal.SIGTERM, 1.0, id="sigterm-1s"),
        pytest.param(signal.SIGTERM, 6.0, id="sigterm-6s"),
        pytest.param(signal.SIGKILL, 1.0, id="kill9-1s"),
        pytest.param(signal.SIGKILL, 6.0, id="kill9-6s"),
    ],
)
def test_redis_restart_under_traffic_loses_and_doubles_nothing(
    processes: Processes,
    tmp_path: Path,
    private_redis: PrivateRedis,
    sig: int,
    outage_s: float,
) -> None:
    private_redis.start()
    gw, site = deploy(processes, tmp_path, redis_url=private_redis.url)
    dash, sender = Dashboard(gw.ws, OPERATOR), HttpSender(gw.http, OPERATOR)
    stop = threading.Event()
    loads = [
        threading.Thread(target=_traffic, args=(stop, client, 0.1), daemon=True)
        for client in (dash, sender)
    ]
    for load in loads:
        load.start()
    time.sleep(1.0)  # traffic flowing before the fault (not synchronisation)
    private_redis.stop(sig)
    stopped = time.monotonic()
    time.sleep(outage_s)  # the outage itself is the scenario's length, not a wait
    private_redis.start()
    print(f"redis down {time.monotonic() - stopped:.1f} s")
    time.sleep(1.5)  # traffic after the restart
    stop.set()
    for load in loads:
        load.join(30)
    dash.wait_answers(15)
    checker = checker_for(processes, site, dash.log, sender.log)
    took = checker.drain(25)
    report = checker.check()
    print(f"drained in {took:.1f} s\n{report}")
    assert report.ok, report


def test_frame_sent_right_after_a_redis_restart_is_answered(
    processes: Processes, tmp_path: Path, private_redis: PrivateRedis
) -> None:
    """Found by the state machine: Redis restarted (SIGTERM, back at once), then a new
    dashboard sends one setpoint."""
    private_redis.start()
    gw, site = deploy(processes, tmp_path, redis_url=private_redis.url)
    logs = []
    for _ in range(3):
        private_redis.stop()
        private_redis.start()
        dash = Dashboard(gw.ws, OPERATOR, name=f"dashboard-{len(logs)}")
        logs.append(dash.log)
        dash.send(setpoint())
        dash.wait_answers(10)
    assert_invariants(checker_for(processes, site, *logs))
