"""The edge's one persistent WebSocket to the gateway: connect, keep alive, reconnect.

Reconnects forever with exponential backoff and full jitter (tenacity
`wait_random_exponential`, capped at `backoff_max_s`); the backoff restarts after a
session that stayed up `stable_s`. WebSocket pings every `ping_interval_s` must be
answered within `ping_timeout_s`, so a half-open connection is noticed within their sum
plus the close timeout (10 + 10 + 2 s by default).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_random_exponential
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

log = logging.getLogger("edge.link")

MAX_FRAME_BYTES = 64 * 1024
CLOSE_TIMEOUT_S = 2.0  # after a ping timeout the close handshake waits this long at most
USER_AGENT = "dispatch-edge/0.1"
_CLOSE_HINTS = {
    4001: "another connection for this edge replaced this one; is a second agent running?",
    4003: "the edge credential ended; issue a new one (`dispatch token --edge EDGE`)",
    1013: "the gateway dropped this session because the edge read too slowly",
    1001: "the gateway is shutting down",
}


class LinkState(StrEnum):
    IDLE = "idle"
    CONNECTING = "connecting"
    OPEN = "open"
    WAITING = "waiting"  # backing off before the next attempt
    CLOSED = "closed"


class LinkDown(Exception):
    """An attempt or a session ended in a way that calls for backing off."""


class _SessionEnded(Exception):
    """A stable session ended: reconnect with a fresh backoff."""


class LinkHandler(Protocol):
    async def on_open(self) -> None: ...

    async def on_message(self, data: str | bytes) -> None: ...

    def on_close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class LinkSettings:
    url: str
    token: str
    ping_interval_s: float = 10.0
    ping_timeout_s: float = 10.0
    open_timeout_s: float = 10.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 60.0
    stable_s: float = 10.0


class Link:
    def __init__(self, settings: LinkSettings, handler: LinkHandler) -> None:
        self.settings = settings
        self.handler = handler
        self.state = LinkState.IDLE
        self.sessions = 0
        self._ws: ClientConnection | None = None
        self._closing = asyncio.Event()

    @property
    def is_open(self) -> bool:
        return self._ws is not None and self.state is LinkState.OPEN

    async def send(self, text: str) -> bool:
        """Send one frame; False if there is no open session (the caller keeps it)."""
        ws = self._ws
        if ws is None:
            return False
        try:
            await ws.send(text)
        except ConnectionClosed:
            return False
        return True

    async def close(self) -> None:
        """Stop reconnecting and close the session (code 1000)."""
        self._closing.set()
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close(1000, "edge agent shutting down")

    async def run(self) -> None:
        """Keep a session open until `close()`."""
        settings = self.settings
        while not self._closing.is_set():
            retrying = AsyncRetrying(
                wait=wait_random_exponential(
                    multiplier=settings.backoff_initial_s, max=settings.backoff_max_s
                ),
                retry=retry_if_exception_type(LinkDown),
                before_sleep=self._before_sleep,
                sleep=self._sleep,
                reraise=True,
            )
            try:
                async for attempt in retrying:
                    if self._closing.is_set():
                        break
                    with attempt:
                        await self._session()
            except _SessionEnded:
                # Full jitter on the first reconnect too: a gateway restart must not
                # bring every edge back in the same instant.
                await self._sleep(random.uniform(0, settings.backoff_initial_s))
        self.state = LinkState.CLOSED

    async def _session(self) -> None:
        settings = self.settings
        self.state = LinkState.CONNECTING
        try:
            ws = await connect(
                settings.url,
                additional_headers={"Authorization": f"Bearer {settings.token}"},
                compression=None,
                ping_interval=settings.ping_interval_s,
                ping_timeout=settings.ping_timeout_s,
                open_timeout=settings.open_timeout_s,
                close_timeout=CLOSE_TIMEOUT_S,
                max_size=MAX_FRAME_BYTES,
                user_agent_header=USER_AGENT,
                proxy=None,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            hint = (
                "check --token / DISPATCH_EDGE_TOKEN (`dispatch token --edge EDGE`)"
                if status in (401, 403)
                else "check --gateway"
            )
            raise LinkDown(
                f"the gateway refused the connection with HTTP {status}; {hint}"
            ) from None
        except InvalidURI as exc:
            raise LinkDown(f"--gateway {settings.url!r} is not a ws:// URL: {exc}") from None
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            raise LinkDown(f"cannot reach the gateway at {settings.url}: {exc!r}") from None
        opened = time.monotonic()
        self._ws = ws
        self.state = LinkState.OPEN
        self.sessions += 1
        log.info("edge.session.opened url=%s session=%d", settings.url, self.sessions)
        try:
            await self.handler.on_open()
            async for message in ws:
                await self.handler.on_message(message)
        except ConnectionClosed:
            pass
        finally:
            self._ws = None
            self.state = LinkState.WAITING
            with contextlib.suppress(Exception):
                await ws.close()
            self.handler.on_close()
        code, reason = ws.close_code, ws.close_reason or ""
        lasted_s = time.monotonic() - opened
        hint = _CLOSE_HINTS.get(code or 0, "")
        log.info(
            "edge.session.closed code=%s reason=%r lasted_s=%.1f%s",
            code,
            reason,
            lasted_s,
            f" hint={hint!r}" if hint else "",
        )
        if self._closing.is_set():
            return
        if code in (4001, 4003) or lasted_s < settings.stable_s:
            raise LinkDown(f"session closed with code {code} after {lasted_s:.1f} s")
        raise _SessionEnded

    def _before_sleep(self, retry_state: RetryCallState) -> None:
        self.state = LinkState.WAITING
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None else None
        wait_s = retry_state.upcoming_sleep
        log.warning(
            "edge.link.retrying attempt=%d wait_s=%.2f error=%s",
            retry_state.attempt_number,
            wait_s,
            error,
        )

    async def _sleep(self, seconds: float) -> None:
        """Back off, but wake at once on close()."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._closing.wait()
