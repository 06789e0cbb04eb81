"""The composition root: the gateway's app with the audit routes mounted beside it.

The gateway knows nothing of the projections and the audit routes nothing of the gateway;
here the gateway's caller and grants say what each audit request may read, and the audit's
PostgreSQL pool is opened around the gateway's lifespan (the gateway only reports on it).
"""

from __future__ import annotations

import logging
import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response

from config.settings import Settings
from gateway import api as gateway_api
from gateway import app as gateway_app
from gateway import logfilter
from gateway.admission import Admission, AdmissionLimits
from gateway.http_limits import HeadLimits, bind_worker
from projections import api as audit_api


def audit_gate(audit: audit_api.AuditDatabase) -> audit_api.Gate:
    """The gateway authenticates the caller; its grants bound what the audit shows."""

    async def access(request: Request) -> audit_api.AuditAccess | Response:
        user = await gateway_api.caller(request)
        if isinstance(user, Response):
            return user
        state = gateway_api.state_of(request)
        return audit_api.AuditAccess(
            pool=audit.pool,
            schema=state.settings.namespace,
            visible=await state.grants.visible_edges(user),
        )

    return access


def create_app(settings: Settings, admission: Admission | None = None) -> Starlette:
    audit = audit_api.AuditDatabase(settings.database_url, settings.namespace)
    return gateway_app.create_app(
        settings, admission, mounted=audit_api.routes(audit_gate(audit)), audit=audit
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
