"""What one status frame costs the gateway to write: straight onto the socket, or
through the session's writer task.

A real uvicorn server with the gateway's WebSocket protocol; an outbox puts status
frames (bursts of four, as one admission's statuses come) for a client in another
process that reads them as fast as it can. An outbox writes a frame itself when
nothing is queued ahead of it (gateway/sessions.py); the other figure hands every
frame to its writer task, as every frame went before. CPU time of the server process
per frame, median of `--rounds` alternating rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import time

import uvicorn
import uvloop
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

from gateway.http_limits import AnsweringWebSocketProtocol
from gateway.sessions import Outbox

FRAME = (
    '{"type":"status","command_id":"cmd-%d","edge_id":"site1_edge_prod","status":"routed",'
    '"at":"2026-11-30T15:00:00.000Z","error":null}'
)
# A client that upgrades and then reads everything (another process: its CPU is not ours).
READER = (
    "import socket,sys\n"
    "s=socket.create_connection(('127.0.0.1',int(sys.argv[1])))\n"
    "s.sendall(b'GET /ws HTTP/1.1\\r\\nHost: bench\\r\\nUpgrade: websocket\\r\\n"
    "Connection: Upgrade\\r\\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\\r\\n"
    "Sec-WebSocket-Version: 13\\r\\n\\r\\n')\n"
    "while s.recv(1 << 20): pass\n"
)


async def cpu_per_frame(frames: int, *, direct: bool) -> float:
    """Server CPU microseconds per frame written to one reading client."""
    measured: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    async def endpoint(ws: WebSocket) -> None:
        await ws.accept()
        outbox = Outbox(ws, frames + 1)
        if not direct:
            outbox._now = None  # every frame through the writer task
        drained = asyncio.Event()
        outbox.on_drained = drained.set
        outbox.start()
        cpu0 = time.process_time()
        for i in range(frames):
            outbox.put(FRAME % i)
            if i % 4 == 3:
                await asyncio.sleep(0)  # the hub's other work between bursts
        while not outbox.idle:
            drained.clear()
            await drained.wait()
        measured.set_result((time.process_time() - cpu0) / frames * 1e6)
        await outbox.finish()

    listening = socket.create_server(("127.0.0.1", 0))
    port = listening.getsockname()[1]
    config = uvicorn.Config(
        Starlette(routes=[WebSocketRoute("/ws", endpoint)]),
        ws=AnsweringWebSocketProtocol,
        ws_per_message_deflate=False,  # as the gateway runs
        log_level="warning",
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[listening]))
    reader = await asyncio.create_subprocess_exec(sys.executable, "-c", READER, str(port))
    try:
        return await asyncio.wait_for(measured, 60)
    finally:
        server.should_exit = True
        await serving
        await reader.wait()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench frames")
    parser.add_argument("--frames", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args, _ = parser.parse_known_args(argv)
    direct: list[float] = []
    queued: list[float] = []
    for _ in range(args.rounds):
        queued.append(uvloop.run(cpu_per_frame(args.frames, direct=False)))
        direct.append(uvloop.run(cpu_per_frame(args.frames, direct=True)))
    d, q = statistics.median(direct), statistics.median(queued)
    print(
        f"status_frame_cpu: {d:.1f} µs per frame written at once, {q:.1f} µs through the"
        f" writer task ({d / q:.0%}; gateway process, median of {args.rounds} alternating"
        f" rounds of {args.frames} frames to one reading client)"
    )
    return 0
