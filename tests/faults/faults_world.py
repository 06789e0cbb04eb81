"""A whole deployment that faults can be thrown at, one operation at a time.

Private Redis (AOF `always`) -> gateway (its wall clock steerable through libfaketime)
-> TCP proxy -> real edge agent -> recording device, plus a projector, a dashboard and an
HTTP client. Used by the hypothesis state machine (`test_faults_machine.py`) and by the
randomized soak (`chaos.py`, `make chaos`).
"""

from __future__ import annotations

import os
import random
import time
import uuid
from pathlib import Path

from faults_checker import Checker, Report
from faults_clients import Dashboard, FrameLog, HttpSender, setpoint
from faults_kit import (
    PrivateRedis,
    checker_for,
    deploy,
    presence,
    stepped_wall_clock,
    stop_together,
)
from faults_proxy import Proxy

from dispatch.tokens import sign, user_claims

from support import (
    DATABASE_URL,
    DEMO_EDGE,
    SECRET,
    Gateway,
    Processes,
    drop_namespace,
    free_port,
    wait_until,
)

# Issued a minute before the run, as an operator's session token is: the gateway's clock
# is stepped back up to 25 s, beyond the 10 s leeway, and then rightly refuses a token
# minted that instant as not yet valid (HTTP 401), which is not what the soak is about.
OPERATOR = sign(
    user_claims("op_world", [DEMO_EDGE], [DEMO_EDGE], 7200, now=int(time.time()) - 60), SECRET
)


def fresh_env(namespace: str, root: Path, redis_url: str) -> dict[str, str]:
    """What the `env` fixture gives a test (own namespace and schema), outside pytest."""
    unlimited = {
        f"DISPATCH_RATE_{scope}_{kind}": "100000"
        for scope in ("USER", "EDGE", "GLOBAL")
        for kind in ("PER_S", "BURST")
    }
    return {
        **os.environ,
        "DISPATCH_NAMESPACE": namespace,
        "DISPATCH_JWT_SECRET": SECRET,
        "DISPATCH_REDIS_URL": redis_url,
        "DISPATCH_DATABASE_URL": DATABASE_URL,
        "DISPATCH_PARTITIONS": "4",
        "XDG_STATE_HOME": str(root / "state"),
        "PYTHONUNBUFFERED": "1",
        **unlimited,
    }


class World:
    OPERATIONS = (
        "send_http",
        "send_ws",
        "link_down",
        "link_up",
        "link_cut",
        "kill_agent",
        "kill_gateway",
        "restart_redis",
        "clock_step",
    )

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.namespace = f"t{uuid.uuid4().hex[:10]}"
        self.redis = PrivateRedis(free_port(), root / "redis").start()
        self.processes = Processes(fresh_env(self.namespace, root, self.redis.url), root)
        self.clock = root / "faketime"
        self.clock_s = 0
        self.gateway_env = stepped_wall_clock(self.clock)
        self.gw_port = free_port()
        self.proxy = Proxy(self.gw_port)
        self.proxy.start()
        self.gw, self.site = deploy(
            self.processes,
            root,
            redis_url=self.redis.url,
            gateway_port=self.gw_port,
            agent=False,
            ack_timeout_ms=10_000,
            gateway_env=self.gateway_env,
        )
        self.start_agent()
        self.logs: list[FrameLog] = []
        self.sender = HttpSender(self.gw.http, OPERATOR, name="http")
        self.logs.append(self.sender.log)
        self.dash: Dashboard | None = None
        self.link_is_down = False
        self.counts: dict[str, int] = dict.fromkeys(self.OPERATIONS, 0)
        self.history: list[str] = []  # every operation run, in order (to replay a failure)

    # -- operations ----------------------------------------------------------------------
    def start_agent(self) -> None:
        self.site.start_agent(
            f"ws://127.0.0.1:{self.proxy.port}",
            "--ping-interval-s", "1", "--ping-timeout-s", "1",
            wait=False,
        )  # fmt: skip

    def send_http(self) -> None:
        self.sender.send(setpoint(), timeout_s=20)

    def send_ws(self) -> None:
        if self.dash is None or self.dash.closed.is_set():
            self.dash = Dashboard(self.gw.ws, OPERATOR, name=f"dashboard-{len(self.logs)}")
            self.logs.append(self.dash.log)
        self.dash.send(setpoint())

    def link_down(self) -> None:
        self.proxy.refuse(True)
        self.link_is_down = True

    def link_up(self) -> None:
        self.proxy.refuse(False)
        self.link_is_down = False

    def link_cut(self) -> None:
        self.proxy.cut()

    def kill_agent(self) -> None:
        assert self.site.agent is not None
        self.site.agent.kill()
        self.start_agent()

    def kill_gateway(self) -> None:
        self.gw.proc.kill()
        proc = self.processes.dispatch(
            "gateway", "gateway", "--port", str(self.gw_port), "--gateway-id", "gw-a",
            env=self.gateway_env,
        )  # fmt: skip
        self.gw = Gateway(proc, self.gw_port)
        self.gw.wait_ready(30)

    def restart_redis(self) -> None:
        self.redis.stop()  # SIGTERM: AOF flushed; the restart follows at once
        self.redis.start()

    def clock_step(self, seconds: int | None = None) -> None:
        """Step the gateway's wall clock (forward or back), within the edge's tolerance."""
        step = seconds if seconds is not None else random.choice((-20, -5, 5, 20))
        self.clock_s = max(-25, min(25, self.clock_s + step))
        self.clock.write_text(f"{self.clock_s:+d}\n")
        if self.history and self.history[-1] == "clock_step":
            self.history[-1] += f"({self.clock_s:+d})"

    def run(self, operation: str) -> None:
        self.counts[operation] += 1
        self.history.append(operation)
        getattr(self, operation)()

    # -- checks --------------------------------------------------------------------------
    @property
    def checker(self) -> Checker:
        return checker_for(self.processes, self.site, *self.logs)

    def safety(self) -> Report:
        """I1, I3, I6 and "never a second verdict", without waiting for anything."""
        return self.checker.check(final=False)

    def settle(self, drain_s: float = 40) -> Report:
        """Heal every fault, drain, and check all six invariants."""
        self.link_up()
        self.clock.write_text("+0\n")
        if self.site.agent is not None and not self.site.agent.alive():
            self.start_agent()
        wait_until(lambda: presence(self.processes.env, DEMO_EDGE), 30, what="the edge back")
        if self.dash is not None:
            self.dash.wait_answers(10)
        checker = self.checker
        checker.drain(drain_s)
        return checker.check()

    def close(self) -> None:
        if self.dash is not None:
            self.dash.close()
        stop_together(self.processes.procs)
        self.proxy.stop()
        self.redis.kill()
        drop_namespace(self.namespace)  # its PostgreSQL schema and roles
