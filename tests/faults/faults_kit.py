"""Real processes for the fault scenarios: a recording device with the real agent, a
private redis-server with AOF that can be stopped, killed and restarted, and waits."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import redis
from faults_checker import Checker, Report
from faults_clients import FrameLog

from config.settings import Settings
from edge.journal import JOURNAL_FILE, Journal, read_log
from ledger.keys import Keys

from support import DEMO_EDGE, Gateway, Proc, Processes, edge_token, free_port, wait_until


def spawn(
    processes: Processes, name: str, argv: list[str], env: dict[str, str] | None = None
) -> Proc:
    """Any command as a managed process (stopped at teardown, log shown on failure)."""
    log_path = processes.log_dir / f"{name}-{len(processes.procs)}.log"
    with log_path.open("wb") as out:
        popen = subprocess.Popen(
            argv, env={**processes.env, **(env or {})}, stdout=out, stderr=subprocess.STDOUT
        )
    proc = Proc(name, popen, log_path)
    processes.procs.append(proc)
    return proc


def stop_together(procs: list[Proc], timeout_s: float = 10) -> None:
    """SIGTERM every process at once, then wait for each (SIGKILL after `timeout_s`).

    One after the other, a teardown waited for each graceful shutdown in turn (a gateway
    alone takes a few seconds to close its sockets): together, the slowest sets the pace.
    """
    for proc in procs:
        if proc.alive():
            proc.popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.popen.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait(5)


def keys(env: dict[str, str]) -> Keys:
    s = Settings.from_env(env)
    return Keys(s.namespace, s.partitions)


def enroll(env: dict[str, str], *edges: str) -> None:
    client = redis.Redis.from_url(env["DISPATCH_REDIS_URL"])
    client.sadd(keys(env).edges(), *edges)
    client.close()


def presence(env: dict[str, str], edge_id: str) -> str | None:
    client = redis.Redis.from_url(env["DISPATCH_REDIS_URL"])
    try:
        value = client.get(keys(env).presence(edge_id))
        return value.decode() if value else None
    except redis.ConnectionError:
        return None
    finally:
        client.close()


def wait_port(port: int, proc: Proc, timeout_s: float = 15) -> None:
    def listening() -> bool:
        assert proc.alive(), proc.log()
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_until(listening, timeout_s, interval_s=0.05, what=f"port {port}")


@dataclass
class RecordingSite:
    """The demo edge: the recording BMS and `dispatch edge` (optionally under faketime)."""

    processes: Processes
    root: Path
    edge_id: str = DEMO_EDGE
    bms_port: int = 0
    device: Proc | None = None
    agent: Proc | None = None

    @property
    def record(self) -> Path:
        return self.root / "device-writes.jsonl"

    @property
    def state_dir(self) -> Path:
        return self.root / "edge-state"

    def start_device(self, *extra: str, wait: bool = True) -> RecordingSite:
        self.bms_port = self.bms_port or free_port()
        self.device = spawn(
            self.processes,
            "bms",
            [sys.executable, "-m", "edge.recording_device", "--port", str(self.bms_port),
             "--record", str(self.record), *extra],
        )  # fmt: skip
        if wait:
            self.wait_device()
        return self

    def wait_device(self) -> None:
        assert self.device is not None
        wait_port(self.bms_port, self.device)

    def start_agent(
        self, gateway_ws: str, *extra: str, faketime: str | None = None, wait: bool = True
    ) -> Proc:
        # The library, not the `faketime` wrapper: the wrapper does not pass SIGTERM on,
        # so its agent outlived the test.
        clock = (
            {"LD_PRELOAD": LIBFAKETIME, "FAKETIME": faketime, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
            if faketime
            else None
        )
        self.agent = spawn(
            self.processes,
            "agent",
            [sys.executable, "-m", "dispatch.cli", "edge",
             "--edge-id", self.edge_id, "--gateway", gateway_ws,
             "--token", edge_token(self.edge_id),
             "--modbus", f"bms_main=127.0.0.1:{self.bms_port}",
             "--state-dir", str(self.state_dir),
             "--cycle-period-ms", "50", "--backoff-max-s", "0.5", *extra],
            env=clock,
        )  # fmt: skip
        if wait:
            agent = self.agent
            wait_until(
                lambda: presence(self.processes.env, self.edge_id) or not agent.alive(),
                60,  # a bound: start-ups stretch on the loaded machine
                interval_s=0.05,
                what="the agent to connect",
            )
            assert agent.alive(), agent.log()
        return self.agent

    def journal(self) -> list[tuple[str, str]]:
        path = self.state_dir / JOURNAL_FILE
        if not path.exists():
            return []
        db = Journal.open_readonly(path)
        try:
            return [(e.command_id, e.event) for e in read_log(db, limit=100_000)]
        finally:
            db.close()


# -- a wall clock that can be stepped ----------------------------------------------------------
LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"


def stepped_wall_clock(offset_file: Path, offset: str = "+0") -> dict[str, str]:
    """The environment of a process whose wall clock is off by what `offset_file` says
    ("+20", "-5": seconds, re-read on every call, so writing the file steps the clock).

    Only the wall clock moves. libfaketime fakes CLOCK_MONOTONIC as well unless told not
    to, and then a step back of N seconds postponed every asyncio timer of the process
    by N seconds (a Redis reconnect backoff of 0.5 s became 25 s): a fault no deployment
    has, since NTP or an operator stepping the clock never moves CLOCK_MONOTONIC.
    """
    offset_file.write_text(f"{offset}\n")
    return {
        "LD_PRELOAD": LIBFAKETIME,
        "FAKETIME_TIMESTAMP_FILE": str(offset_file),
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }


# -- a private Redis that can be stopped ------------------------------------------------------
@dataclass
class PrivateRedis:
    port: int
    data: Path
    fsync: str = "always"
    server: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *extra: str) -> PrivateRedis:
        self.data.mkdir(parents=True, exist_ok=True)
        self.server = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.data), "--appendonly", "yes", "--appendfsync", self.fsync,
             "--save", "", "--maxmemory-policy", "noeviction", *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port)
        wait_until(lambda: _pings(client), 10, what="redis-server to start")
        client.close()
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.send_signal(sig)
            self.server.wait(15)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.02):  # type: ignore[no-untyped-def]
    """wait_until with a finer default interval (scenario timings are in ms)."""
    return wait_until(predicate, timeout_s, interval_s=interval_s, what=what)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# -- a whole deployment ------------------------------------------------------------------------
def deploy(
    processes: Processes,
    root: Path,
    *,
    redis_url: str | None = None,
    ack_timeout_ms: int = 3000,
    projector: bool = True,
    agent: bool = True,
    agent_args: tuple[str, ...] = (),
    gateway_port: int | None = None,
    gateway_env: dict[str, str] | None = None,
) -> tuple[Gateway, RecordingSite]:
    """Gateway `gw-a`, a projector, the recording device and the real agent."""
    if redis_url:
        processes.env["DISPATCH_REDIS_URL"] = redis_url
    processes.env["DISPATCH_ACK_TIMEOUT_MS"] = str(ack_timeout_ms)
    enroll(processes.env, DEMO_EDGE)
    port = gateway_port or free_port()
    # Gateway, projector and device start side by side: each is a Python start-up of a
    # second or more on a loaded machine, and none needs another to come up.
    proc = processes.dispatch(
        "gateway", "gateway", "--port", str(port), "--gateway-id", "gw-a", env=gateway_env
    )
    if projector:
        processes.dispatch("projector", "projector")
    site = RecordingSite(processes, root).start_device(wait=False)
    gw = Gateway(proc, port)
    gw.wait_ready(60)  # a bound, not a wait: start-ups stretch on the shared 2-core machine
    site.wait_device()
    if agent:
        site.start_agent(gw.ws, *agent_args)
    return gw, site


def checker_for(processes: Processes, site: RecordingSite | None, *logs: FrameLog) -> Checker:
    def alarms() -> str:
        return "".join(p.log() for p in processes.procs)

    records = {(site.edge_id, "bms_main"): site.record} if site else {}
    return Checker(processes.env, device_records=records, frames=list(logs), alarm_text=alarms)


def assert_invariants(checker: Checker, drain_s: float = 25) -> Report:
    took = checker.drain(drain_s)
    report = checker.check()
    print(f"drained in {took:.1f} s\n{report}")
    assert report.ok, report
    return report
