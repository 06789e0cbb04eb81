"""The sandbox edge's link to the sandbox gateway, under the replay's control.

The edge agent connects to this relay instead of the gateway; each of its WebSocket
sessions is relayed frame by frame to the gateway's `/ws/edge/{edge_id}` with the same
credential. The replay uses it to reproduce what the network did in the recording:

* `cut()` closes both sides and refuses new sessions (HTTP 503) until `restore()`: the
  gateway sees the edge go offline and queues its commands, exactly as in an outage;
* `hold(command_id, statuses)` keeps that command's acknowledgments (by their wire
  status) from reaching the gateway until `release(command_id)`: a silent edge whose
  ack arrives after the cloud gave up on it.

Plain HTTP requests (the agent fetching its capability config) are passed through.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.http11 import Request, Response

log = logging.getLogger("dispatch.replay.relay")

MAX_FRAME_BYTES = 64 * 1024
CLOSE_TIMEOUT_S = 1.0


@dataclass(eq=False)
class _Session:
    edge: ServerConnection
    gateway: ClientConnection


@dataclass(eq=False)
class EdgeRelay:
    """A WebSocket relay between one edge agent and its gateway (`upstream` = ws://host:port)."""

    upstream: str
    online: bool = True
    holds: dict[str, frozenset[str]] = field(default_factory=dict)
    held: list[tuple[str, str]] = field(default_factory=list)  # (command_id, frame)
    sessions: set[_Session] = field(default_factory=set)
    relayed: int = 0
    _server: Server | None = None

    async def start(self) -> int:
        """Listen on a free loopback port; returns it."""
        self._server = await serve(
            self._serve,
            "127.0.0.1",
            0,
            process_request=self._process_request,
            compression=None,
            max_size=MAX_FRAME_BYTES,
            close_timeout=CLOSE_TIMEOUT_S,
        )
        return int(next(iter(self._server.sockets)).getsockname()[1])

    async def close(self) -> None:
        self.online = False
        await self._close_sessions()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    # -- control -------------------------------------------------------------------------
    async def cut(self) -> None:
        """The edge goes offline: close its sessions and refuse new ones."""
        self.online = False
        await self._close_sessions()
        log.info("replay.relay.cut")

    def restore(self) -> None:
        self.online = True
        log.info("replay.relay.restored")

    def hold(self, command_id: str, statuses: frozenset[str]) -> None:
        self.holds[command_id] = statuses

    async def release(self, command_id: str) -> None:
        """Stop holding the command's acks and pass on those held so far, in order."""
        self.holds.pop(command_id, None)
        frames = [f for cid, f in self.held if cid == command_id]
        self.held = [(cid, f) for cid, f in self.held if cid != command_id]
        session = next(iter(self.sessions), None)
        for frame in frames:
            if session is None:
                break  # the edge resends unrecorded acks when it reconnects
            with contextlib.suppress(ConnectionClosed):
                await session.gateway.send(frame)
        log.info("replay.relay.released command_id=%s frames=%d", command_id, len(frames))

    # -- plumbing ------------------------------------------------------------------------
    async def _close_sessions(self) -> None:
        sessions = list(self.sessions)
        self.sessions.clear()
        for s in sessions:
            with contextlib.suppress(Exception):
                await s.gateway.close(1001, "replay: the edge goes offline")
            with contextlib.suppress(Exception):
                await s.edge.close(1001, "replay: the edge goes offline")

    async def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        if not self.online:
            return conn.respond(503, "the replay holds this edge offline\n")
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return await asyncio.to_thread(self._http, request)
        return None

    def _http(self, request: Request) -> Response:
        url = self.upstream.replace("ws://", "http://", 1) + request.path
        req = urllib.request.Request(url, method="GET")
        if "Authorization" in request.headers:
            req.add_header("Authorization", request.headers["Authorization"])
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                status, reason, body = resp.status, resp.reason, resp.read()
                ctype = resp.headers.get("Content-Type", "application/json")
        except urllib.error.HTTPError as exc:
            status, reason, body = exc.code, str(exc.reason), exc.read()
            ctype = exc.headers.get("Content-Type", "application/json")
        except OSError as exc:
            status, reason, body, ctype = 502, "Bad Gateway", str(exc).encode(), "text/plain"
        headers = Headers(
            [
                ("Content-Type", ctype),
                ("Content-Length", str(len(body))),
                ("Connection", "close"),
            ]
        )
        return Response(status, reason, headers, body)

    async def _serve(self, edge: ServerConnection) -> None:
        request = edge.request
        assert request is not None
        auth = request.headers.get("Authorization", "")
        try:
            gateway = await connect(
                self.upstream + request.path,
                additional_headers={"Authorization": auth},
                compression=None,
                max_size=MAX_FRAME_BYTES,
                close_timeout=CLOSE_TIMEOUT_S,
                proxy=None,
            )
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            log.warning("replay.relay.upstream_refused error=%s", exc)
            await edge.close(1011, "replay relay: the sandbox gateway refused the edge")
            return
        session = _Session(edge, gateway)
        if not self.online:  # cut while connecting
            await gateway.close(1001)
            await edge.close(1001)
            return
        self.sessions.add(session)
        tasks = [
            asyncio.create_task(self._edge_to_gateway(session)),
            asyncio.create_task(self._gateway_to_edge(session)),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.sessions.discard(session)
            with contextlib.suppress(Exception):
                await gateway.close()
            with contextlib.suppress(Exception):
                await edge.close()

    async def _edge_to_gateway(self, s: _Session) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for frame in s.edge:
                command_id = self._held_for(frame)
                if command_id is not None:
                    self.held.append((command_id, _text(frame)))
                    log.info("replay.relay.holding command_id=%s", command_id)
                    continue
                await s.gateway.send(frame)
                self.relayed += 1

    async def _gateway_to_edge(self, s: _Session) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for frame in s.gateway:
                await s.edge.send(frame)

    def _held_for(self, frame: str | bytes) -> str | None:
        """The command id when this frame is an ack the replay holds back."""
        if not self.holds:
            return None
        try:
            ack = json.loads(frame)
        except ValueError:
            return None
        if not isinstance(ack, dict):
            return None
        command_id, status = ack.get("command_id"), ack.get("status")
        if isinstance(command_id, str) and status in self.holds.get(command_id, ()):
            return command_id
        return None


def _text(frame: str | bytes) -> str:
    return frame if isinstance(frame, str) else frame.decode()
