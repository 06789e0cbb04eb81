"""Edge test kit: a real pymodbus BMS, a real WebSocket stand-in cloud, a TCP proxy, fixtures."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from edge.agent import Agent, AgentSettings
from edge.capabilities import shipped_config
from edge.simulator import BmsSimulator, BmsState

EDGE_ID = "site1_edge_prod"
TOKEN = "edge-secret-credential"
REPO = Path(__file__).resolve().parents[2]
FINAL = ("executed", "failed", "rejected")


def command(
    command_id: str,
    command_type: str = "setpoint",
    *,
    device_id: str = "bms_main",
    channel: str = "SetActivePower",
    value: object = 50000,
    unit: str | None = "W",
    priority: str = "normal",
    expiry_sec: int = 300,
    duration_sec: int | None = None,
    edge_id: str = EDGE_ID,
    expires_at: datetime | None = None,
    sent_at: datetime | None = None,
    remaining_ms: int | None = None,
) -> dict[str, Any]:
    """A gateway -> edge command body (without `delivery`)."""
    now = datetime.now(UTC)
    body: dict[str, Any] = {
        "command_id": command_id,
        "command_type": command_type,
        "target": {"edge_id": edge_id, "device_id": device_id, "channel": channel},
        "value": value,
        "expiry_sec": expiry_sec,
        "source": "user_456",
        "timestamp": now.isoformat(),
        "priority": priority,
        "expires_at": (expires_at or now + timedelta(seconds=expiry_sec)).isoformat(),
        "actor": "user:user_456",
    }
    if unit is not None:
        body["unit"] = unit
    if duration_sec is not None:
        body["duration_sec"] = duration_sec
    if sent_at is not None:
        body["sent_at"] = sent_at.isoformat()
    if remaining_ms is not None:
        body["remaining_ms"] = remaining_ms
    return body


async def eventually(predicate: Callable[[], bool], within_s: float = 5.0) -> None:
    """Poll a condition nothing signals (e.g. a state inside the agent under test)."""
    async with asyncio.timeout(within_s):
        while not predicate():  # noqa: ASYNC110 (no event exists for it)
            await asyncio.sleep(0.01)


@dataclass
class Routed:
    body: dict[str, Any]
    deliveries: int = 0
    delivered: bool = False  # an accepted (or final) ack arrived


@dataclass
class FakeCloud:
    """A real WebSocket server standing in for the gateway (and its config endpoint).

    Like the ledger: commands are kept in order; on connect, every command without an
    ack yet is delivered again with `delivery` + 1; a new command goes out at once when
    the edge is connected.
    """

    config: bytes | None = None
    refuse_status: int | None = None
    routed: dict[str, Routed] = field(default_factory=dict)
    acks: list[dict[str, Any]] = field(default_factory=list)
    frames: list[dict[str, Any]] = field(default_factory=list)
    connections: int = 0
    handshakes: list[float] = field(default_factory=list)
    config_requests: int = 0
    port: int = 0
    # Answers each ack with a notice frame (e.g. ack_recorded), like a newer gateway.
    notice_for: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None
    ack_times: list[float] = field(default_factory=list)
    _server: Server | None = None
    _ws: ServerConnection | None = None
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> None:
        self._server = await serve(
            self._handler,
            "127.0.0.1",
            port,
            process_request=self._process_request,
            compression=None,
            ping_interval=None,
        )
        self.port = next(iter(self._server.sockets)).getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
            self._ws = None

    async def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        self.handshakes.append(time.monotonic())
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return conn.respond(401, "unauthenticated\n")
        if request.path == f"/api/edges/{EDGE_ID}/config":
            self.config_requests += 1
            if self.config is None:
                return conn.respond(404, "no config\n")
            headers = Headers([("Content-Type", "application/json")])
            headers["Content-Length"] = str(len(self.config))
            return Response(200, "OK", headers, self.config)
        if request.path != f"/ws/edge/{EDGE_ID}":
            return conn.respond(404, "not found\n")
        if self.refuse_status is not None:
            return conn.respond(self.refuse_status, "refused\n")
        return None

    async def _handler(self, ws: ServerConnection) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close(4001, "replaced by a newer connection")
        self._ws = ws
        self.connections += 1
        await self._notify()
        for routed in list(self.routed.values()):
            if not routed.delivered:
                await self._deliver(ws, routed)
        try:
            async for message in ws:
                frame = json.loads(message)
                self.frames.append(frame)
                if "status" in frame:
                    self.acks.append(frame)
                    self.ack_times.append(time.monotonic())
                    routed = self.routed.get(frame["command_id"])
                    if routed is not None:
                        routed.delivered = True
                    notice = None if self.notice_for is None else self.notice_for(frame)
                    if notice is not None:
                        await ws.send(json.dumps(notice))
                await self._notify()
        except ConnectionClosed:
            pass
        finally:
            if self._ws is ws:
                self._ws = None
            await self._notify()

    async def _deliver(self, ws: ServerConnection, routed: Routed) -> None:
        routed.deliveries += 1
        with contextlib.suppress(ConnectionClosed):
            await ws.send(json.dumps({"delivery": routed.deliveries, **routed.body}))

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    @property
    def online(self) -> bool:
        return self._ws is not None

    async def route(self, body: dict[str, Any]) -> None:
        routed = self.routed.setdefault(body["command_id"], Routed(body))
        if self._ws is not None:
            await self._deliver(self._ws, routed)

    async def send_raw(self, text: str) -> None:
        assert self._ws is not None
        await self._ws.send(text)

    async def kick(self, code: int = 1001, reason: str = "gateway shutting down") -> None:
        if self._ws is not None:
            await self._ws.close(code, reason)

    async def wait_for(self, predicate: Callable[[], bool], within_s: float = 10.0) -> None:
        async with asyncio.timeout(within_s), self._changed:
            await self._changed.wait_for(predicate)

    def acks_of(self, command_id: str) -> list[dict[str, Any]]:
        return [a for a in self.acks if a["command_id"] == command_id]

    def final(self, command_id: str) -> dict[str, Any] | None:
        return next((a for a in self.acks_of(command_id) if a["status"] in FINAL), None)

    async def wait_final(self, command_id: str, within_s: float = 10.0) -> dict[str, Any]:
        await self.wait_for(lambda: self.final(command_id) is not None, within_s)
        final = self.final(command_id)
        assert final is not None
        return final

    async def wait_online(self, within_s: float = 10.0) -> None:
        await self.wait_for(lambda: self.online, within_s)


@pytest.fixture
async def cloud() -> AsyncIterator[FakeCloud]:
    fake = FakeCloud()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def bms() -> AsyncIterator[BmsSimulator]:
    simulator = BmsSimulator(state=BmsState())
    await simulator.start()
    yield simulator
    await simulator.stop()


def agent_settings(
    cloud_url: str, bms_port: int, state_dir: Path, **overrides: Any
) -> AgentSettings:
    values: dict[str, Any] = {
        "edge_id": EDGE_ID,
        "gateway_url": cloud_url,
        "token": TOKEN,
        "state_dir": state_dir,
        "modbus": (("bms_main", "127.0.0.1", bms_port),),
        "cycle_period_ms": 50,
        "ping_interval_s": 0.5,
        "ping_timeout_s": 0.5,
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.5,
        "config_fetch_timeout_s": 2.0,
    }
    values.update(overrides)
    return AgentSettings(**values)


class RunningAgent:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.task: asyncio.Task[int] = asyncio.create_task(agent.run())

    async def started(self) -> RunningAgent:
        waiter = asyncio.create_task(self.agent.ready.wait())
        done, _ = await asyncio.wait({waiter, self.task}, timeout=10, return_when="FIRST_COMPLETED")
        if self.task in done:
            waiter.cancel()
            self.task.result()
        assert waiter in done, "the agent did not start"
        return self

    async def stop(self) -> int:
        self.agent.stop()
        async with asyncio.timeout(10):
            return await self.task


@pytest.fixture
async def start_agent(
    tmp_path: Path,
) -> AsyncIterator[Callable[..., Any]]:
    running: list[RunningAgent] = []

    async def start(cloud: FakeCloud, bms_port: int, **overrides: Any) -> RunningAgent:
        state_dir = overrides.pop("state_dir", tmp_path / "state")
        wall = overrides.pop("wall", None)
        settings = agent_settings(cloud.url, bms_port, state_dir, **overrides)
        agent = RunningAgent(Agent(settings) if wall is None else Agent(settings, wall=wall))
        running.append(agent)
        return await agent.started()

    yield start
    for agent in running:
        if not agent.task.done():
            await agent.stop()


# -- fault injection ------------------------------------------------------------------------
class TcpProxy:
    """A loopback TCP proxy that can `blackhole()` (keep sockets, drop bytes) and `restore()`."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.blackholed = False
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        for writer in list(self._writers):
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def blackhole(self) -> None:
        self.blackholed = True

    def restore(self) -> None:
        self.blackholed = False

    def cut(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )
        for w in (writer, up_writer):
            self._writers.discard(w)
            w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            if self.blackholed:
                continue
            writer.write(data)
            await writer.drain()
        with contextlib.suppress(Exception):
            writer.write_eof()


@pytest.fixture
async def proxy_factory() -> AsyncIterator[Callable[[int], Any]]:
    proxies: list[TcpProxy] = []

    async def make(target_port: int) -> TcpProxy:
        proxy = TcpProxy(target_port)
        await proxy.start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        await proxy.stop()


# -- subprocesses ---------------------------------------------------------------------------
def edge_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "edge.cli", *args]


def subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCH_")}
    env["PYTHONPATH"] = str(REPO)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def demo_config() -> bytes:
    raw = shipped_config(EDGE_ID)
    assert raw is not None
    return raw


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """An edge's /metrics as {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
