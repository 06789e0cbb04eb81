"""Connected dashboards and edges, each with a bounded outbox and its own writer.

The hub never awaits a client's socket: it puts frames in the client's outbox. A frame
with nothing queued ahead of it is written at once when the socket takes it (no loop
turn for the writer task); otherwise it queues and the writer sends it when the socket
drains. A client whose outbox overflows (it reads slower than it is sent to) is
disconnected with 1013 rather than slowing everyone else down or growing memory
without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from starlette.websockets import WebSocket, WebSocketState

from gateway.auth import EdgeIdentity, User
from gateway.http_limits import SEND_TEXT_NOW
from ledger.tasks import cancel_and_wait
from schemas.errors import ErrorCode, ErrorObject, error

log = logging.getLogger("gateway.sessions")


class CloseCode(IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    POLICY = 1008
    TRY_AGAIN_LATER = 1013
    PROTOCOL_ERROR = 1002
    INVALID_DATA = 1007  # e.g. a text frame that is not UTF-8
    MESSAGE_TOO_BIG = 1009  # beyond the protocol layer's hard frame limit
    REPLACED = 4001  # the same edge connected again; this session was superseded
    CREDENTIAL_ENDED = 4003  # the token expired or was revoked


class Outbox:
    def __init__(self, ws: WebSocket, limit: int) -> None:
        self.ws = ws
        self.limit = limit
        self._queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize=limit)
        self.closing: tuple[int, str] | None = None
        self.closed = asyncio.Event()  # set as soon as the session is asked to close
        self.overflowed = False
        self._writer: asyncio.Task[None] | None = None
        self._sending = False
        # Called when everything queued has been written to the socket (flow control).
        self.on_drained: Callable[[], None] | None = None
        self._drain_due = False  # a direct write's on_drained is scheduled
        # The protocol's synchronous write, under uvicorn (gateway/http_limits.py).
        extensions = ws.scope.get("extensions") or {}
        self._now: Callable[[str], bool] | None = (extensions.get(SEND_TEXT_NOW) or {}).get(
            "send_text"
        )

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing being written: the socket drains what it is given."""
        return not self._sending and self._queue.empty()

    def start(self) -> None:
        self._writer = asyncio.create_task(self.run(), name="outbox-writer")

    async def serve(self, reading: Coroutine[Any, Any, None]) -> None:
        """Run the session's reader until it ends or the outbox is closed, whichever first.

        A slow reader that stopped reading (and sending) would otherwise keep its
        session forever: its close frame cannot be written and its reader never wakes.
        """
        reader = asyncio.create_task(reading, name="session-reader")
        closed = asyncio.create_task(self.closed.wait())
        try:
            await asyncio.wait({reader, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            # Cancelled again if a Redis call swallows it: a reader that went on would
            # wait for a frame the silent client never sends (ledger/tasks.py).
            await cancel_and_wait([reader])
            if not reader.cancelled() and reader.exception() is not None:
                log.warning("gateway.session.reader_failed error=%r", reader.exception())

    async def finish(self, flush_s: float = 5.0) -> None:
        """Close (if nobody did) and give the writer `flush_s` to send the close frame."""
        self.close(CloseCode.NORMAL, "bye")
        if self._writer is None:
            return
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(self._writer, flush_s)

    def put(self, frame: str) -> bool:
        if self.closing:
            return False
        # Nothing ahead of it: written at once (in order, as the writer would), unless the
        # socket cannot take it now; then it queues and the writer waits for the socket.
        if self._now is not None and not self._sending and self._queue.empty():
            try:
                written = self._now(frame)
            except Exception as exc:  # queued instead: the writer meets it and ends the session
                log.debug("gateway.outbox.write_now_failed error=%s", exc)
                written = False
            if written:
                if self.on_drained is not None and not self._drain_due:
                    # As the writer would: once the caller's turn is over (it may still
                    # be deciding what comes next), not from inside its `put`.
                    self._drain_due = True
                    asyncio.get_running_loop().call_soon(self._drained)
                return True
        try:
            self._queue.put_nowait(frame)
            return True
        except asyncio.QueueFull:
            self.overflowed = True
            self.close(CloseCode.TRY_AGAIN_LATER, "client reads too slowly; reconnect")
            return False

    def _drained(self) -> None:
        self._drain_due = False
        if self.on_drained is not None and self.idle and not self.closing:
            self.on_drained()

    def close(self, code: int, reason: str, *, flush: bool = False) -> None:
        """Ask the writer to close the socket.

        By default what is queued is dropped (a closing session must not wait on a dead
        reader); `flush` sends what is queued first, e.g. the answer saying why.
        """
        if self.closing:
            return
        self.closing = (code, reason)
        self.closed.set()
        if not flush:
            while not self._queue.empty():
                self._queue.get_nowait()
        try:
            self._queue.put_nowait(None)
        except asyncio.QueueFull:
            self._queue.get_nowait()
            self._queue.put_nowait(None)

    async def run(self) -> None:
        """Writer: drains the queue onto the socket until closed."""
        try:
            while True:
                frame = await self._queue.get()
                if frame is None:
                    break
                self._sending = True
                await self.ws.send_text(frame)  # waits while the socket cannot drain
                self._sending = False
                if self.on_drained is not None and self._queue.empty():
                    self.on_drained()
        except Exception as exc:  # the peer went away; the reader notices too
            log.debug("gateway.outbox.send_failed error=%s", exc)
        if self.closing and self.ws.application_state == WebSocketState.CONNECTED:
            code, reason = self.closing
            with contextlib.suppress(Exception):
                await self.ws.close(code=code, reason=reason)


def ws_hard_limit_bytes(max_message_bytes: int) -> int:
    """The protocol layer's frame ceiling (uvicorn `ws_max_size`).

    Messages up to `max_message_bytes` are served; between that and this ceiling they
    are answered `too_large` and the connection stays usable; beyond it the protocol
    layer closes with 1009 without buffering the rest.
    """
    return max(256 * 1024, max_message_bytes * 2)


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
    # Commands this session sent or subscribed to, oldest first (see gateway/follows.py).
    following: dict[str, None] = field(default_factory=dict)

    def may_view(self, edge_id: str) -> bool:
        return self.views_all or edge_id in self.views


@dataclass(eq=False)
class EdgeSession:
    ws: WebSocket
    identity: EdgeIdentity
    owner: str  # "gateway_id|session_id": the presence value in Redis
    outbox: Outbox
    ready: bool = False  # set once the reconnect backlog has been handed over
    # Flow control (gateway/hub.py): commands sent and not yet accepted by the edge.
    unacked: set[str] = field(default_factory=set)
    # Where reclaiming an earlier session's unacknowledged entries goes on ('' = done).
    claim_cursor: str = "0-0"
    more: bool = False  # the last delivery stopped at the in-flight bound
    acknowledges: bool = False  # it acknowledged something: acks pace its deliveries
    delivering: bool = False  # a delivery call is out: one at a time per edge
    again: bool = False  # a delivery was wanted while one was out: go on after it

    @property
    def edge_id(self) -> str:
        return self.identity.edge_id


def protocol_refusal(message: Mapping[str, Any], hard_limit_bytes: int) -> ErrorObject | None:
    """The cause, when the WebSocket layer (not the peer) ended the connection."""
    code = message.get("code")
    if code == CloseCode.INVALID_DATA:
        return error(
            ErrorCode.MALFORMED_JSON,
            "a text frame was not valid UTF-8; the protocol layer closed the connection (1007)",
        )
    if code == CloseCode.MESSAGE_TOO_BIG:
        return error(
            ErrorCode.TOO_LARGE,
            f"a frame exceeded the hard limit of {hard_limit_bytes} bytes; the protocol layer "
            "closed the connection (1009)",
        )
    if code == CloseCode.PROTOCOL_ERROR:
        return error(
            ErrorCode.PROTOCOL_ERROR,
            "the peer broke the WebSocket protocol; the connection was closed (1002)",
        )
    return None


def slow_consumer(outbox: Outbox) -> ErrorObject:
    return error(
        ErrorCode.SLOW_CONSUMER,
        f"more than {outbox.limit} messages waited for this client; it was disconnected "
        "(1013): read faster or reconnect",
    )
