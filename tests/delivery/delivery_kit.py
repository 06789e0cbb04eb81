"""End-to-end kit: a scripted edge with a durable record, the real agent, ledger reads."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import redis
import websockets
from pymodbus.client import AsyncModbusTcpClient

from config.settings import Settings
from edge.journal import JOURNAL_FILE, Journal, read_log
from ledger.keys import Keys

from support import Gateway, Proc, Processes, edge_token, free_port, http, wait_until

DEMO_EDGE = "site1_edge_prod"


def keys(env: dict[str, str]) -> Keys:
    settings = Settings.from_env(env)
    return Keys(settings.namespace, settings.partitions)


def enroll(env: dict[str, str], *edges: str) -> None:
    client = redis.Redis.from_url(env["DISPATCH_REDIS_URL"])
    client.sadd(keys(env).edges(), *edges)
    client.close()


def online(env: dict[str, str], edge_id: str) -> bool:
    client = redis.Redis.from_url(env["DISPATCH_REDIS_URL"])
    try:
        return bool(client.exists(keys(env).presence(edge_id)))
    finally:
        client.close()


# -- the ledger as the HTTP API shows it ------------------------------------------------------
def view(gw: Gateway, token: str, command_id: str) -> dict[str, Any]:
    status, _, body = http("GET", f"{gw.http}/api/commands/{command_id}", token)
    assert status == 200, body
    assert isinstance(body, dict)
    return body


def wait_status(
    gw: Gateway, token: str, command_id: str, *wanted: str, timeout_s: float = 15
) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        body = view(gw, token, command_id)
        return body if body["status"] in wanted else None

    found: dict[str, Any] = wait_until(
        reached, timeout_s, interval_s=0.1, what=f"{command_id} to become {wanted}"
    )
    return found


def events(body: dict[str, Any], status: str) -> list[dict[str, Any]]:
    return [e for e in body["events"] if e["status"] == status]


def at_ms(event: dict[str, Any]) -> int:
    """Server-side event time (Redis TIME, ISO 8601 with ms) as epoch milliseconds."""
    return int(datetime.fromisoformat(event["at"].replace("Z", "+00:00")).timestamp() * 1000)


def post(gw: Gateway, token: str, body: dict[str, Any]) -> dict[str, Any]:
    status, _, reply = http("POST", f"{gw.http}/api/commands", token, body)
    assert status in (200, 202), reply
    assert isinstance(reply, dict)
    return reply


# -- a scripted edge ----------------------------------------------------------------------------
@dataclass
class ScriptedEdge:
    """An edge stand-in on a real WebSocket. It keeps a durable per-command record (a
    JSON file, written before it acknowledges) and applies a command id once: a
    redelivery is answered from the record. With `ack=False` it receives and stays
    silent (a stuck Core Cycle)."""

    edge_id: str
    record_path: Path
    ack: bool = True
    frames: list[dict[str, Any]] = field(default_factory=list)
    _ws: Any = None
    _reader: asyncio.Task[None] | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def record(self) -> dict[str, int]:
        if not self.record_path.exists():
            return {}
        data: dict[str, int] = json.loads(self.record_path.read_text())
        return data

    def _save(self, record: dict[str, int]) -> None:
        tmp = self.record_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.record_path)

    async def connect(self, gw: Gateway) -> ScriptedEdge:
        self._ws = await websockets.connect(
            f"{gw.ws}/ws/edge/{self.edge_id}",
            additional_headers={"Authorization": f"Bearer {edge_token(self.edge_id)}"},
        )
        self._reader = asyncio.create_task(self._read(self._ws))
        return self

    async def close(self) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader

    async def _read(self, ws: Any) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for message in ws:
                frame = json.loads(message)
                if "command_type" in frame:
                    self.frames.append(frame)
                    if self.ack:
                        await self.execute(frame["command_id"])
                self._changed.set()

    async def execute(self, command_id: str) -> None:
        """Apply once (durably), then acknowledge; a known id only gets its ack again."""
        record = self.record
        if command_id not in record:
            record[command_id] = 1
            self._save(record)
            await self.send({"command_id": command_id, "status": "accepted"})
        await self.send(
            {
                "command_id": command_id,
                "status": "executed",
                "executed_at": "2026-02-15T14:30:01.050Z",
                "error": None,
            }
        )

    async def send(self, frame: dict[str, Any]) -> None:
        await self._ws.send(json.dumps(frame))

    async def wait_frames(self, count: int, timeout_s: float = 15) -> list[dict[str, Any]]:
        async with asyncio.timeout(timeout_s):
            while len(self.frames) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.frames

    def effects(self) -> Counter[str]:
        return Counter(self.record)


# -- real processes ------------------------------------------------------------------------------
def projector(processes: Processes, *, started: str = "projector.started", **env: str) -> Proc:
    """`dispatch projector`, once its log says `started` (verdicts start before that)."""
    proc = processes.dispatch("projector", "projector", env=env or None)
    wait_until(
        lambda: started in proc.log() or not proc.alive(),
        20,
        interval_s=0.1,
        what="the projector to start",
    )
    assert proc.alive(), proc.log()
    return proc


def wait_port(port: int, proc: Proc, timeout_s: float = 15) -> None:
    def listening() -> bool:
        assert proc.alive(), proc.log()
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_until(listening, timeout_s, interval_s=0.05, what=f"port {port}")


@dataclass
class DemoSite:
    """`dispatch simulate-device` and `dispatch edge` for the demo edge, as processes."""

    processes: Processes
    state_dir: Path
    bms_port: int = 0
    agent: Proc | None = None

    def start_device(self) -> DemoSite:
        self.bms_port = free_port()
        proc = self.processes.dispatch("bms", "simulate-device", "--port", str(self.bms_port))
        wait_port(self.bms_port, proc)
        return self

    def start_agent(self, gw: Gateway, *extra: str) -> Proc:
        self.agent = self.processes.dispatch(
            "agent",
            "edge",
            "--edge-id", DEMO_EDGE,
            "--gateway", gw.ws,
            "--token", edge_token(DEMO_EDGE),
            "--modbus", f"bms_main=127.0.0.1:{self.bms_port}",
            "--state-dir", str(self.state_dir),
            "--cycle-period-ms", "100",
            "--backoff-max-s", "1",
            *extra,
        )  # fmt: skip
        wait_until(
            lambda: online(self.processes.env, DEMO_EDGE),
            20,
            interval_s=0.1,
            what=f"the agent to connect:\n{self.agent.log()}",
        )
        return self.agent

    def journal(self, command_id: str | None = None) -> list[tuple[str, str]]:
        """(command_id, event) lines of the agent's durable command log, oldest first."""
        db = Journal.open_readonly(self.state_dir / JOURNAL_FILE)
        try:
            return [
                (e.command_id, e.event) for e in read_log(db, limit=10_000, command_id=command_id)
            ]
        finally:
            db.close()

    def executions(self) -> Counter[str]:
        """How often the agent started writing each command to the device."""
        return Counter(cid for cid, event in self.journal() if event == "executing")

    async def register_value(self) -> int:
        """SetActivePower as any Modbus client reads it (holding 0-1, int32 big-endian)."""
        client = AsyncModbusTcpClient("127.0.0.1", port=self.bms_port)
        await client.connect()
        try:
            reply = await client.read_holding_registers(0, count=2, device_id=1)
            return int(client.convert_from_registers(reply.registers, client.DATATYPE.INT32))
        finally:
            client.close()
