"""A hypothesis state machine over the real processes: connect / disconnect / send / ack
(a cut after delivery forces a resend) / kill / Redis restart / clock step. After every
step the safety invariants (I1, I3, I6, never a second verdict) hold; at the end of
every run, with the faults healed and the system drained, all six hold."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from faults_world import World
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

pytestmark = pytest.mark.slow


class Faults(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self._tmp = tempfile.TemporaryDirectory(prefix="faults-machine-")
        self.world = World(Path(self._tmp.name))

    @rule()
    def send_http(self) -> None:
        self.world.run("send_http")

    @rule()
    def send_ws(self) -> None:
        self.world.run("send_ws")

    @rule()
    def send_burst(self) -> None:
        for _ in range(3):
            self.world.run("send_ws")

    @precondition(lambda self: not self.world.link_is_down)
    @rule()
    def disconnect(self) -> None:
        self.world.run("link_down")

    @precondition(lambda self: self.world.link_is_down)
    @rule()
    def connect(self) -> None:
        self.world.run("link_up")

    @rule()
    def cut_before_ack(self) -> None:
        self.world.run("link_cut")

    @rule()
    def kill_agent(self) -> None:
        self.world.run("kill_agent")

    @rule()
    def kill_gateway(self) -> None:
        self.world.run("kill_gateway")

    @rule()
    def restart_redis(self) -> None:
        self.world.run("restart_redis")

    @rule()
    def clock_step(self) -> None:
        self.world.run("clock_step")

    @invariant()
    def safety_holds(self) -> None:
        report = self.world.safety()
        assert report.ok, report

    def teardown(self) -> None:
        try:
            report = self.world.settle()
            print(f"{self.world.counts}\n{' '.join(self.world.history)}\n{report}")
            if not report.ok:
                keep = Path(tempfile.mkdtemp(prefix="faults-machine-failed-"))
                for proc in self.world.processes.procs:
                    (keep / proc.log_path.name).write_text(proc.log())
                print(f"process logs kept in {keep}")
            assert report.ok, report
        finally:
            self.world.close()
            self._tmp.cleanup()


Faults.TestCase.settings = settings(
    max_examples=4,
    stateful_step_count=10,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
test_faults_state_machine = pytest.mark.skipif(
    os.environ.get("DISPATCH_FAULTS_MACHINE") != "1",
    reason="4 runs x 10 steps over real processes take 30 s on a quiet machine and up to 175 s "
    "at load 11, and the fault suite alone is past its 4 min in `make test`: run by "
    "`make chaos`, or set DISPATCH_FAULTS_MACHINE=1",
)(Faults.TestCase)
