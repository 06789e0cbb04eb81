"""The Starlette application: routes and the lifespan that opens every client."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Route, WebSocketRoute

from dispatch.settings import Settings
from gateway import api, console_api, logfilter
from gateway.admission import Admission, AdmissionLimits, AdmissionMiddleware
from gateway.dashboard import dashboard_endpoint
from gateway.edges import edge_endpoint
from gateway.headers import SecurityHeaders
from gateway.http_limits import HeadLimits, bind_worker
from gateway.lifecycle_metrics import TRANSITION_LOGGER, LifecycleMetrics
from gateway.observer import Observer, ObserverConfig
from gateway.state import GatewayState
from ledger.verdicts import VerdictLoop


def create_app(settings: Settings, admission: Admission | None = None) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state = await GatewayState.open(settings)
        app.state.gateway = state
        if settings.metrics_lifecycle:
            state.hub.lifecycle = LifecycleMetrics(settings.ack_timeout_ms)
        if not settings.log_transitions:
            logging.getLogger(TRANSITION_LOGGER).setLevel(logging.WARNING)
        observer = observer_for(settings, state)
        observer.start()
        # Verdicts need Redis only: every gateway reaches them, whatever the audit does.
        loop = VerdictLoop(state.ledger, f"gateway:{state.gateway_id}", process="gateway")
        verdicts = asyncio.create_task(loop.run(), name="verdicts")
        try:
            yield
        finally:
            verdicts.cancel()
            await asyncio.gather(verdicts, return_exceptions=True)
            await observer.stop()
            await state.close()

    routes = [
        Route("/", api.index),
        Route("/healthz", api.healthz),
        Route("/readyz", api.readyz),
        Route("/metrics", api.metrics_endpoint),
        Route("/api/commands", api.post_command, methods=["POST"]),
        Route("/api/commands", api.list_commands, methods=["GET"]),
        Route("/api/rejections", api.list_rejections, methods=["GET"]),
        Route("/api/stats", api.get_stats, methods=["GET"]),
        Route("/api/commands/{command_id}", api.get_command, methods=["GET"]),
        Route("/api/commands/{command_id}/cancel", api.cancel_command, methods=["POST"]),
        Route("/api/edges/{edge_id}/config", api.edge_config, methods=["GET"]),
        WebSocketRoute("/ws/dashboard", dashboard_endpoint),
        WebSocketRoute("/ws/edge/{edge_id}", edge_endpoint),
        *console_api.routes(),
    ]
    admission = admission or Admission(AdmissionLimits.from_settings(settings))
    guard = Middleware(AdmissionMiddleware, admission=admission)  # docs/security.md
    # Headers outermost, so refusals of the admission guard carry them too.
    middleware = [Middleware(SecurityHeaders), guard]
    return Starlette(routes=routes, lifespan=lifespan, middleware=middleware)


def observer_for(settings: Settings, state: GatewayState) -> Observer:
    config = ObserverConfig(
        interval_s=settings.metrics_interval_s,
        top_edges=settings.metrics_top_edges,
        schema=settings.namespace,
    )
    return Observer(
        state.redis, state.ledger.keys, config, pg=state.pg, connected_edges=state.hub.edges.keys
    )


def create_worker_app() -> Starlette:
    """App factory for `dispatch gateway --workers N`: each worker process builds its own
    app from the environment; a named gateway gets one id per worker (`NAME-wPID`)."""
    # A spawned worker did not run `dispatch`'s main: log the same way it does.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = Settings.from_env()
    if settings.gateway_id:
        settings = settings.with_overrides(gateway_id=f"{settings.gateway_id}-w{os.getpid()}")
    # The worker's own protocol classes and log redaction (the parent's do not cross over).
    admission = Admission(AdmissionLimits.from_settings(settings))
    bind_worker(HeadLimits.from_settings(settings), admission)
    logfilter.install()
    return create_app(settings, admission)
