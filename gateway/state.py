"""Everything one gateway process holds, opened in the Starlette lifespan."""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from dataclasses import dataclass

from psycopg_pool import AsyncConnectionPool
from redis.asyncio import BlockingConnectionPool, Redis
from starlette.requests import HTTPConnection

from dispatch.settings import Settings
from gateway.auth import Authenticator, AuthError
from gateway.grants import GrantCache
from gateway.hub import Hub
from gateway.intake import Intake
from ledger.ids import new_event_id
from ledger.store import Ledger
from schemas.errors import ErrorObject
from schemas.events import Rejected

log = logging.getLogger("gateway.state")


@dataclass
class GatewayState:
    settings: Settings
    gateway_id: str
    redis: Redis
    tail_redis: Redis
    ledger: Ledger
    auth: Authenticator
    grants: GrantCache
    hub: Hub
    intake: Intake
    pg: AsyncConnectionPool | None
    outbox_limit: int = 1000

    @classmethod
    async def open(cls, settings: Settings) -> GatewayState:
        gateway_id = settings.gateway_id or f"gw-{uuid.uuid4().hex[:8]}"
        # Bursts of handshakes wait for a pooled connection instead of failing; the hot
        # path goes through the ledger's batcher and needs only one or two of them.
        redis = Redis(
            connection_pool=BlockingConnectionPool.from_url(
                settings.redis_url, max_connections=32, timeout=10
            )
        )
        # The tail blocks in XREAD: it gets a connection of its own, and only one.
        tail_redis = Redis.from_url(settings.redis_url, max_connections=1)
        ledger = Ledger(redis, settings.ledger(), url=settings.redis_url)
        await ledger.start()
        grants = GrantCache(redis, ledger.keys)
        hub = Hub(ledger, grants, tail_redis, gateway_id)
        await hub.start()
        intake = Intake(
            ledger,
            grants,
            gateway_id=gateway_id,
            max_message_bytes=settings.max_message_bytes,
            clock_skew_s=settings.clock_skew_s,
        )
        pg = AsyncConnectionPool(
            settings.database_url,
            min_size=1,
            max_size=4,
            open=False,
            timeout=5,
            kwargs={"autocommit": True},
        )
        try:
            await pg.open(wait=False)
        except Exception as exc:  # commands flow without PostgreSQL; /readyz reports it
            log.warning("gateway.postgres.unavailable error=%s", exc)
        log.info("gateway.started gateway_id=%s partitions=%d", gateway_id, settings.partitions)
        return cls(
            settings,
            gateway_id,
            redis,
            tail_redis,
            ledger,
            auth_from(settings),
            grants,
            hub,
            intake,
            pg,
        )

    async def close(self) -> None:
        await self.hub.stop()
        await self.ledger.close()
        if self.pg is not None:
            with contextlib.suppress(Exception):
                await self.pg.close()
        await self.redis.aclose()
        await self.tail_redis.aclose()
        log.info("gateway.stopped gateway_id=%s", self.gateway_id)

    async def check_not_revoked(self, jti: str) -> None:
        revoked = await self.ledger.batcher.call("ZSCORE", self.ledger.keys.revoked_tokens(), jti)
        if revoked is not None:
            raise AuthError("token refused: it has been revoked")

    async def audit_refusal(self, conn: HTTPConnection, edge_id: str, err: ErrorObject) -> None:
        """Record a refused handshake or request: nobody authenticated, so the peer is named."""
        peer = f"{conn.client.host}:{conn.client.port}" if conn.client else "unknown"
        event = Rejected(
            event_id=new_event_id(),
            at=time.time_ns() // 1_000_000,
            command_id="",
            edge_id=edge_id,
            actor=f"anonymous@{peer}",
            error=err,
            stage="gateway",
            input_excerpt=f"{conn.url.path}",
        )
        with contextlib.suppress(Exception):
            await self.ledger.record_rejection(event)


def auth_from(settings: Settings) -> Authenticator:
    return Authenticator(
        settings.jwt_secret, issuer=settings.jwt_issuer, audience=settings.jwt_audience
    )
