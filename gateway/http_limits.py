"""Bounded request heads: uvicorn's httptools protocol with size limits and a deadline.

uvicorn's httptools protocol accepts request heads of any size and waits for them
forever: a header line over 8 KiB on a WebSocket upgrade was handed to the websockets
parser, which refused it with a 431 that was never written, and the socket stayed open;
a half-sent request, or a connection that sends nothing, stayed open without bound.
This subclass (used through `http=` in the uvicorn config) answers instead:

- a request line or header line over `DISPATCH_HTTP_MAX_LINE_BYTES`, a head over
  `DISPATCH_HTTP_MAX_HEAD_BYTES` or with more than `DISPATCH_HTTP_MAX_HEADERS` fields:
  **431** and close;
- a head not complete `DISPATCH_HANDSHAKE_TIMEOUT_S` after the connection opened (or
  after the previous response, on a kept-alive connection): **408** and close.

Each such refusal is charged to the client's address and recorded (or summarised) in the
audit stream through `Admission`. The WebSocket protocol is subclassed too, so a request
its own parser refuses is answered rather than left hanging.
"""

from __future__ import annotations

import asyncio
import http
import logging
from dataclasses import dataclass
from typing import Any

import httptools
from uvicorn._types import ASGISendEvent
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState
from websockets.exceptions import InvalidState
from websockets.http11 import Request

from config.sections import same_named
from config.settings import Settings
from gateway.admission import Admission
from schemas.errors import ErrorCode, error

log = logging.getLogger("gateway.http")
# ASGI scope extension of the gateway's WebSocket protocol: {"send_text": (text) -> bool},
# see `AnsweringWebSocketProtocol.send_text_now`.
SEND_TEXT_NOW = "dispatch.send_text_now"
REQUEST_LINE_EXTRA = len("OPTIONS  HTTP/1.1\r\n")


@dataclass(frozen=True, slots=True)
class HeadLimits:
    # websockets refuses lines over 8192 bytes and more than 128 headers: stay within.
    http_max_line_bytes: int = 8192
    http_max_head_bytes: int = 32 * 1024
    http_max_headers: int = 100
    handshake_timeout_s: float = 10.0

    @classmethod
    def from_settings(cls, settings: Settings) -> HeadLimits:
        return same_named(cls, settings)


class HeadRefused(Exception):
    """The request head broke a limit; carries the HTTP status and the reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status

    @property
    def reason(self) -> str:
        return str(self.args[0])


class LimitedHttpProtocol(HttpToolsProtocol):
    """HttpToolsProtocol whose request heads are bounded in size and time."""

    limits: HeadLimits = HeadLimits()
    admission: Admission | None = None

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._reading_head = True
        self._head_bytes = 0  # request line and header lines reported by the parser
        self._received_in_head = 0  # bytes received since the head began
        self._header_count = 0
        self._url_bytes = 0
        self._deadline: asyncio.TimerHandle | None = None
        self._refused = False

    # -- the deadline ------------------------------------------------------------------
    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(
                self.limits.handshake_timeout_s, self._head_timed_out
            )

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _head_timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        self._refuse(
            HeadRefused(
                408,
                f"request head not complete within {self.limits.handshake_timeout_s:g} s "
                "(DISPATCH_HANDSHAKE_TIMEOUT_S); send the whole request at once",
            )
        )

    def _idle(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    # -- protocol and parser callbacks -------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._unset_keepalive_if_required()
        if self._idle() and not self._reading_head:
            self._arm()  # bytes of a next request on a kept-alive connection
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, HeadRefused):
                self._refuse(cause)
                return
            self.logger.warning("Invalid HTTP request received.")
            self.send_400_response("Invalid HTTP request received.")
            return
        if self._reading_head:
            # An unfinished head: what the parser buffers counts before it reports it.
            self._received_in_head += len(data)
            if self._received_in_head > self.limits.http_max_head_bytes:
                self._refuse(self._head_too_large())

    def _head_too_large(self) -> HeadRefused:
        return HeadRefused(
            431,
            f"request head over {self.limits.http_max_head_bytes} bytes (DISPATCH_HTTP_MAX_HEAD_BYTES)",
        )

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading_head = True
        self._head_bytes = self._header_count = self._url_bytes = self._received_in_head = 0
        self._arm()

    def on_url(self, url: bytes) -> None:
        self._url_bytes += len(url)
        # The method, the version and the line end take up to REQUEST_LINE_EXTRA bytes more.
        if self._url_bytes + REQUEST_LINE_EXTRA > self.limits.http_max_line_bytes:
            raise HeadRefused(
                431, f"request line over {self.limits.http_max_line_bytes} bytes: use a shorter URL"
            )
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.limits.http_max_headers:
            raise HeadRefused(
                431,
                f"more than {self.limits.http_max_headers} header fields (DISPATCH_HTTP_MAX_HEADERS)",
            )
        if len(name) + len(value) + 4 > self.limits.http_max_line_bytes:
            raise HeadRefused(
                431,
                f"header {name[:40].decode('latin-1')!r} is over "
                f"{self.limits.http_max_line_bytes} bytes (DISPATCH_HTTP_MAX_LINE_BYTES)",
            )
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes + self._url_bytes > self.limits.http_max_head_bytes:
            raise self._head_too_large()
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._disarm()
        super().on_headers_complete()

    # -- answering ---------------------------------------------------------------------
    def _refuse(self, refused: HeadRefused) -> None:
        """Answer `refused.status` with the reason, close, and account for it."""
        self._refused = True
        self._disarm()
        answer(self.transport, self.client, refused, self.admission)


def answer(
    transport: asyncio.Transport,
    client: tuple[str, int] | None,
    refused: HeadRefused,
    admission: Admission | None,
) -> None:
    """Write a plain-text HTTP answer naming the reason, close, log and account for it."""
    status = http.HTTPStatus(refused.status)
    body = f"{refused.reason}\n".encode()
    head = (
        f"HTTP/1.1 {status.value} {status.phrase}\r\n"
        "content-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    ).encode()
    if not transport.is_closing():
        transport.write(head + body)
        transport.close()
    host, port = client or ("unknown", 0)
    code = ErrorCode.TOO_LARGE if refused.status == 431 else ErrorCode.PROTOCOL_ERROR
    err = error(code, refused.reason)
    if admission is None or admission.refused_before_app(
        host, port, status.value, err, f"request refused {status.value}"
    ):
        # Logged like the audit record: one by one within the budget, then summarised.
        log.info(
            "gateway.http.refused client=%s:%s status=%d reason=%s",
            host,
            port,
            status.value,
            refused.reason,
        )


class AnsweringWebSocketProtocol(WebSocketsSansIOProtocol):
    """Answers a request the websockets parser refuses, instead of holding the socket.

    uvicorn's protocol leaves websockets' own refusal unsent (its 431/414) or sends
    nothing at all ("did not receive a valid HTTP request", e.g. a GET upgrade with a
    body): the socket stayed open. Its prepared answer is written, or else a 400 naming
    the cause, and the connection is closed.
    """

    admission: Admission | None = None

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        # The app starts on the next loop turn and sees this scope (sessions.Outbox).
        extensions = self.scope.get("extensions")
        if extensions is not None:
            extensions[SEND_TEXT_NOW] = {"send_text": self.send_text_now}

    def send_text_now(self, text: str) -> bool:
        """Write a text frame now, as `send` would, when nothing makes `send` wait or
        refuse; False: leave it to `send`. Saves the writer task's loop turn per frame."""
        if (
            not self.handshake_complete
            or self.close_sent
            or self.initial_response is not None
            or self.disconnected
            or not self.writable.is_set()  # the transport is paused: `send` waits for it
            or self.transport.is_closing()
        ):
            return False
        try:
            self.conn.send_text(text.encode())
        except InvalidState:
            return False
        self.transport.write(b"".join(self.conn.data_to_send()))
        return True

    async def send(self, message: ASGISendEvent) -> None:
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and not message.get("more_body"):
            # uvicorn forgets that a denial response completes the handshake and then logs
            # "ASGI callable returned without completing handshake." at ERROR for each one.
            self.handshake_complete = True

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        exc = self.conn.handshake_exc
        if exc is None or self.handshake_initiated or self.transport.is_closing():
            return
        prepared = b"".join(self.conn.data_to_send())
        if prepared:
            self.transport.write(prepared)
            self.transport.close()
            return
        cause = exc.__cause__ or exc
        reason = f"not a valid WebSocket upgrade request: {str(cause)[:200]}"
        answer(self.transport, self.client, HeadRefused(400, reason), self.admission)


def limited_protocol(limits: HeadLimits, admission: Admission) -> type[LimitedHttpProtocol]:
    """A protocol class with these limits, for `uvicorn.Config(http=...)`."""
    return type(
        "GatewayHttpProtocol",
        (LimitedHttpProtocol,),
        {"limits": limits, "admission": admission},
    )


def answering_ws_protocol(admission: Admission) -> type[AnsweringWebSocketProtocol]:
    """The WebSocket protocol class, for `uvicorn.Config(ws=...)`."""
    return type("GatewayWebSocketProtocol", (AnsweringWebSocketProtocol,), {"admission": admission})


class WorkerHttpProtocol(LimitedHttpProtocol):
    """`dispatch gateway --workers N`: uvicorn imports this class by name in each worker
    (a class made at run time cannot be pickled across the spawn); `bind_worker` gives it
    the worker's limits and admission when the worker builds its app."""


class WorkerWebSocketProtocol(AnsweringWebSocketProtocol):
    """The WebSocket protocol of a worker process (see `WorkerHttpProtocol`)."""


def bind_worker(limits: HeadLimits, admission: Admission) -> None:
    WorkerHttpProtocol.limits = limits
    WorkerHttpProtocol.admission = admission
    WorkerWebSocketProtocol.admission = admission


WORKER_HTTP = f"{__name__}:WorkerHttpProtocol"
WORKER_WS = f"{__name__}:WorkerWebSocketProtocol"
