"""The Starlette application: routes and the lifespan that opens every client."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from typing import Protocol

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute, Route, WebSocketRoute

from config.settings import Settings
from gateway import api, console_api
from gateway.admission import Admission, AdmissionLimits, AdmissionMiddleware
from gateway.dashboard_socket import dashboard_endpoint
from gateway.edge_socket import edge_endpoint
from gateway.headers import SecurityHeaders
from gateway.lifecycle_metrics import TRANSITION_LOGGER, LifecycleMetrics
from gateway.observer import AuditProbe, Observer, ObserverConfig
from gateway.state import GatewayState
from ledger.tasks import cancel_and_wait
from ledger.verdicts import VerdictLoop


class Audit(Protocol):
    """The audit database as the composition root hands it over (dispatch/app.py): opened
    around the gateway's lifespan, probed for /readyz and the observer's gauges. The
    gateway never needs it, so an audit outage never takes a gateway out of rotation."""

    def opened(self) -> AbstractAsyncContextManager[object]: ...

    async def probe(self, timeout_s: float) -> int | None: ...


def create_app(
    settings: Settings,
    admission: Admission | None = None,
    mounted: Sequence[BaseRoute] = (),
    audit: Audit | None = None,
) -> Starlette:
    """The gateway's routes, plus `mounted` ones the composition root adds (dispatch/app.py)."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with audit.opened() if audit is not None else nullcontext():
            app.state.audit_probe = audit.probe if audit is not None else None
            state = await GatewayState.open(settings)
            app.state.gateway = state
            if settings.metrics_lifecycle:
                state.hub.lifecycle = LifecycleMetrics(settings.ack_timeout_ms)
            if not settings.log_transitions:
                logging.getLogger(TRANSITION_LOGGER).setLevel(logging.WARNING)
            observer = observer_for(settings, state, app.state.audit_probe)
            observer.start()
            # Verdicts need Redis only: every gateway reaches them, whatever the audit does.
            loop = VerdictLoop(state.ledger, f"gateway:{state.gateway_id}", process="gateway")
            verdicts = asyncio.create_task(loop.run(), name="verdicts")
            try:
                yield
            finally:
                await cancel_and_wait([verdicts])
                await observer.stop()
                await state.close()

    routes = [
        Route("/", api.index),
        Route("/healthz", api.healthz),
        Route("/readyz", api.readyz),
        Route("/metrics", api.metrics_endpoint),
        Route("/api/commands", api.post_command, methods=["POST"]),
        Route("/api/commands/{command_id}", api.get_command, methods=["GET"]),
        Route("/api/commands/{command_id}/cancel", api.cancel_command, methods=["POST"]),
        Route("/api/edges/{edge_id}/config", api.edge_config, methods=["GET"]),
        WebSocketRoute("/ws/dashboard", dashboard_endpoint),
        WebSocketRoute("/ws/edge/{edge_id}", edge_endpoint),
        *console_api.routes(),
        *mounted,
    ]
    admission = admission or Admission(AdmissionLimits.from_settings(settings))
    guard = Middleware(AdmissionMiddleware, admission=admission)  # docs/security.md
    # Headers outermost, so refusals of the admission guard carry them too.
    middleware = [Middleware(SecurityHeaders), guard]
    return Starlette(routes=routes, lifespan=lifespan, middleware=middleware)


def observer_for(settings: Settings, state: GatewayState, audit: AuditProbe | None) -> Observer:
    config = ObserverConfig(
        interval_s=settings.metrics_interval_s, top_edges=settings.metrics_top_edges
    )
    return Observer(
        state.redis, state.ledger.keys, config, audit=audit, connected_edges=state.hub.edges.keys
    )
