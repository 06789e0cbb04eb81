"""The sandbox: a throwaway namespace with its own gateway, devices and real edge agent.

It shares nothing with the live system but the Redis server: a fresh namespace
`replay-<random>` (its own streams and keys), a private gateway process with its own
signing secret, one `dispatch simulate-device` per Modbus device of the capability config
(unless `--modbus` names devices), and a `dispatch edge` agent with an empty state
directory whose link runs through an `EdgeRelay`, so the replay controls its
connectivity and its acknowledgments. `stop()` ends the processes and removes the keys.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from config.settings import Settings
from dispatch.replay.relay import EdgeRelay
from dispatch.replay.window import ReplayError
from dispatch.tokens import edge_claims, sign, user_claims
from ledger.connection import AnyRedis
from ledger.keys import Keys, check_id
from ledger.store import Ledger

SANDBOX_PREFIX = "replay-"
REPLAY_USER = "replay"
POLL_S = 0.05
START_TIMEOUT_S = 30.0
EDGE_BACKOFF_MAX_S = 0.3  # the sandbox edge comes back at once when the replay restores it

# Settings the sandbox shares with the live gateway so it behaves the same (limits,
# timeouts); identities, secrets, addresses and edge settings are its own.
_INHERITED = (
    "DISPATCH_REDIS_URL",
    "DISPATCH_REDIS_CLUSTER",
    "DISPATCH_RATE_",
    "DISPATCH_MAX_MESSAGE_BYTES",
    "DISPATCH_PRESENCE_TTL_MS",
    "DISPATCH_STATE_TTL_S",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@dataclass
class Sandbox:
    """A private gateway, devices and an edge agent in namespace `replay-*`."""

    live: Settings
    edge_id: str
    modbus: list[str]
    cycle_period_ms: int | None = None
    config: bytes | None = None  # the capability config to run with (None: the live one)
    namespace: str = field(default_factory=lambda: f"{SANDBOX_PREFIX}{uuid.uuid4().hex[:10]}")
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(48))
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="dispatch-replay-")))
    procs: list[Proc] = field(default_factory=list)
    port: int = 0
    relay: EdgeRelay | None = None

    def __post_init__(self) -> None:
        check_id(self.namespace)
        if self.namespace == self.live.namespace or not self.namespace.startswith(SANDBOX_PREFIX):
            raise ReplayError("the sandbox namespace must be a fresh `replay-*` namespace")

    @property
    def keys(self) -> Keys:
        return Keys(self.namespace, self.live.partitions)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        # Nothing of the live deployment but the Redis server: own namespace, own secret,
        # no edge settings inherited from the operator's shell.
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("DISPATCH_") or k.startswith(_INHERITED)
        }
        env.update(
            DISPATCH_REDIS_URL=self.live.redis_url,
            DISPATCH_NAMESPACE=self.namespace,
            DISPATCH_JWT_SECRET=self.secret,
            # The sandbox edge's credential: in its environment, not in the process list.
            DISPATCH_EDGE_TOKEN=sign(edge_claims(self.edge_id, 86_400), self.secret),
            DISPATCH_PARTITIONS=str(self.live.partitions),
            DISPATCH_ACK_TIMEOUT_MS=str(self.live.ack_timeout_ms),
            DISPATCH_DEFAULT_EXPIRY_S=str(self.live.default_expiry_s),
            DISPATCH_CLOCK_SKEW_S=str(self.live.clock_skew_s),
            DISPATCH_HOST="127.0.0.1",
            PYTHONUNBUFFERED="1",
        )
        return env

    def _start(self, name: str, *args: str) -> Proc:
        path = self.workdir / f"{name}.log"
        with path.open("wb") as out:
            popen = subprocess.Popen(
                [sys.executable, "-m", "dispatch.cli", *args],
                env=self.env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        proc = Proc(name, popen, path)
        self.procs.append(proc)
        return proc

    def check_alive(self) -> None:
        for proc in self.procs:
            if proc.popen.poll() is not None:
                raise ReplayError(
                    f"the sandbox's {proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}"
                )

    async def start(self, ledger: Ledger, live: Ledger, holds: dict[str, frozenset[str]]) -> None:
        """Gateway, relay, devices, edge agent; returns when the edge is connected."""
        config = self.config
        if config is None:
            stored: Any = await live.redis.get(live.keys.edge_config(self.edge_id))
            config = stored.encode() if isinstance(stored, str) else stored
        if config is None:
            from edge.capabilities import shipped_config  # noqa: PLC0415

            config = shipped_config(self.edge_id)
        if config is None:
            raise ReplayError(
                f"edge {self.edge_id!r} has no capability config in the ledger and none ships "
                "with the project; pass --config FILE"
            )
        await ledger.redis.set(self.keys.edge_config(self.edge_id), config)
        config_path = self.workdir / "config.json"
        config_path.write_bytes(config)
        await ledger.enroll_edge(self.edge_id)
        # Every process starts at once (each takes a second or more to import on a busy
        # machine); the agent keeps reconnecting until the gateway answers.
        self.port = free_port()
        self.relay = EdgeRelay(f"ws://127.0.0.1:{self.port}")
        for command_id, statuses in holds.items():
            self.relay.hold(command_id, statuses)
        relay_port = await self.relay.start()
        gateway = self._start(
            "gateway", "gateway", "--port", str(self.port), "--gateway-id", "replay-gateway"
        )
        simulators = [] if self.modbus else self._simulators(config)
        modbus = list(self.modbus) or [spec for spec, _, _ in simulators]
        args = [
            "edge",
            "--edge-id",
            self.edge_id,
            "--gateway",
            f"ws://127.0.0.1:{relay_port}",
            "--state-dir",
            str(self.workdir / "edge-state"),
            "--config",
            str(config_path),
            "--backoff-max-s",
            str(EDGE_BACKOFF_MAX_S),
        ]
        for spec in modbus:
            args += ["--modbus", spec]
        if self.cycle_period_ms is not None:
            args += ["--cycle-period-ms", str(self.cycle_period_ms)]
        agent = self._start("edge", *args)
        await self._wait(self._healthy, "the sandbox gateway to answer", gateway)
        for _, port, sim in simulators:
            await self._wait(functools.partial(listening, port), "a simulated device", sim)
        await self.until(lambda: self.online(ledger), "the sandbox edge agent to connect", agent)

    async def online(self, ledger: Ledger) -> bool:
        return bool(await ledger.redis.exists(self.keys.presence(self.edge_id)))

    def _simulators(self, config: bytes) -> list[tuple[str, int, Proc]]:
        """One simulated device per device of the config: (DEVICE=HOST:PORT, port, process)."""
        from edge.capabilities import decode_config  # noqa: PLC0415

        out = []
        for device in decode_config(config).devices:
            port = free_port()
            sim = self._start(f"device-{device.device_id}", "simulate-device", "--port", str(port))
            out.append((f"{device.device_id}=127.0.0.1:{port}", port, sim))
        return out

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http}/healthz", timeout=1) as resp:
                return bool(resp.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    async def _wait(self, check: Callable[[], bool], what: str, proc: Proc) -> None:
        async def probe() -> bool:
            return bool(await asyncio.to_thread(check))

        await self.until(probe, what, proc)

    async def until(
        self,
        check: Callable[[], Awaitable[bool]],
        what: str,
        proc: Proc | None = None,
        timeout_s: float = START_TIMEOUT_S,
    ) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            if await check():
                return
            await asyncio.sleep(POLL_S)
        tail = f":\n{proc.tail()}" if proc else ""
        raise ReplayError(f"timed out after {timeout_s:g} s waiting for {what}{tail}")

    def _token(self) -> str:
        return sign(user_claims(REPLAY_USER, [self.edge_id], [], 86_400), self.secret)

    def post(self, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        """POST to the sandbox gateway as the replay user; (HTTP status, JSON reply)."""
        req = urllib.request.Request(
            f"{self.http}{path}",
            data=json.dumps(body or {}).encode(),
            method="POST",
            headers={
                "Authorization": f"Bearer {self._token()}",
                "Content-Type": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return int(resp.status), json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            return int(exc.code), json.loads(exc.read() or b"{}")

    async def stop(self, redis: AnyRedis, *, keep: bool) -> None:
        if self.relay is not None:
            await self.relay.close()
        for proc in reversed(self.procs):
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                await asyncio.to_thread(proc.popen.wait, 10)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                await asyncio.to_thread(proc.popen.wait, 5)
        if keep:
            return
        batch: list[bytes] = []
        async for key in redis.scan_iter(match=f"{self.namespace}:*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                await redis.delete(*batch)
                batch.clear()
        if batch:
            await redis.delete(*batch)
        shutil.rmtree(self.workdir, ignore_errors=True)
