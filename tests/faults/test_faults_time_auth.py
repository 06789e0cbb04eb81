"""Clocks, pauses and credentials, then I1-I6.

- the edge's clock 5 minutes ahead or behind (libfaketime on the agent process);
- a gateway frozen with SIGSTOP while the edge moves to another gateway, then resumed;
- a user token that expires, and a control grant revoked, with commands in flight.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from faults_checker import TERMINAL
from faults_clients import Dashboard, HttpSender, setpoint
from faults_kit import (
    PrivateRedis,
    assert_invariants,
    checker_for,
    deploy,
    presence,
    stepped_wall_clock,
    wait_for,
)
from faults_proxy import Proxy

from support import DEMO_EDGE, Gateway, Processes, free_port, user_token

pytestmark = pytest.mark.slow

OPERATOR = user_token("op_time", control=[DEMO_EDGE], view=[DEMO_EDGE])


@pytest.mark.parametrize("skew", ["+5m", "-5m"])
def test_edge_clock_off_by_5_minutes_refuses_or_executes_but_never_late(
    processes: Processes, tmp_path: Path, skew: str
) -> None:
    gw, site = deploy(processes, tmp_path, agent=False)
    site.start_agent(gw.ws, faketime=skew)
    sender = HttpSender(gw.http, OPERATOR)
    short = setpoint(expiry_sec=2)  # would be "expired" (or eternal) by the edge's own clock
    normal = setpoint()
    checker = checker_for(processes, site, sender.log)
    for body in (short, normal):  # one after the other: the edge coalesces a channel's queue
        assert sender.send(body) in (200, 202)
        wait_for(
            lambda cid=body["command_id"]: checker.ledger().status(cid) in TERMINAL,
            10,
            "its verdict",
        )
    report = assert_invariants(checker)
    view = checker.ledger()
    outcome = {
        cid: (view.status(cid), [e.get("error", {}).get("code") for e in view.events[cid]][-1])
        for cid in view.events
    }
    print(f"edge clock {skew}: {outcome}")
    # Executed within the command's real lifetime (I3 above), or refused naming the
    # cause (`clock_skew`, beyond --max-clock-offset-s): never refused as `expired`
    # while the gateway's clock still gave it time.
    for status, code in outcome.values():
        assert status == "executed" or (status, code) == ("rejected", "clock_skew"), outcome
    assert report.figures["device_writes"] == report.figures["executed"]


def test_gateway_sigstopped_while_the_edge_moves_to_another(
    processes: Processes, tmp_path: Path, proxies: list[Proxy]
) -> None:
    port_a = free_port()
    proxy = Proxy(port_a)
    proxy.start()
    proxies.append(proxy)
    gw_a, site = deploy(
        processes, tmp_path, gateway_port=port_a, agent=False, ack_timeout_ms=10_000
    )
    gw_b = processes.gateway(gateway_id="gw-b")
    site.start_agent(
        f"ws://127.0.0.1:{proxy.port}", "--ping-interval-s", "1", "--ping-timeout-s", "1"
    )
    sender = HttpSender(gw_b.http, OPERATOR)
    assert sender.send(setpoint()) in (200, 202)
    gw_a.proc.popen.send_signal(signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        during = setpoint()
        assert sender.send(during) in (200, 202)  # routed to the frozen gateway's session
        proxy.target = ("127.0.0.1", gw_b.port)  # the edge's next connection lands on gw-b
        wait_for(
            lambda: (presence(processes.env, DEMO_EDGE) or "").startswith("gw-b"),
            20,
            "the edge to move to gw-b",
        )
        moved_s = time.monotonic() - stopped
        print(f"edge on gw-b {moved_s:.2f} s after gw-a froze")
        after = setpoint()
        assert sender.send(after) in (200, 202)
    finally:
        gw_a.proc.popen.send_signal(signal.SIGCONT)  # the zombie wakes up
    assert gw_a.proc.alive()
    report = assert_invariants(checker_for(processes, site, sender.log))
    assert (presence(processes.env, DEMO_EDGE) or "").startswith("gw-b")
    assert report.figures["statuses"].get("timed_out", 0) == 0, report


def _cli(processes: Processes, *args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "dispatch.cli", *args], env=processes.env, check=True, timeout=30
    )


def test_token_expiry_and_grant_revocation_with_commands_in_flight(
    processes: Processes, tmp_path: Path
) -> None:
    gw, site = deploy(processes, tmp_path, agent_args=("--cycle-period-ms", "1000"))
    # A user whose control comes from the grants store, and a token that expires in 5 s,
    # minted once the grants are in (each `dispatch grant` is a Python start-up, 15 s on
    # a loaded machine: a token minted before them expired before its command was sent).
    _cli(processes, "grant", "op_granted", DEMO_EDGE, "can_control")
    _cli(processes, "grant", "op_granted", DEMO_EDGE, "can_view")
    granted = Dashboard(gw.ws, user_token("op_granted"), name="granted")
    short = Dashboard(gw.ws, user_token("op_short", control=[DEMO_EDGE], view=[DEMO_EDGE], ttl_s=5))
    in_flight = [setpoint(), setpoint()]
    short.send(in_flight[0])
    granted.send(in_flight[1])
    assert short.wait_answers(5) and granted.wait_answers(5)
    for log, body in ((short.log, in_flight[0]), (granted.log, in_flight[1])):
        statuses = log.statuses(body["command_id"])
        assert statuses and "rejected" not in statuses, (log.answered, log.cut)
    _cli(processes, "revoke", "op_granted", DEMO_EDGE, "can_control")
    time.sleep(1.2)  # "within a second" is the documented propagation bound
    refused = setpoint()
    granted.send(refused)
    assert granted.wait_answers(5)
    assert granted.log.statuses(refused["command_id"])[-1] == "rejected"
    closed = short.closed.wait(20)  # the gateway ends the expired session
    late = setpoint()
    short.send(late)
    short.wait_answers(5)
    print(f"expired session closed: {closed}; late frame: {short.log.statuses(late['command_id'])}")
    checker = checker_for(processes, site, short.log, granted.log)
    report = assert_invariants(checker)
    view = checker.ledger()
    for body in in_flight:  # admitted before the change: they still run to their end
        assert view.status(body["command_id"]) in ("executed", "failed"), report
    # Refused before admission: an answer naming the cause, kept in the audit stream.
    assert refused["command_id"] not in view.events
    assert granted.log.answered[refused["command_id"]][-1]["error"]["code"] == "forbidden"
    assert late["command_id"] not in view.events
    granted.close()


def test_gateway_wall_clock_step_keeps_every_invariant(
    processes: Processes, tmp_path: Path
) -> None:
    """The gateway's wall clock jumps 2 minutes ahead while it serves (libfaketime reads
    the offset from a file on every call); ledger times come from Redis TIME."""
    offset = tmp_path / "faketime"
    env = stepped_wall_clock(offset)
    port = free_port()
    gw, site = deploy(processes, tmp_path, gateway_port=port, gateway_env=env)
    assert isinstance(gw, Gateway)
    sender = HttpSender(gw.http, OPERATOR)
    for _ in range(3):
        assert sender.send(setpoint()) in (200, 202)
    offset.write_text("+120\n")
    for _ in range(3):
        assert sender.send(setpoint()) in (200, 202)
        time.sleep(0.3)
    offset.write_text("+0\n")  # and back
    for _ in range(3):
        assert sender.send(setpoint()) in (200, 202)
    report = assert_invariants(checker_for(processes, site, sender.log))
    print(report.figures["statuses"])


def test_admission_after_a_redis_restart_and_a_clock_step_back_reaches_the_sender(
    processes: Processes, tmp_path: Path, private_redis: PrivateRedis
) -> None:
    """Issue 12's silent dashboard: the gateway's ledger tail waits between reconnects to a
    restarted Redis when the gateway's wall clock steps back 25 s. The new dashboard's
    command is admitted at once; its `issued` must reach it at once too, whatever the wall
    clock does (asyncio timers run on CLOCK_MONOTONIC, which a clock step never moves)."""
    clock = tmp_path / "faketime"
    private_redis.start()
    gw, site = deploy(
        processes, tmp_path, redis_url=private_redis.url, gateway_env=stepped_wall_clock(clock)
    )
    private_redis.stop()
    wait_for(lambda: "ledger.tail.reconnecting" in gw.proc.log(), 15, "the gateway's tail to retry")
    clock.write_text("-25\n")  # while the tail sleeps before its next attempt
    private_redis.start()
    dash = Dashboard(gw.ws, OPERATOR)
    body = setpoint()
    dash.send(body)
    sent = time.monotonic()
    checker = checker_for(processes, site, dash.log)
    try:
        wait_for(
            lambda: "issued" in dash.log.statuses(body["command_id"]),
            10,  # nominal < 1 s; a tail asleep on the stepped clock answers after 25 s
            "the admission to reach the dashboard",
        )
    except AssertionError as exc:
        events = checker.ledger().events.get(body["command_id"], [])
        raise AssertionError(
            f"{exc}; the ledger has {[e['status'] for e in events]}, the dashboard got "
            f"{dash.log.answered} and {dash.log.other}"
        ) from None
    print(f"issued reached the dashboard {time.monotonic() - sent:.2f} s after the send")
    clock.write_text("+0\n")
    assert_invariants(checker)
    dash.close()
