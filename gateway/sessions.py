"""Connected dashboards and edges, each with a bounded outbox and its own writer.

The hub never awaits a client's socket: it puts frames in the client's outbox. A
client whose outbox overflows (it reads slower than it is sent to) is disconnected
with 1013 rather than slowing everyone else down or growing memory without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass, field
from enum import IntEnum

from starlette.websockets import WebSocket, WebSocketState

from gateway.auth import EdgeIdentity, User

log = logging.getLogger("gateway.sessions")


class CloseCode(IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    POLICY = 1008
    TRY_AGAIN_LATER = 1013
    REPLACED = 4001  # the same edge connected again; this session was superseded
    CREDENTIAL_ENDED = 4003  # the token expired or was revoked


class Outbox:
    def __init__(self, ws: WebSocket, limit: int) -> None:
        self.ws = ws
        self._queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize=limit)
        self.closing: tuple[int, str] | None = None
        self.overflowed = False

    def put(self, frame: str) -> bool:
        if self.closing:
            return False
        try:
            self._queue.put_nowait(frame)
            return True
        except asyncio.QueueFull:
            self.overflowed = True
            self.close(CloseCode.TRY_AGAIN_LATER, "client reads too slowly; reconnect")
            return False

    def close(self, code: int, reason: str) -> None:
        """Ask the writer to close the socket after what is already queued is dropped."""
        if self.closing:
            return
        self.closing = (code, reason)
        # Drop what is queued: a closing session must not block on a dead reader.
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(None)

    async def run(self) -> None:
        """Writer: drains the queue onto the socket until closed."""
        try:
            while True:
                frame = await self._queue.get()
                if frame is None:
                    break
                await self.ws.send_text(frame)
        except Exception as exc:  # the peer went away; the reader notices too
            log.debug("gateway.outbox.send_failed error=%s", exc)
        if self.closing and self.ws.application_state == WebSocketState.CONNECTED:
            code, reason = self.closing
            with contextlib.suppress(Exception):
                await self.ws.close(code=code, reason=reason)


def _session_id() -> str:
    return uuid.uuid4().hex[:16]


@dataclass(eq=False)
class DashboardSession:
    ws: WebSocket
    user: User
    outbox: Outbox
    session_id: str = field(default_factory=_session_id)
    views_all: bool = False
    views: frozenset[str] = frozenset()

    def may_view(self, edge_id: str) -> bool:
        return self.views_all or edge_id in self.views


@dataclass(eq=False)
class EdgeSession:
    ws: WebSocket
    identity: EdgeIdentity
    owner: str  # "gateway_id|session_id": the presence value in Redis
    outbox: Outbox
    ready: bool = False  # set once the reconnect backlog has been handed over

    @property
    def edge_id(self) -> str:
        return self.identity.edge_id
