"""`dispatch gateway`: serve the gateway with uvicorn, hardened for public WebSockets."""

from __future__ import annotations

import argparse
import resource
from typing import Any

import uvicorn

from dispatch.settings import Settings
from gateway.app import create_app

# The application rejects messages over DISPATCH_MAX_MESSAGE_BYTES (64 KiB) with a
# `too_large` answer and keeps the connection; the protocol layer drops anything beyond
# this hard ceiling (close 1009) before buffering it.
WS_HARD_LIMIT_BYTES = 256 * 1024


def raise_fd_limit() -> None:
    """One descriptor per connected edge: take the hard limit the system allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def serve(settings: Settings, *, log_level: str = "info") -> None:
    raise_fd_limit()
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        access_log=False,
        ws_max_size=max(WS_HARD_LIMIT_BYTES, settings.max_message_bytes * 2),
        ws_per_message_deflate=False,  # compression costs ~45 % throughput and opens zip bombs
        ws_ping_interval=20.0,
        ws_ping_timeout=20.0,
        timeout_graceful_shutdown=5,
        lifespan="on",
    )


def cmd_gateway(args: argparse.Namespace) -> int:
    settings = Settings.from_env().with_overrides(
        host=args.host, port=args.port, gateway_id=args.gateway_id
    )
    serve(settings, log_level="debug" if args.verbose else "info")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "gateway",
        help="serve the WebSocket/HTTP gateway (uvicorn)",
        description="Serve /ws/dashboard, /ws/edge/{edge_id}, /api/commands, /healthz, "
        "/readyz, /metrics and the operator dashboard at /. Several gateways may run "
        "against the same Redis: they keep no state of their own.",
    )
    p.add_argument("--host", help="bind address (default DISPATCH_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default DISPATCH_PORT or 8000)")
    p.add_argument("--gateway-id", help="stable name of this gateway process (default: random)")
    p.set_defaults(func=cmd_gateway)
