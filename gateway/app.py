"""The Starlette application: routes and the lifespan that opens every client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.routing import Route, WebSocketRoute

from dispatch.settings import Settings
from gateway import api
from gateway.dashboard import dashboard_endpoint
from gateway.edges import edge_endpoint
from gateway.state import GatewayState
from ledger.verdicts import VerdictLoop


def create_app(settings: Settings) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state = await GatewayState.open(settings)
        app.state.gateway = state
        # Verdicts need Redis only: every gateway reaches them, whatever the audit does.
        loop = VerdictLoop(state.ledger, f"gateway:{state.gateway_id}", process="gateway")
        verdicts = asyncio.create_task(loop.run(), name="verdicts")
        try:
            yield
        finally:
            verdicts.cancel()
            await asyncio.gather(verdicts, return_exceptions=True)
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
