"""`dispatch gateway`: serve the gateway with uvicorn, hardened for public WebSockets."""

from __future__ import annotations

import argparse
import os
import resource
import socket
from collections.abc import Callable
from typing import Any

import uvicorn
from starlette.applications import Starlette
from uvicorn.supervisors import Multiprocess

from config import logformat
from config.settings import Settings
from gateway import logfilter
from gateway.admission import Admission, AdmissionLimits
from gateway.http_limits import (
    WORKER_HTTP,
    WORKER_WS,
    HeadLimits,
    answering_ws_protocol,
    limited_protocol,
)
from gateway.sessions import ws_hard_limit_bytes


def raise_fd_limit() -> None:
    """One descriptor per connected edge: take the hard limit the system allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# The composition root's app factory (dispatch/app.py) and its import path, which each
# worker process calls when there are several.
AppFactory = Callable[[Settings, Admission], Starlette]


def serve(
    settings: Settings,
    make_app: AppFactory,
    worker_app: str,
    *,
    log_level: str = "info",
    workers: int = 1,
) -> None:
    raise_fd_limit()
    admission = Admission(AdmissionLimits.from_settings(settings))
    config = uvicorn.Config(
        make_app(settings, admission) if workers == 1 else worker_app,
        factory=workers > 1,
        workers=workers,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        access_log=False,
        # JSON logs: uvicorn's own lines go through the root handler too (config/logformat.py).
        log_config=None if logformat.log_format() == "json" else uvicorn.config.LOGGING_CONFIG,
        # Our own protocols: bounded request heads (431/408) and answered refusals.
        http=limited_protocol(HeadLimits.from_settings(settings), admission)
        if workers == 1
        else WORKER_HTTP,
        ws=answering_ws_protocol(admission) if workers == 1 else WORKER_WS,
        # X-Forwarded-* only from the proxies named; otherwise the socket's peer counts.
        proxy_headers=bool(settings.forwarded_allow_ips),
        forwarded_allow_ips=list(settings.forwarded_allow_ips),
        ws_max_size=ws_hard_limit_bytes(settings.max_message_bytes),
        ws_per_message_deflate=False,  # compression costs ~45 % throughput and opens zip bombs
        ws_ping_interval=20.0,
        ws_ping_timeout=20.0,
        timeout_graceful_shutdown=5,
        lifespan="on",
    )
    logfilter.install()  # after uvicorn configured logging: its handlers exist now
    server = uvicorn.Server(config)
    if not settings.socket_send_buffer_bytes and workers == 1:
        server.run()
        return
    sock = config.bind_socket()
    if settings.socket_send_buffer_bytes:
        # Accepted connections inherit a fixed send buffer: it bounds the kernel memory
        # each client can pin, and a client that stops reading fills it (and then its
        # outbox, and is disconnected) after that many bytes instead of the kernel's
        # autotuned megabytes.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, settings.socket_send_buffer_bytes)
    if workers == 1:
        server.run(sockets=[sock])
        return
    # Several processes accept on the one listening socket (the kernel spreads the
    # connections); each worker has its own hub, tail and ledger clients, and they share
    # nothing but Redis, like gateways side by side.
    Multiprocess(config, sockets=[sock]).run()


def cmd_gateway(args: argparse.Namespace, make_app: AppFactory, worker_app: str) -> int:
    """Serve /ws/dashboard, /ws/edge/{edge_id}, /api/commands, /healthz, /readyz, /metrics
    and the operator dashboard at /. Several gateways may run against the same Redis: they
    keep no state of their own."""
    settings = Settings.from_env().with_overrides(
        host=args.host, port=args.port, gateway_id=args.gateway_id
    )
    if args.workers < 1:
        raise SystemExit(f"dispatch gateway: --workers must be at least 1, got {args.workers}")
    if args.workers > 1 and args.gateway_id:
        os.environ["DISPATCH_GATEWAY_ID"] = args.gateway_id  # the workers read the environment
    log_level = "debug" if args.verbose else "info"
    serve(settings, make_app, worker_app, log_level=log_level, workers=args.workers)
    return 0


def register(sub: Any, make_app: AppFactory, worker_app: str) -> None:
    summary = "serve the WebSocket/HTTP gateway (uvicorn)"
    p = sub.add_parser("gateway", help=summary, description=cmd_gateway.__doc__)
    p.add_argument("--host", help="bind address (default DISPATCH_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default DISPATCH_PORT or 8000)")
    p.add_argument("--gateway-id", help="stable name of this gateway process (default: random)")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes sharing the port (default 1; one per core is the ceiling)",
    )
    p.set_defaults(func=lambda args: cmd_gateway(args, make_app, worker_app))
