"""`dispatch token`, `grant`, `revoke`, `revoke-token`: credentials and the grants store."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from typing import Any

from joserfc import jws, jwt

from config.settings import Settings
from gateway import grants
from gateway.auth import ACCESS_TOKEN_TYPE, EDGE_TOKEN_TYPE, SAFE_USER_ID, signing_key
from gateway.revocations import revoke_token
from ledger.connection import connect
from ledger.errors import translated
from ledger.keys import Keys, check_id

USER_TTL_S = 3600
EDGE_TTL_S = 365 * 86_400


def user_claims(
    user: str, control: list[str], view: list[str], ttl_s: int, now: int | None = None
) -> dict[str, Any]:
    """Claims of a Django REST framework SimpleJWT access token, plus optional grants."""
    now = int(time.time()) if now is None else now
    claims: dict[str, Any] = {
        "token_type": ACCESS_TOKEN_TYPE,
        "exp": now + ttl_s,
        "iat": now,
        "jti": uuid.uuid4().hex,
        "user_id": user,
    }
    if control:
        claims["can_control"] = sorted(set(control))
    if view:
        claims["can_view"] = sorted(set(view))
    return claims


def edge_claims(edge_id: str, ttl_s: int, now: int | None = None) -> dict[str, Any]:
    now = int(time.time()) if now is None else now
    return {
        "token_type": EDGE_TOKEN_TYPE,
        "edge_id": edge_id,
        "sub": f"edge:{edge_id}",
        "exp": now + ttl_s,
        "iat": now,
        "jti": uuid.uuid4().hex,
    }


def sign(claims: dict[str, Any], secret: str) -> str:
    return jwt.encode({"alg": "HS256", "typ": "JWT"}, claims, signing_key(secret))


def _edge_id(value: str) -> str:
    try:
        return check_id(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a valid edge id (letters, digits, '_', '.', '-')"
        ) from None


def _scope(value: str) -> str:
    try:
        return grants.check_scope(value)
    except grants.GrantError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _group_name(value: str) -> str:
    return _scope(grants.GROUP_PREFIX + value).removeprefix(grants.GROUP_PREFIX)


async def _change_group(settings: Settings, args: argparse.Namespace) -> None:
    redis = connect(settings.redis_url, cluster=settings.redis_cluster)
    keys = Keys(settings.namespace, settings.partitions)
    try:
        async with translated("changing the site group", settings.redis_url):
            await grants.change_group(redis, keys, args.group, args.edges, add=args.action == "add")
    finally:
        await redis.aclose()


def cmd_group(args: argparse.Namespace) -> int:
    asyncio.run(_change_group(Settings.from_env(), args))
    where = "to" if args.action == "add" else "from"
    print(f"{args.action} {' '.join(args.edges)} {where} group {args.group}")
    return 0


async def enroll(settings: Settings, edge_id: str) -> None:
    redis = connect(settings.redis_url, cluster=settings.redis_cluster)
    try:
        async with translated("enrolling the edge", settings.redis_url):
            await redis.sadd(Keys(settings.namespace, settings.partitions).edges(), edge_id)
    finally:
        await redis.aclose()


def _refuse(message: str) -> int:
    print(f"dispatch token: {message}", file=sys.stderr)
    return 2


def _too_long(ttl_s: int, max_s: int, variable: str, what: str) -> str | None:
    """Why gateways would refuse a `what` living `ttl_s` (None: they would not)."""
    if ttl_s <= max_s:
        return None
    return f"--ttl {ttl_s} exceeds {variable} ({max_s}); gateways would refuse the {what}"


def cmd_token(args: argparse.Namespace) -> int:
    """Print a JWT signed HS256 with DISPATCH_JWT_SECRET. A user token carries SimpleJWT's
    claims (token_type, user_id, jti, exp, iat) and optional per-edge grants; an edge
    credential is valid for that edge only (and enrolls the edge)."""
    settings = Settings.from_env()
    if args.edge and args.user:
        return _refuse("give either --user or --edge, not both")
    if args.ttl is not None and args.ttl <= 0:
        return _refuse(f"--ttl must be positive, got {args.ttl}")
    if args.edge:
        ttl_s = args.ttl or EDGE_TTL_S
        max_s = settings.edge_max_lifetime_s
        problem = _too_long(ttl_s, max_s, "DISPATCH_EDGE_MAX_LIFETIME_S", "credential")
        if problem is not None:
            return _refuse(problem)
        if not args.no_enroll:
            asyncio.run(enroll(settings, args.edge))
        print(sign(edge_claims(args.edge, ttl_s), settings.edge_secret))
        return 0
    if not args.user:
        return _refuse("--user USER or --edge EDGE is required")
    if not SAFE_USER_ID.fullmatch(args.user):
        return _refuse(f"user {args.user!r} must be 1-128 letters, digits or '_.@+:-'")
    ttl_s = args.ttl or USER_TTL_S
    problem = _too_long(ttl_s, settings.jwt_max_lifetime_s, "DISPATCH_JWT_MAX_LIFETIME_S", "token")
    if problem is not None:
        return _refuse(problem)
    claims = user_claims(args.user, args.can_control, args.can_view, ttl_s)
    print(sign(claims, settings.jwt_secret))
    return 0


def revocation_target(value: str, default_until_s: float) -> tuple[str, float]:
    """(jti, refuse-until) from a whole token (its `jti` and `exp`) or a bare jti.

    The token's signature is not checked: putting a jti on the deny-list can only
    refuse more, and tokens of other issuers (Django) must be revocable too.
    """
    if value.count(".") == 2:
        try:
            claims = jws.extract_compact(value.encode()).payload or b"{}"
            decoded = json.loads(claims)
        except Exception:
            raise ValueError("this looks like a token but cannot be read") from None
        jti, exp = decoded.get("jti"), decoded.get("exp")
        if not isinstance(jti, str) or not jti:
            raise ValueError("the token has no `jti` claim to revoke")
        until = float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else 0.0
        return jti, max(until, time.time() + 60)
    if not 0 < len(value) <= 255:
        raise ValueError("a jti is 1-255 characters")
    return value, default_until_s


async def _revoke_token(settings: Settings, jti: str, until_s: float) -> None:
    redis = connect(settings.redis_url, cluster=settings.redis_cluster)
    try:
        async with translated("revoking the token", settings.redis_url):
            await revoke_token(redis, Keys(settings.namespace, settings.partitions), jti, until_s)
    finally:
        await redis.aclose()


def cmd_revoke_token(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    # A bare jti says nothing about expiry: keep it as long as any token may live.
    longest_s = max(settings.jwt_max_lifetime_s, settings.edge_max_lifetime_s)
    default_until = time.time() + longest_s + settings.jwt_leeway_s
    try:
        jti, until_s = revocation_target(args.token_or_jti.strip(), default_until)
    except ValueError as exc:
        print(f"dispatch revoke-token: {exc}", file=sys.stderr)
        return 2
    asyncio.run(_revoke_token(settings, jti, until_s))
    until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(until_s))
    print(f"revoked token jti={jti} until {until}; open connections close within a second")
    return 0


async def _change_grant(settings: Settings, args: argparse.Namespace, add: bool) -> None:
    redis = connect(settings.redis_url, cluster=settings.redis_cluster)
    keys = Keys(settings.namespace, settings.partitions)
    try:
        async with translated("changing grants", settings.redis_url):
            change = grants.grant if add else grants.revoke
            await change(redis, keys, args.user, args.edge, args.permission)
    finally:
        await redis.aclose()


def cmd_grant(args: argparse.Namespace, *, add: bool = True) -> int:
    settings = Settings.from_env()
    asyncio.run(_change_grant(settings, args, add))
    verb = "granted" if add else "revoked"
    print(f"{verb} {args.permission} on {args.edge} for {args.user}")
    return 0


def register(sub: Any) -> None:
    summary = "print a user JWT or an edge credential"
    token = sub.add_parser("token", help=summary, description=cmd_token.__doc__)
    token.add_argument("--user", help="user id (the SimpleJWT `user_id` claim)")
    token.add_argument("--edge", type=_edge_id, help="print the credential of this edge instead")
    for flag, may in (("--can-control", "command"), ("--can-view", "watch")):
        token.add_argument(
            flag,
            action="append",
            default=[],
            metavar="EDGE",
            type=_edge_id,
            help=f"edge the user may {may} (repeatable)",
        )
    token.add_argument(
        "--ttl",
        type=int,
        metavar="SEC",
        help=f"lifetime in seconds (default {USER_TTL_S} for users, {EDGE_TTL_S} for edges)",
    )
    token.add_argument(
        "--no-enroll",
        action="store_true",
        help="with --edge: do not record the edge as enrolled in Redis",
    )
    token.set_defaults(func=cmd_token)

    for name, add in (("grant", True), ("revoke", False)):
        p = sub.add_parser(
            name,
            help=f"{name} a permission in the grants store",
            description=f"{name.capitalize()} USER's PERMISSION ({' or '.join(grants.PERMISSIONS)}) "
            "on EDGE ('*' for every edge, group:NAME for a site group). Open connections "
            "see the change within a second.",
        )
        p.add_argument("user")
        p.add_argument("edge", type=_scope, metavar="EDGE", help="an edge id, '*' or group:NAME")
        p.add_argument("permission", choices=grants.PERMISSIONS)
        p.set_defaults(func=lambda a, add=add: cmd_grant(a, add=add))

    group = sub.add_parser(
        "group",
        help="add edges to or remove them from a site group",
        description="Site groups give fleet-level grants: `dispatch grant USER group:NAME "
        "PERMISSION` covers every edge in the group, including edges added later. Open "
        "connections see membership changes within a second.",
    )
    group.add_argument("action", choices=("add", "remove"))
    group.add_argument("group", type=_group_name, metavar="GROUP")
    group.add_argument("edges", nargs="+", type=_edge_id, metavar="EDGE")
    group.set_defaults(func=cmd_group)

    rt = sub.add_parser(
        "revoke-token",
        help="refuse one token (user or edge) from now on",
        description="Put a token's jti on the deny-list every gateway checks: new "
        "connections with it are refused and open ones are closed (4003) within a second. "
        "Give the whole token (its jti and exp are read from it) or just its jti (then it "
        "is kept for the longest token lifetime). To take a permission away from a user, "
        "use `dispatch revoke USER EDGE PERMISSION` instead.",
    )
    rt.add_argument("token_or_jti", metavar="TOKEN_OR_JTI")
    rt.set_defaults(func=cmd_revoke_token)
