"""Helpers shared by the test suite: real processes, real sockets, tokens, commands."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import redis
from psycopg import sql

from dispatch.tokens import edge_claims, sign, user_claims

SECRET = "test-secret-for-command-dispatch-0123456789abcdef"
REDIS_URL = os.environ.get("DISPATCH_REDIS_URL", "redis://127.0.0.1:6379/0")
DATABASE_URL = os.environ.get("DISPATCH_DATABASE_URL", "postgresql://127.0.0.1:5432/test")
DEMO_EDGE = "site1_edge_prod"


# Ports for the servers tests start. Each pytest process walks a block of its own (xdist
# workers get disjoint blocks, below the kernel's ephemeral range from 32768): with the
# kernel's `bind(0)`, two workers asking at once were once handed the same port, and one
# worker's readiness check reached the other worker's gateway.
_PORTS_FROM, _PORTS_PER_PROCESS, _BLOCKS = 10_000, 2_000, 5
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1"... ("" without xdist)
_BLOCK = (int(_WORKER[2:]) + 1) % _BLOCKS if _WORKER[2:].isdigit() else 0
_FIRST_PORT = _PORTS_FROM + _BLOCK * _PORTS_PER_PROCESS
_next_ports = itertools.cycle(range(_FIRST_PORT, _FIRST_PORT + _PORTS_PER_PROCESS))


def free_port() -> int:
    """A loopback port nothing listens on now, from this process's own block."""
    for _ in range(_PORTS_PER_PROCESS):
        port = next(_next_ports)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # a service of the machine, or still held by an earlier test
        return port
    raise RuntimeError(f"no free port in {_FIRST_PORT}..{_FIRST_PORT + _PORTS_PER_PROCESS - 1}")


def user_token(
    user: str = "user_456",
    control: list[str] | None = None,
    view: list[str] | None = None,
    ttl_s: int = 3600,
) -> str:
    return sign(user_claims(user, control or [], view or [], ttl_s), SECRET)


def edge_token(edge_id: str, ttl_s: int = 3600) -> str:
    return sign(edge_claims(edge_id, ttl_s), SECRET)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def command(
    command_id: str | None = None,
    *,
    edge_id: str = DEMO_EDGE,
    device_id: str = "bms_main",
    channel: str = "SetActivePower",
    value: Any = 50000,
    **extra: Any,
) -> dict[str, Any]:
    """The specification's example command, with a fresh id and timestamp."""
    body: dict[str, Any] = {
        "command_id": command_id or f"cmd_{uuid.uuid4().hex[:12]}",
        "command_type": "setpoint",
        "target": {"edge_id": edge_id, "device_id": device_id, "channel": channel},
        "value": value,
        "unit": "W",
        "expiry_sec": 300,
        "source": "user_456",
        "timestamp": now_iso(),
    }
    body.update(extra)
    return body


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_log(self, text: str, timeout_s: float = 10) -> str:
        """The log once it holds `text`: a process logs a fact after others can see it."""

        def holds() -> str:
            log = self.log()
            return log if text in log else ""

        try:
            return str(wait_until(holds, timeout_s))
        except AssertionError:
            raise AssertionError(
                f"{self.name} never logged {text!r}:\n{self.log()[-4000:]}"
            ) from None

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


@dataclass
class Processes:
    """Starts `dispatch ...` subprocesses and stops every one of them at teardown."""

    env: dict[str, str]
    log_dir: Path
    procs: list[Proc] = field(default_factory=list)

    def dispatch(self, name: str, *args: str, env: dict[str, str] | None = None) -> Proc:
        log_path = self.log_dir / f"{name}-{len(self.procs)}.log"
        with log_path.open("wb") as out:  # the child keeps its own descriptor
            popen = subprocess.Popen(
                [sys.executable, "-m", "dispatch.cli", *args],
                env={**self.env, **(env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def gateway(self, port: int | None = None, gateway_id: str | None = None) -> Gateway:
        port = port or free_port()
        args = ["gateway", "--port", str(port)]
        if gateway_id:
            args += ["--gateway-id", gateway_id]
        proc = self.dispatch("gateway", *args)
        gw = Gateway(proc, port)
        gw.wait_ready()
        return gw

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


@dataclass
class Gateway:
    proc: Proc
    port: int

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 20) -> None:
        """Until this gateway answers /healthz. Its own log must say it bound the port
        first: another server on the same port would answer just as well."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.proc.alive():
                raise RuntimeError(f"gateway exited early:\n{self.proc.log()}")
            if f"running on http://127.0.0.1:{self.port}" not in self.proc.log():
                time.sleep(0.05)
                continue
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(f"{self.http}/healthz", timeout=1) as resp,
            ):
                if resp.status == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"gateway not ready after {timeout_s} s:\n{self.proc.log()}")


def http(
    method: str,
    url: str,
    token: str | None = None,
    body: Any = None,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            payload = resp.read()
            return resp.status, dict(resp.headers), _json(payload)
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), _json(exc.read())


def _json(payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except ValueError:
        return payload.decode(errors="replace")


def wait_until(
    predicate: Any, timeout_s: float = 10, interval_s: float = 0.05, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@contextlib.contextmanager
def chdir(path: Path) -> Iterator[None]:
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def drop_namespace(ns: str) -> None:
    """Delete a test namespace: its Redis keys, PostgreSQL schemas and roles."""
    client = redis.Redis.from_url(REDIS_URL)
    batch = list(client.scan_iter(match=f"{ns}:*", count=1000))
    for i in range(0, len(batch), 500):
        client.delete(*batch[i : i + 500])
    client.close()
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        # The namespace's schema plus any rebuilt/swapped copy (`<ns>_rebuild`, `<ns>_old_*`),
        # then its roles (cluster-wide, so they must not outlive the test).
        schemas = conn.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname = %s OR nspname LIKE %s",
            (ns, ns + "\\_%"),
        ).fetchall()
        for (name,) in schemas:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))
        roles = conn.execute(
            "SELECT rolname FROM pg_roles WHERE rolname LIKE %s", (ns + "\\_%",)
        ).fetchall()
        for (role,) in roles:
            conn.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def projected_status(namespace: str, command_id: str) -> str | None:
    """The command's status in the PostgreSQL projection (None before it is projected)."""
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        try:
            row = conn.execute(
                sql.SQL("SELECT status FROM {}.commands WHERE command_id = %s").format(
                    sql.Identifier(namespace)
                ),
                (command_id,),
            ).fetchone()
        except psycopg.errors.UndefinedTable:
            return None
    return row[0] if row else None


def start_private_redis(port: int, data: Path, *, appendfsync: str) -> subprocess.Popen[bytes]:
    """A redis-server with AOF on a free loopback port, for tests that stop or kill it."""
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
         "--appendonly", "yes", "--appendfsync", appendfsync, "--save", ""],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(port=port)
    wait_until(lambda: _pings(client), 10, what="redis-server to start")
    client.close()
    return server


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
