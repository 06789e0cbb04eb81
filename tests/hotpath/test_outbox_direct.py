"""An outbox writes a frame at once when nothing is ahead of it (gateway/sessions.py,
`send_text_now` in gateway/http_limits.py), and queues it for its writer when the
socket cannot take more: a real uvicorn server with the gateway's WebSocket protocol
and a real client that stops reading, then reads everything, in order."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket

import uvicorn
import websockets
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

from gateway.http_limits import AnsweringWebSocketProtocol
from gateway.sessions import Outbox

# Random text, so that compression cannot shrink it: a few hundred of these fill the
# socket buffers the client leaves unread.
FRAME = secrets.token_hex(8_192)


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

    app = Starlette(routes=[WebSocketRoute("/ws", endpoint)])
    listening = socket.create_server(("127.0.0.1", 0))  # connections wait in its backlog
    port = listening.getsockname()[1]
    config = uvicorn.Config(
        app,
        ws=AnsweringWebSocketProtocol,
        ws_per_message_deflate=False,  # as the gateway runs
        log_level="warning",
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[listening]))
    try:
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
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(serving, 10)
