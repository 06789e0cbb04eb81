"""Helpers of the replay tests: a recorded live site, waits that keep the loop running,
`dispatch replay` runs and snapshots of the live namespace."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis

from dispatch.replay.relay import EdgeRelay
from dispatch.replay.sandbox import listening

from support import DEMO_EDGE, REDIS_URL, Gateway, Processes, edge_token, free_port, http


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def until(predicate: Callable[[], Any], timeout_s: float = 20, what: str = "it") -> Any:
    """Poll a blocking predicate off the loop (the loop may be running a relay)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = await asyncio.to_thread(predicate)
        if result:
            return result
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


class Site:
    """The recorded system: gateway, simulated BMS, a real edge agent (through a relay)."""

    def __init__(self, processes: Processes, gw: Gateway, relay: EdgeRelay, token: str) -> None:
        self.processes = processes
        self.gw = gw
        self.relay = relay
        self.token = token
        self.namespace = processes.env["DISPATCH_NAMESPACE"]
        self.redis = redis.Redis.from_url(REDIS_URL)

    def presence(self) -> bool:
        pattern = f"{self.namespace}:*online:{DEMO_EDGE}"
        return any(self.redis.scan_iter(match=pattern))

    def status(self, command_id: str) -> dict[str, Any]:
        code, _, body = http("GET", f"{self.gw.http}/api/commands/{command_id}", self.token)
        return body if code == 200 else {}

    async def wait(self, command_id: str, *statuses: str, timeout_s: float = 20) -> None:
        def there() -> bool:
            return self.status(command_id).get("status") in statuses

        await until(there, timeout_s, f"{command_id} to be {' or '.join(statuses)}")

    async def send(self, body: dict[str, Any], *expect: str) -> str:
        code, _, reply = await asyncio.to_thread(
            http, "POST", f"{self.gw.http}/api/commands", self.token, body
        )
        assert code == 202, reply
        cid = str(body["command_id"])
        if expect:
            await self.wait(cid, *expect)
        return cid

    async def close(self) -> None:
        await self.relay.close()
        self.redis.close()

    async def post(self, path: str) -> tuple[int, Any]:
        code, _, reply = await asyncio.to_thread(
            http, "POST", f"{self.gw.http}{path}", self.token, {}
        )
        return code, reply

    async def offline(self) -> None:
        await self.relay.cut()
        await until(lambda: not self.presence(), 15, "the edge to drop off")

    async def online(self) -> None:
        self.relay.restore()
        await until(self.presence, 15, "the edge to come back")


async def live_site(processes: Processes, tmp_path: Path, token: str, sites: list[Site]) -> Site:
    gw = processes.gateway()
    port = free_port()
    processes.dispatch("simulator", "simulate-device", "--port", str(port))
    await until(lambda: listening(port), 20, "the simulated BMS")
    relay = EdgeRelay(gw.ws)
    relay_port = await relay.start()
    edge = processes.dispatch(
        "edge",
        "edge",
        "--edge-id",
        DEMO_EDGE,
        "--gateway",
        f"ws://127.0.0.1:{relay_port}",
        "--token",
        edge_token(DEMO_EDGE),
        "--modbus",
        f"bms_main=127.0.0.1:{port}",
        "--state-dir",
        str(tmp_path / "live-edge"),
        "--backoff-max-s",
        "0.3",
    )
    site = Site(processes, gw, relay, token)
    sites.append(site)  # closed at teardown
    await until(site.presence, 30, f"the live edge agent to connect:\n{edge.log()}")
    return site


async def run_replay(processes: Processes, *args: str) -> tuple[int, dict[str, Any], str]:
    proc = processes.dispatch("replay", "replay", "--json", *args)
    code = await asyncio.to_thread(proc.popen.wait, 120)
    out = proc.log()
    line = next((ln for ln in out.splitlines() if ln.startswith("{")), "{}")
    return code, json.loads(line), out


def snapshot(namespace: str) -> dict[bytes, tuple[bytes | None, bool]]:
    """Every key of a namespace: its serialized value and whether it has a TTL."""
    client = redis.Redis.from_url(REDIS_URL)
    out: dict[bytes, tuple[bytes | None, bool]] = {}
    for key in client.scan_iter(match=f"{namespace}:*", count=1000):
        out[key] = (client.dump(key), client.pttl(key) > 0)  # type: ignore[arg-type]
    return out


def leftover(sandbox: str) -> list[bytes]:
    return list(redis.Redis.from_url(REDIS_URL).scan_iter(match=f"{sandbox}:*"))


def outcomes(report: dict[str, Any], side: str) -> dict[str, tuple[Any, Any]]:
    return {c["command_id"]: (c[side]["status"], c[side]["error_code"]) for c in report["commands"]}


def lifecycles(report: dict[str, Any], side: str) -> dict[str, list[str]]:
    return {c["command_id"]: c[side]["lifecycle"] for c in report["commands"]}
