"""The long scenarios, run side by side, then I1-I6 for each.

Each is mostly waiting (an outage of a minute, a keepalive running out), so the module
starts every selected scenario at once, each on its own deployment (own namespace,
schema, ports), and each test waits for its own and checks it:

- PostgreSQL down for a full minute under traffic: the gateway and the projector reach
  it through a proxy that refuses every connection meanwhile;
- a black-holed edge link that only the gateway can notice (the agent frozen with
  SIGSTOP meanwhile): the gateway's own half-open detection time, against its
  keepalive bound.

The 2,000-command slow-link burst stays serial (test_faults_network.py): it keeps both
cores busy and, run beside these, the starved agent missed 3 s ack deadlines.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from faults_checker import Checker, Report
from faults_clients import Dashboard, HttpSender, setpoint
from faults_kit import checker_for, deploy, presence, stop_together, wait_for
from faults_proxy import Proxy
from faults_world import fresh_env

from support import (
    DATABASE_URL,
    DEMO_EDGE,
    REDIS_URL,
    Processes,
    drop_namespace,
    free_port,
    user_token,
)

pytestmark = pytest.mark.slow

OPERATOR = user_token("op_long", control=[DEMO_EDGE], view=[DEMO_EDGE])
# The gateway's WebSocket keepalive (gateway/cli.py: uvicorn ws_ping_interval and
# ws_ping_timeout): a link that stopped answering is closed within both after its last pong.
GATEWAY_PING_INTERVAL_S = 20.0
GATEWAY_PING_TIMEOUT_S = 20.0
OUTAGE_S = 60.0
# Deployments come up one at a time (a dozen Python start-ups at once starve a 2-core
# machine); the long waits that follow overlap.
_STARTUP = threading.Lock()


@dataclass
class Outcome:
    """What a scenario measured, and its checker report after the drain."""

    report: Report
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass
class Stage:
    """One scenario's own deployment: processes, proxies, and the logs to show on failure."""

    processes: Processes
    root: Path
    proxies: list[Proxy] = field(default_factory=list)

    def proxy(self, port: int) -> Proxy:
        proxy = Proxy(port)
        proxy.start()
        self.proxies.append(proxy)
        return proxy

    def close(self) -> None:
        stop_together(self.processes.procs)
        for proxy in self.proxies:
            proxy.stop()

    def logs(self) -> str:
        return "\n".join(
            f"----- {p.name} log -----\n{p.log()[-3000:]}" for p in self.processes.procs
        )


def _drained(checker: Checker, drain_s: float) -> Report:
    took = checker.drain(drain_s)
    report = checker.check()
    report.figures["drained_s"] = round(took, 1)
    return report


# -- the scenarios -------------------------------------------------------------------------
def postgresql_down_for_a_minute(stage: Stage) -> Outcome:
    pg_port = int(DATABASE_URL.rsplit(":", 1)[1].split("/")[0])
    proxy = stage.proxy(pg_port)
    via_proxy = {"DISPATCH_DATABASE_URL": f"postgresql://127.0.0.1:{proxy.port}/test"}
    with _STARTUP:
        gw, site = deploy(stage.processes, stage.root, projector=False, gateway_env=via_proxy)
        proj = stage.processes.dispatch("projector", "projector", env=via_proxy)
        wait_for(lambda: "projector.started" in proj.log(), 60, "the projector to start")
    dash, sender = Dashboard(gw.ws, OPERATOR), HttpSender(gw.http, OPERATOR)
    for _ in range(5):
        dash.send(setpoint())
    proxy.refuse(True)  # every PostgreSQL connection reset, none accepted
    down = time.monotonic()
    sent = 0
    while time.monotonic() - down < OUTAGE_S:  # traffic spread over the whole minute
        dash.send(setpoint())
        if sent % 4 == 0:
            sender.send(setpoint())
        sent += 1
        time.sleep(0.5)  # the pace of the traffic, not a synchronisation
    noticed = "projector.postgres.unavailable" in proj.log()
    proxy.refuse(False)
    outage_s = time.monotonic() - down
    back = time.monotonic()
    answered = dash.wait_answers(30)
    checker = checker_for(stage.processes, site, dash.log, sender.log)
    report = _drained(checker, 90)
    dash.close()
    return Outcome(
        report,
        {
            "outage_s": round(outage_s, 1),
            "noticed": noticed,
            "answered": answered,
            "stored_after_s": round(time.monotonic() - back, 1),
            "gateway_alive": gw.proc.alive(),
            "projector_alive": proj.alive(),
        },
    )


def gateway_detects_a_black_holed_edge(stage: Stage) -> Outcome:
    gw_port = free_port()
    proxy = stage.proxy(gw_port)
    with _STARTUP:
        # The ack deadline outlasts the detection (20-40 s): the command sent into the dead
        # link must come back to the edge once it reconnects, not time out meanwhile.
        gw, site = deploy(
            stage.processes, stage.root, gateway_port=gw_port, agent=False, ack_timeout_ms=90_000
        )
        agent = site.start_agent(f"ws://127.0.0.1:{proxy.port}")
    closed_before = gw.proc.log().count("edge.session.closed")
    sender = HttpSender(gw.http, OPERATOR)
    # The link black-holes and the agent is frozen with it: its own keepalive (at most 30 s,
    # the agent refuses more) would otherwise notice first and reconnect, and this measures
    # the gateway's detection alone.
    proxy.blackhole(True)
    agent.popen.send_signal(signal.SIGSTOP)
    started = time.monotonic()
    try:
        body = setpoint()
        assert sender.send(body) in (200, 202)  # routed into the dead link
        wait_for(
            lambda: gw.proc.log().count("edge.session.closed") > closed_before,
            GATEWAY_PING_INTERVAL_S + GATEWAY_PING_TIMEOUT_S + 30,
            "the gateway to close the dead edge session",
            interval_s=0.1,
        )
        detected_s = time.monotonic() - started
        offline = presence(stage.processes.env, DEMO_EDGE) is None
    finally:
        agent.popen.send_signal(signal.SIGCONT)
    proxy.blackhole(False)
    proxy.cut()  # the agent's swallowed connection ends; its reconnect goes through
    wait_for(lambda: presence(stage.processes.env, DEMO_EDGE), 30, "the agent back")
    report = _drained(checker_for(stage.processes, site, sender.log), 40)
    return Outcome(report, {"detected_s": round(detected_s, 1), "offline_at_close": offline})


SCENARIOS: dict[str, Callable[[Stage], Outcome]] = {
    "test_postgresql_down_for_a_minute_under_traffic_stores_everything_once": (
        postgresql_down_for_a_minute
    ),
    "test_gateway_detects_a_black_holed_edge_link_within_its_keepalive_bound": (
        gateway_detects_a_black_holed_edge
    ),
}


@dataclass
class Running:
    stage: Stage
    future: Future[Outcome]

    def outcome(self) -> Outcome:
        try:
            outcome = self.future.result(timeout=280)
        except BaseException:
            print(self.stage.logs())
            raise
        print(f"{outcome.figures}\n{outcome.report}")
        if not outcome.report.ok:
            print(self.stage.logs())
        return outcome


@pytest.fixture(scope="module")
def running(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Running]]:
    """Every scenario of this module that is selected, started at once in its own thread."""
    selected = {
        item.originalname
        for item in request.session.items
        if isinstance(item, pytest.Function) and item.module is request.module
    }
    pool = ThreadPoolExecutor(max_workers=len(SCENARIOS), thread_name_prefix="scenario")
    started: dict[str, Running] = {}
    namespaces = []
    for name, scenario in SCENARIOS.items():
        if name not in selected:
            continue
        namespace = f"t{uuid.uuid4().hex[:10]}"
        namespaces.append(namespace)
        root = tmp_path_factory.mktemp(name[5:40])
        stage = Stage(Processes(fresh_env(namespace, root, REDIS_URL), root), root)
        started[name] = Running(stage, pool.submit(scenario, stage))
    yield started
    for run in started.values():
        run.future.cancel()
    pool.shutdown(wait=True)
    for run in started.values():
        run.stage.close()
    for namespace in namespaces:
        drop_namespace(namespace)


@pytest.fixture
def outcome(request: pytest.FixtureRequest, running: dict[str, Running]) -> Outcome:
    """This test's scenario (started with the module), waited for."""
    assert isinstance(request.node, pytest.Function)
    return running[request.node.originalname].outcome()


# -- the tests -------------------------------------------------------------------------------
def test_postgresql_down_for_a_minute_under_traffic_stores_everything_once(
    outcome: Outcome,
) -> None:
    figures = outcome.figures
    assert outcome.report.ok, outcome.report
    assert figures["outage_s"] >= OUTAGE_S
    assert figures["noticed"], "the projector never reported PostgreSQL unavailable"
    assert figures["answered"] and figures["gateway_alive"] and figures["projector_alive"]


def test_gateway_detects_a_black_holed_edge_link_within_its_keepalive_bound(
    outcome: Outcome,
) -> None:
    assert outcome.report.ok, outcome.report
    assert outcome.report.figures["statuses"] == {"executed": 1}, outcome.report
    # A ping goes out at most GATEWAY_PING_INTERVAL_S after the last pong and the session
    # closes GATEWAY_PING_TIMEOUT_S later; 5 s for a loaded 2-core machine.
    bound_s = GATEWAY_PING_INTERVAL_S + GATEWAY_PING_TIMEOUT_S + 5
    assert outcome.figures["detected_s"] <= bound_s, outcome.figures
    assert outcome.figures["offline_at_close"], "the edge still looked online after the close"
