"""An outbox writes a frame at once when nothing is ahead of it (gateway/sessions.py,
`send_text_now` in gateway/http_limits.py), and queues it for its writer when the
socket cannot take more: a real uvicorn server with the gateway's WebSocket protocol
and a real client that stops reading, then reads everything, in order."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import uvicorn
import websockets
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

from gateway.http_limits import AnsweringWebSocketProtocol
from gateway.sessions import CloseCode, Outbox

# Random text, so that compression cannot shrink it: a few hundred of these fill the
# socket buffers the client leaves unread.
FRAME = secrets.token_hex(8_192)


@contextlib.asynccontextmanager
async def _served(endpoint: Callable[[WebSocket], Awaitable[None]]) -> AsyncIterator[int]:
    """`endpoint` at ws://127.0.0.1:PORT/ws on a real uvicorn server with the gateway's
    WebSocket protocol; yields PORT."""
    app = Starlette(routes=[WebSocketRoute("/ws", endpoint)])
    listening = socket.create_server(("127.0.0.1", 0))  # connections wait in its backlog
    config = uvicorn.Config(
        app,
        ws=AnsweringWebSocketProtocol,
        ws_per_message_deflate=False,  # as the gateway runs
        log_level="warning",
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[listening]))
    try:
        yield listening.getsockname()[1]
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(serving, 10)


async def test_frames_go_out_at_once_then_queue_behind_a_full_socket_in_order() -> None:
    seen: dict[str, int] = {}
    go, filled, done = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def endpoint(ws: WebSocket) -> None:
        await ws.accept()
        outbox = Outbox(ws, limit=100_000)
        drained: list[int] = []
        outbox.on_drained = lambda: drained.append(1)
        # No writer yet: whatever reaches the client was written by `put` itself.
        for i in range(3):
            assert outbox.put(f"{i}:small")
        seen["drained_in_put"] = len(drained)
        await asyncio.sleep(0)
        seen["drained_after"] = len(drained)
        await go.wait()
        n = 3
        while outbox.idle and n < 10_000:  # until the socket pushes back
            outbox.put(f"{n}:{FRAME}")
            n += 1
        seen["queued_at"] = n
        for i in range(n, n + 50):  # behind the queued one: queued too, in order
            outbox.put(f"{i}:{FRAME}")
        seen["sent"] = n + 50
        filled.set()
        outbox.put("end")
        outbox.start()
        await done.wait()  # the client read everything
        await outbox.finish()

    async with _served(endpoint) as port:
        # A small receive buffer: the kernel on this machine takes tens of MB otherwise.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65_536)
        sock.connect(("127.0.0.1", port))
        async with websockets.connect(
            f"ws://127.0.0.1:{port}/ws", sock=sock, max_size=None, max_queue=4
        ) as client:
            first = [await asyncio.wait_for(client.recv(), 5) for _ in range(3)]
            assert first == ["0:small", "1:small", "2:small"]
            # Drained once, after the turn that wrote them (as the writer task would).
            assert (seen["drained_in_put"], seen["drained_after"]) == (0, 1)
            go.set()
            await asyncio.wait_for(filled.wait(), 10)  # not reading: the socket fills up
            assert 3 < seen["queued_at"] < 10_000
            numbers = []
            while (message := await asyncio.wait_for(client.recv(), 10)) != "end":
                numbers.append(int(str(message).split(":", 1)[0]))
            done.set()
            assert numbers == list(range(3, seen["sent"]))


async def test_a_session_ends_when_its_reader_swallowed_the_first_cancellation() -> None:
    """The outbox closed (a slow client, a replaced edge): `serve` stops the reader even
    when a Redis call swallowed the first cancellation (ledger/tasks.py) and the reader
    went on to wait for good, instead of keeping the session open."""
    swallowed: list[int] = []
    ended = asyncio.Event()

    async def reading(never: asyncio.Event) -> None:
        try:
            await asyncio.sleep(3600)  # inside a Redis call
        except asyncio.CancelledError:
            swallowed.append(1)  # as Python 3.11's wait_for does
        await never.wait()

    async def endpoint(ws: WebSocket) -> None:
        await ws.accept()
        outbox = Outbox(ws, limit=10)
        outbox.start()
        asyncio.get_running_loop().call_later(0.05, outbox.close, CloseCode.POLICY, "slow")
        await outbox.serve(reading(asyncio.Event()))
        ended.set()
        await outbox.finish()

    async with (
        _served(endpoint) as port,
        websockets.connect(f"ws://127.0.0.1:{port}/ws") as client,
    ):
        await asyncio.wait_for(ended.wait(), 5)
        with contextlib.suppress(websockets.ConnectionClosed):
            await asyncio.wait_for(client.recv(), 5)
        assert client.close_code == CloseCode.POLICY
    assert swallowed == [1]
