"""Async stand-ins for a dashboard and an edge on real WebSockets, and a private Redis."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import websockets

from config.settings import Settings
from ledger.keys import Keys

from support import Gateway, edge_token, start_private_redis


def keys(env: dict[str, str]) -> Keys:
    settings = Settings.from_env(env)
    return Keys(settings.namespace, settings.partitions)


def enroll(env: dict[str, str], *edges: str) -> None:
    client = redis.Redis.from_url(env["DISPATCH_REDIS_URL"])
    client.sadd(keys(env).edges(), *edges)
    client.close()


@dataclass
class Peer:
    """A WebSocket client that keeps every frame it received."""

    ws: Any = None
    frames: list[dict[str, Any]] = field(default_factory=list)
    close_code: int | None = None
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _reader: asyncio.Task[None] | None = None

    async def open(self, url: str, token: str) -> None:
        self.ws = await websockets.connect(
            url, additional_headers={"Authorization": f"Bearer {token}"}
        )
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for message in self.ws:
                async with self._changed:
                    self.frames.append(json.loads(message))
                    self._changed.notify_all()
        async with self._changed:
            self.close_code = self.ws.close_code
            self._changed.notify_all()

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(frame))

    async def wait_for(self, match: Any, timeout_s: float = 10, what: str = "a frame") -> Any:
        """The first frame (from the start) for which `match(frame)` is true."""
        async with asyncio.timeout(timeout_s), self._changed:
            while True:
                for frame in self.frames:
                    if match(frame):
                        return frame
                if self.close_code is not None:
                    raise AssertionError(f"closed ({self.close_code}) before {what}")
                await self._changed.wait()

    async def wait_closed(self, timeout_s: float = 10) -> int:
        async with asyncio.timeout(timeout_s), self._changed:
            while self.close_code is None:
                await self._changed.wait()
            return self.close_code

    async def close(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()
        if self._reader is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self._reader, 5)


class Dashboard(Peer):
    async def connect(self, gw: Gateway, token: str) -> Dashboard:
        await self.open(f"{gw.ws}/ws/dashboard", token)
        return self

    async def status(self, command_id: str, *wanted: str, timeout_s: float = 10) -> Any:
        return await self.wait_for(
            lambda f: f.get("command_id") == command_id and f.get("status") in wanted,
            timeout_s,
            f"{command_id} {wanted}",
        )

    def statuses(self, command_id: str) -> list[str]:
        return [f["status"] for f in self.frames if f.get("command_id") == command_id]


class Edge(Peer):
    """An edge that acknowledges only when told to."""

    async def connect(self, gw: Gateway, edge_id: str) -> Edge:
        await self.open(f"{gw.ws}/ws/edge/{edge_id}", edge_token(edge_id))
        return self

    @property
    def commands(self) -> list[dict[str, Any]]:
        return [f for f in self.frames if "command_type" in f]

    async def command(self, index: int, timeout_s: float = 10) -> dict[str, Any]:
        async with asyncio.timeout(timeout_s), self._changed:
            while len(self.commands) <= index:
                if self.close_code is not None:
                    raise AssertionError(f"closed ({self.close_code}) before command {index}")
                await self._changed.wait()
            return self.commands[index]

    async def ack(self, command_id: str, status: str) -> None:
        frame: dict[str, Any] = {"command_id": command_id, "status": status}
        if status == "executed":
            frame["executed_at"] = "2026-02-15T14:30:01.050Z"
        await self.send(frame)

    async def notice(self, command_id: str, after: int, timeout_s: float = 10) -> Any:
        """The first notice about `command_id` among frames received after index `after`."""
        async with asyncio.timeout(timeout_s), self._changed:
            while True:
                for frame in self.frames[after:]:
                    if frame.get("type") and frame.get("command_id") == command_id:
                        return frame
                await self._changed.wait()


# -- a private Redis that tests may stop -----------------------------------------------------
def metric(gw: Gateway, series: str) -> float:
    """One series' value from the gateway's `/metrics` (0 when absent)."""
    with urllib.request.urlopen(f"{gw.http}/metrics", timeout=5) as response:
        text = response.read().decode()
    found = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


async def dashboards_ready(gw: Gateway, count: int) -> None:
    """Until `count` dashboards have their views loaded on `gw`.

    The gateway loads a dashboard's views right after its WebSocket opened, and counts
    it as connected then: a viewer hears the statuses that come after that.
    """
    deadline = asyncio.get_running_loop().time() + 10
    while await asyncio.to_thread(metric, gw, "dispatch_dashboards_connected") < count:
        assert asyncio.get_running_loop().time() < deadline, f"{count} dashboards never ready"
        await asyncio.sleep(0.02)


def start_redis(port: int, data: Path) -> subprocess.Popen[bytes]:
    return start_private_redis(port, data, appendfsync="always")
