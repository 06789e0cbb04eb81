"""`dispatch demo`: the whole system on one machine until Ctrl-C.

Starts the gateway, the projector, the demo site's simulated BMS and its edge agent as
child processes, waits until each is up, prints the dashboard URL and an operator
token, and stops everything it started on Ctrl-C (or when any child dies).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from config.settings import Settings
from dispatch.tokens import edge_claims, enroll, sign, user_claims

DEMO_EDGE = "site1_edge_prod"
DEMO_DEVICE = "bms_main"
DEMO_USER = "operator"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{' '.join(map(str, proc.args))} exited with {proc.returncode}")  # type: ignore[arg-type]
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


def wait_http(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except Exception:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout_s} s")


class Children:
    """Child processes started by the demo; stopped in reverse order."""

    def __init__(self, log_dir: Path) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, *args: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        out = (self.log_dir / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "dispatch.cli", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        self.procs.append((name, proc))
        return proc

    def dead(self) -> str | None:
        return next((name for name, p in self.procs if p.poll() is not None), None)

    def interrupted(self, name: str) -> bool:
        """The child ended as a Ctrl-C ends it (uvicorn exits 0 after a SIGINT)."""
        code = next(p.returncode for n, p in self.procs if n == name)
        return code in (0, -signal.SIGINT, 128 + signal.SIGINT, -signal.SIGTERM)

    def stop(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for _, proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def cmd_demo(args: argparse.Namespace) -> int:
    settings = Settings.from_env().with_overrides(port=args.port)
    env = dict(os.environ, DISPATCH_JWT_SECRET=settings.jwt_secret)
    state = Path(args.state_dir)
    children = Children(state / "logs")
    modbus_port = args.modbus_port or free_port()
    gateway = f"http://{settings.host}:{settings.port}"
    try:
        children.start(
            "gateway", "gateway", "--host", settings.host, "--port", str(settings.port), env=env
        )
        wait_http(f"{gateway}/healthz", 30)
        children.start("projector", "projector", env=env)
        sim = children.start("simulator", "simulate-device", "--port", str(modbus_port), env=env)
        wait_for_port(modbus_port, 15, sim)
        edge_token = sign(edge_claims(DEMO_EDGE, 365 * 86_400), settings.edge_secret)
        asyncio.run(enroll(settings, DEMO_EDGE))
        children.start(
            "edge",
            "edge",
            "--edge-id",
            DEMO_EDGE,
            "--gateway",
            f"ws://{settings.host}:{settings.port}",
            "--modbus",
            f"{DEMO_DEVICE}=127.0.0.1:{modbus_port}",
            "--state-dir",
            str(state / "edge"),
            env={**env, "DISPATCH_EDGE_TOKEN": edge_token},  # not in the process list
        )
        token = sign(user_claims(DEMO_USER, [DEMO_EDGE], [], 12 * 3600), settings.jwt_secret)
        print(
            f"""
Command Dispatch demo is running (logs in {children.log_dir}).

  Console:        {gateway}/   (sign in with the operator token below)
  Operator token: {token}
  Demo site:      edge {DEMO_EDGE}, device {DEMO_DEVICE} (Modbus TCP 127.0.0.1:{modbus_port})

Try:  curl -s -X POST {gateway}/api/commands -H "Authorization: Bearer $TOKEN" \\
        -d '{{"command_id":"demo-1","command_type":"setpoint","target":{{"edge_id":"{DEMO_EDGE}","device_id":"{DEMO_DEVICE}","channel":"SetActivePower"}},"value":50000,"unit":"W","expiry_sec":300,"source":"{DEMO_USER}","timestamp":"'$(date -u +%Y-%m-%dT%H:%M:%SZ)'"}}'

Press Ctrl-C to stop everything.""",
            flush=True,
        )
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        while not stop.wait(0.5):
            dead = children.dead()
            if dead is None:
                continue
            # A terminal's Ctrl-C reaches the children too, and one may exit before our
            # own handler has run: that is a normal stop, not a crash.
            if stop.wait(1.0) or children.interrupted(dead):
                break
            print(
                f"dispatch demo: {dead} stopped unexpectedly; see {children.log_dir}/{dead}.log",
                file=sys.stderr,
            )
            return 1
        print("\nstopping the demo...", flush=True)
        return 0
    except KeyboardInterrupt:
        print("\nstopping the demo...", flush=True)
        return 0
    except RuntimeError as exc:
        print(f"dispatch demo: {exc}; see {children.log_dir}", file=sys.stderr)
        return 1
    finally:
        children.stop()


def register(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="run gateway, projector, simulated BMS and edge agent together",
        description="Run the whole system locally until Ctrl-C (Redis and PostgreSQL must "
        "be reachable; `make demo` makes sure they are).",
    )
    p.add_argument("--port", type=int, help="gateway port (default DISPATCH_PORT or 8000)")
    p.add_argument("--modbus-port", type=int, help="simulated BMS port (default: a free one)")
    p.add_argument(
        "--state-dir", default=".local/demo", help="logs and edge state (default .local/demo)"
    )
    p.set_defaults(func=cmd_demo)
