"""Shared set-up for benchmarks: a private namespace, real gateway processes, clients."""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import redis
from websockets.asyncio.client import connect as ws_connect

from config.settings import Settings
from dispatch.tokens import edge_claims, sign, user_claims
from ledger.keys import PROJECTOR_GROUP, Keys

SECRET = "bench-secret-for-command-dispatch-0123456789abcdef"


def raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def p50_p99(values: list[float]) -> tuple[float, float]:
    return percentile(values, 50), percentile(values, 99)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass
class Bench:
    """A namespace of its own on the configured Redis/PostgreSQL, and its processes."""

    namespace: str = field(default_factory=lambda: f"bench{uuid.uuid4().hex[:8]}")
    redis_url: str = os.environ.get("DISPATCH_REDIS_URL", "redis://127.0.0.1:6379/0")
    database_url: str = os.environ.get("DISPATCH_DATABASE_URL", "postgresql://127.0.0.1:5432/test")
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    log_dir: Path = field(default_factory=lambda: Path(".local/bench"))
    extra: dict[str, str] = field(default_factory=dict)  # more environment (a switch)

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "DISPATCH_NAMESPACE": self.namespace,
            "DISPATCH_JWT_SECRET": SECRET,
            "DISPATCH_REDIS_URL": self.redis_url,
            "DISPATCH_DATABASE_URL": self.database_url,
            "PYTHONUNBUFFERED": "1",
            # Benchmarks measure capacity: the per-user/edge/global limits are switched off.
            "DISPATCH_RATE_USER_PER_S": "0",
            "DISPATCH_RATE_EDGE_PER_S": "0",
            "DISPATCH_RATE_GLOBAL_PER_S": "0",
            **self.extra,
        }

    def dispatch(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with (self.log_dir / f"{name}.log").open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "dispatch.cli", *args],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.procs.append(proc)
        return proc

    def gateway(self, workers: int = 1) -> tuple[subprocess.Popen[bytes], int]:
        port = free_port()
        args = ["gateway", "--port", str(port), "--workers", str(workers)]
        return self._serving(self.dispatch(f"gateway-{port}", *args), port)

    def relay(self) -> tuple[subprocess.Popen[bytes], int]:
        """The bare in-memory relay (bench/_relay.py) on the same stack."""
        port = free_port()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with (self.log_dir / f"relay-{port}.log").open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "bench._relay", "--port", str(port)],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.procs.append(proc)
        return self._serving(proc, port)

    def wait_projected(self, timeout_s: float = 120) -> None:
        """Until the projector has stored every event so far: a light-load figure must not
        share the CPU with the projector catching up on the saturated run before it."""
        settings = Settings.from_env(self.env)
        keys = Keys(settings.namespace, settings.partitions)
        client = redis.Redis.from_url(self.redis_url)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                behind = 0
                for partition in keys.all_partitions():
                    with contextlib.suppress(redis.ResponseError):  # no log (yet)
                        for group in client.xinfo_groups(keys.log(partition)):
                            if group["name"] == PROJECTOR_GROUP.encode():
                                behind += int(group.get("lag") or 0) + int(group["pending"])
                if behind == 0:
                    return
                time.sleep(0.2)
        finally:
            client.close()
        raise RuntimeError(f"the projector did not catch up within {timeout_s:.0f} s")

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()

    def _serving(
        self, proc: subprocess.Popen[bytes], port: int
    ) -> tuple[subprocess.Popen[bytes], int]:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1),
            ):
                return proc, port
            if proc.poll() is not None:
                raise RuntimeError(f"gateway exited; see {self.log_dir}")
            time.sleep(0.05)
        raise RuntimeError("gateway did not start")

    def enroll(self, edges: list[str]) -> None:
        client = redis.Redis.from_url(self.redis_url)
        for i in range(0, len(edges), 1000):
            client.sadd(f"{self.namespace}:edges", *edges[i : i + 1000])
        client.close()

    def user_token(self, user: str, control: list[str]) -> str:
        return sign(user_claims(user, control, [], 3600), SECRET)

    def edge_token(self, edge_id: str) -> str:
        return sign(edge_claims(edge_id, 3600), SECRET)

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        client = redis.Redis.from_url(self.redis_url)
        keys = list(client.scan_iter(match=f"{self.namespace}:*", count=5000))
        for i in range(0, len(keys), 1000):
            client.delete(*keys[i : i + 1000])
        client.close()
        with (
            contextlib.suppress(Exception),
            psycopg.connect(self.database_url, autocommit=True) as conn,
        ):
            conn.execute(f'DROP SCHEMA IF EXISTS "{self.namespace}" CASCADE')
            # The projector's roles (`<namespace>_owner|_projector|_reader`) are cluster-wide.
            for (role,) in conn.execute(
                "SELECT rolname FROM pg_roles WHERE rolname LIKE %s", (self.namespace + "\\_%",)
            ).fetchall():
                conn.execute(f'DROP OWNED BY "{role}" CASCADE')
                conn.execute(f'DROP ROLE "{role}"')


@contextlib.contextmanager
def bench(extra: dict[str, str] | None = None) -> Iterator[Bench]:
    b = Bench(extra=extra or {})
    try:
        yield b
    finally:
        b.close()


def command(command_id: str, edge_id: str, value: int, priority: str = "normal") -> dict[str, Any]:
    return {
        "command_id": command_id,
        "command_type": "setpoint",
        "target": {"edge_id": edge_id, "device_id": "bms_main", "channel": "SetActivePower"},
        "value": value,
        "unit": "W",
        "expiry_sec": 300,
        "source": "bench",
        "timestamp": now_iso(),
        "priority": priority,
    }


def connect(url: str, token: str, **options: Any) -> ws_connect:
    """A benchmark client's WebSocket: bearer token, no compression (as the relay), and
    no receive queue bound unless `options` set one."""
    options.setdefault("max_queue", None)
    return ws_connect(
        url, additional_headers={"Authorization": f"Bearer {token}"}, compression=None, **options
    )


def load_parser(prog: str, *, seconds: float) -> argparse.ArgumentParser:
    """The load shape every saturating benchmark takes: edges, dashboards, window, time."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--edges", type=int, default=100)
    parser.add_argument("--dashboards", type=int, default=50)
    parser.add_argument("--window", type=int, default=4, help="commands in flight per dashboard")
    parser.add_argument("--seconds", type=float, default=seconds)
    return parser
