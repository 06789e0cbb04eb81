"""The Starlette application: routes and the lifespan that opens every client."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.routing import Route, WebSocketRoute

from dispatch.settings import Settings
from gateway import api
from gateway.dashboard import dashboard_endpoint
from gateway.edges import edge_endpoint
from gateway.state import GatewayState


def create_app(settings: Settings) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state = await GatewayState.open(settings)
        app.state.gateway = state
        try:
            yield
        finally:
            await state.close()

    routes = [
        Route("/", api.index),
        Route("/healthz", api.healthz),
        Route("/readyz", api.readyz),
        Route("/metrics", api.metrics_endpoint),
        Route("/api/commands", api.post_command, methods=["POST"]),
        Route("/api/commands", api.list_commands, methods=["GET"]),
        Route("/api/rejections", api.list_rejections, methods=["GET"]),
        Route("/api/commands/{command_id}", api.get_command, methods=["GET"]),
        Route("/api/commands/{command_id}/cancel", api.cancel_command, methods=["POST"]),
        Route("/api/edges/{edge_id}/config", api.edge_config, methods=["GET"]),
        WebSocketRoute("/ws/dashboard", dashboard_endpoint),
        WebSocketRoute("/ws/edge/{edge_id}", edge_endpoint),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def create_worker_app() -> Starlette:
    """App factory for `dispatch gateway --workers N`: each worker process builds its own
    app from the environment; a named gateway gets one id per worker (`NAME-wPID`)."""
    # A spawned worker did not run `dispatch`'s main: log the same way it does.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = Settings.from_env()
    if settings.gateway_id:
        settings = settings.with_overrides(gateway_id=f"{settings.gateway_id}-w{os.getpid()}")
    return create_app(settings)
