"""Everything one gateway process holds, opened in the Starlette lifespan."""

from __future__ import annotations

import contextlib
import logging
import uuid
from dataclasses import dataclass

from starlette.requests import HTTPConnection

from config.sections import same_named
from config.settings import Settings
from gateway.auth import AuthConfig, Authenticator, AuthError, EdgeIdentity, User, claimed
from gateway.grants import GrantCache
from gateway.hub import Hub
from gateway.intake import Intake
from gateway.jwks import JwksSource
from gateway.ratelimit import Rate, RateLimiter, RateLimits
from gateway.refusals import refusal_event
from gateway.revocations import Revocations
from ledger.connection import AnyRedis, connect
from ledger.errors import translated
from ledger.store import Ledger
from schemas.errors import ErrorCode, ErrorObject, error

log = logging.getLogger("gateway.state")


@dataclass
class GatewayState:
    settings: Settings
    gateway_id: str
    redis: AnyRedis
    tail_redis: AnyRedis
    ledger: Ledger
    auth: Authenticator
    grants: GrantCache
    hub: Hub
    intake: Intake
    revocations: Revocations
    limiter: RateLimiter
    outbox_limit: int = 1000

    @classmethod
    async def open(cls, settings: Settings) -> GatewayState:
        gateway_id = settings.gateway_id or f"gw-{uuid.uuid4().hex[:8]}"
        # Bursts of handshakes wait for a pooled connection instead of failing; the hot
        # path goes through the ledger's batcher and needs only one or two of them.
        redis = connect(settings.redis_url, cluster=settings.redis_cluster)
        # The tail blocks in XREAD: it gets connections of its own (one; one per
        # partition on a cluster, where a multi-stream XREAD must stay in one slot).
        tail_redis = connect(
            settings.redis_url,
            cluster=settings.redis_cluster,
            max_connections=settings.partitions if settings.redis_cluster else 1,
        )
        ledger = Ledger(redis, settings.ledger(), url=settings.redis_url)
        await ledger.start()
        grants = GrantCache(redis, ledger.keys)
        revocations = Revocations(redis, ledger.keys)
        async with translated("loading revoked tokens", settings.redis_url):
            await revocations.poll()
        hub = Hub(
            ledger,
            grants,
            tail_redis,
            gateway_id,
            revocations=revocations,
            follow_limit=settings.follow_limit,
            edge_inflight=settings.edge_inflight,
        )
        await hub.start()
        limiter = RateLimiter(ledger.batcher, ledger.keys, rate_limits(settings))
        intake = Intake(
            ledger,
            grants,
            gateway_id=gateway_id,
            max_message_bytes=settings.max_message_bytes,
            clock_skew_s=settings.clock_skew_s,
            limiter=limiter,
            revocations=revocations,
            ledger_wait_s=settings.ledger_wait_s,
            admitted=hub.admitted,
        )
        auth = auth_from(settings)
        if auth.jwks is not None:
            await auth.jwks.refresh()  # a bad key set shows in the log at start, not later
        log.info("gateway.started gateway_id=%s partitions=%d", gateway_id, settings.partitions)
        return cls(
            settings,
            gateway_id,
            redis,
            tail_redis,
            ledger,
            auth,
            grants,
            hub,
            intake,
            revocations,
            limiter,
            outbox_limit=settings.outbox_frames,
        )

    async def close(self) -> None:
        await self.hub.stop()
        await self.ledger.close()
        await self.redis.aclose()
        await self.tail_redis.aclose()
        log.info("gateway.stopped gateway_id=%s", self.gateway_id)

    async def check_not_revoked(self, jti: str) -> None:
        """AuthError if revoked; LedgerUnavailable when Redis cannot say (fail closed)."""
        async with translated("checking token revocations", self.settings.redis_url):
            await self.revocations.check(jti)

    async def authenticate_user(self, conn: HTTPConnection, token: str | None) -> User:
        """The user behind `token`, or AuthError (the refusal is in the audit stream)."""
        try:
            if token is None:
                raise AuthError("no bearer token: send `Authorization: Bearer <token>`")
            user = await self.auth.user(token)
            await self.check_not_revoked(user.jti)
        except AuthError as exc:
            await self._audit_auth_failure(conn, "", exc, token)
            raise
        return user

    async def authenticate_edge(
        self, conn: HTTPConnection, token: str | None, edge_id: str
    ) -> EdgeIdentity:
        """The edge behind `token` if it is `edge_id`'s credential, or AuthError (audited)."""
        try:
            if token is None:
                raise AuthError("no bearer token: send `Authorization: Bearer <edge credential>`")
            identity = await self.auth.edge(token, edge_id)
            await self.check_not_revoked(identity.jti)
        except AuthError as exc:
            await self._audit_auth_failure(conn, edge_id, exc, token)
            raise
        return identity

    async def _audit_auth_failure(
        self, conn: HTTPConnection, edge_id: str, exc: AuthError, token: str | None
    ) -> None:
        err = error(ErrorCode.UNAUTHENTICATED, str(exc))
        await self.audit_refusal(conn, edge_id, err, detail=claimed(token))

    async def audit_refusal(
        self,
        conn: HTTPConnection,
        edge_id: str,
        err: ErrorObject,
        *,
        actor: str = "",
        detail: str = "",
    ) -> None:
        """Record a refused handshake or request; unauthenticated peers are named by address."""
        peer = f"{conn.client.host}:{conn.client.port}" if conn.client else "unknown"
        excerpt = f"{conn.url.path} from {peer}" + (f"; {detail}" if detail else "")
        event = refusal_event(actor or f"anonymous@{peer}", err, edge_id=edge_id, excerpt=excerpt)
        with contextlib.suppress(Exception):
            await self.ledger.record_rejection(event)


def auth_from(settings: Settings) -> Authenticator:
    jwks = None
    if settings.jwks_file or settings.jwks_url:
        jwks = JwksSource(file=settings.jwks_file, url=settings.jwks_url, ttl_s=settings.jwks_ttl_s)
    return Authenticator(same_named(AuthConfig, settings), jwks)


def rate_limits(settings: Settings) -> RateLimits:
    return RateLimits(
        user=Rate(settings.rate_user_per_s, settings.rate_user_burst),
        edge=Rate(settings.rate_edge_per_s, settings.rate_edge_burst),
        global_=Rate(settings.rate_global_per_s, settings.rate_global_burst),
    )
