"""The bare relay baseline: dashboard -> edge -> dashboard relayed in memory.

The same stack as the gateway (Starlette on uvicorn with uvloop and httptools,
per-message compression off) and the same endpoints and frames, but no ledger, no
authentication, no audit: a dashboard's command goes to the connected edge named in
its target, and the edge's acknowledgments go back to the dashboard that sent it.
`make bench` prints every gateway figure also as a ratio to this one.

Run: `python -m bench._relay --port P`.
"""

from __future__ import annotations

import argparse
import json

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

edges: dict[str, WebSocket] = {}
senders: dict[str, WebSocket] = {}


async def dashboard(ws: WebSocket) -> None:
    await ws.accept()
    try:
        while True:
            raw = await ws.receive_text()
            frame = json.loads(raw)
            senders[frame["command_id"]] = ws
            edge = edges.get(frame["target"]["edge_id"])
            if edge is not None:
                await edge.send_text(raw)
    except WebSocketDisconnect:
        pass


async def edge(ws: WebSocket) -> None:
    await ws.accept()
    edges[ws.path_params["edge_id"]] = ws
    try:
        while True:
            raw = await ws.receive_text()
            ack = json.loads(raw)
            sender = senders.get(ack["command_id"])
            if sender is None:
                continue
            if ack["status"] != "accepted":
                del senders[ack["command_id"]]
            await sender.send_text(raw)
    except WebSocketDisconnect:
        pass


async def healthz(_: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


app = Starlette(
    routes=[
        Route("/healthz", healthz),
        WebSocketRoute("/ws/dashboard", dashboard),
        WebSocketRoute("/ws/edge/{edge_id}", edge),
    ]
)


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench._relay")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        ws_per_message_deflate=False,
        lifespan="off",
    )


if __name__ == "__main__":
    main()
