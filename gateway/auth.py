"""Who is calling: user JWTs and edge credentials.

User tokens are Django REST framework SimpleJWT access tokens: HS256 with the shared
secret, or RS256/ES256 with public keys from a JWKS file or URL. Edge credentials are
HS256 tokens `dispatch token --edge` signs with the edge secret. The token's header
picks the algorithm only among those configured, and the algorithm picks the key
family (HS256 -> the secret, RS256/ES256 -> the key set), so an RSA public key can never
be used as an HMAC secret. Headers that would let a token name its own key (`jku`,
`x5u`, `jwk`, `x5c`) are refused. Verification fails closed: any exception while
checking a token is a refusal.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

from joserfc import jws, jwt
from joserfc.errors import JoseError, SecurityWarning
from joserfc.jwk import OctKey
from joserfc.jws import JWSRegistry
from joserfc.jwt import JWTClaimsRegistry
from joserfc.registry import HeaderParameter

from gateway.jwks import KEY_TYPES, JwksSource, PublicKey
from schemas.identifiers import USER_ID

EDGE_TOKEN_TYPE = "edge"
ACCESS_TOKEN_TYPE = "access"
HMAC_ALGORITHM = "HS256"
# Below the protocol layer's 8 KiB header line limit, so this check is the one that speaks.
MAX_TOKEN_BYTES = 8000
# user_id becomes part of actors, log lines and Lua-built events: a safe alphabet only.
SAFE_USER_ID = re.compile(USER_ID)  # always with fullmatch
TIME_CLAIMS = ("exp", "nbf", "iat")

# Key-selecting headers a token could use to bring its own key: refused outright.
_REFUSED_HEADERS = {
    name: HeaderParameter(f"{name} is refused: keys come from the gateway's configuration", "none")
    for name in ("jku", "x5u", "jwk", "x5c")
}


class AuthError(Exception):
    """The caller could not be authenticated; the message is safe to show them."""


class _Credential:
    """What a user's token and an edge's credential share: when they end."""

    __slots__ = ()
    expires_at: float
    valid_until: float  # expires_at + leeway (0: not set): when sessions end

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) > (self.valid_until or self.expires_at)


@dataclass(frozen=True, slots=True)
class User(_Credential):
    user_id: str
    jti: str
    expires_at: float
    control: frozenset[str] = frozenset()  # edges named in the token ("*" = all)
    view: frozenset[str] = frozenset()
    valid_until: float = field(default=0.0)  # expires_at + leeway: when sessions end

    @property
    def actor(self) -> str:
        return f"user:{self.user_id}"


@dataclass(frozen=True, slots=True)
class EdgeIdentity(_Credential):
    edge_id: str
    jti: str
    expires_at: float
    valid_until: float = 0.0

    @property
    def actor(self) -> str:
        return f"edge:{self.edge_id}"


@dataclass(frozen=True, slots=True)
class AuthConfig:
    jwt_secret: str
    edge_secret: str = ""
    jwt_algorithms: tuple[str, ...] = (HMAC_ALGORITHM,)
    jwt_issuer: str = ""
    jwt_audience: str = ""
    jwt_leeway_s: int = 10
    jwt_max_lifetime_s: int = 7 * 86_400
    edge_max_lifetime_s: int = 2 * 366 * 86_400
    jwt_key_id: str = ""  # the only `kid` an HS256 user token may carry ("" = none)


def signing_key(secret: str) -> OctKey:
    with warnings.catch_warnings():
        # Short secrets are warned about once, at start-up (config/settings.py).
        warnings.simplefilter("ignore", SecurityWarning)
        return OctKey.import_key(secret)


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def claimed(token: str | None) -> str:
    """What a refused token claims to be, UNVERIFIED: names the attempt in the audit."""
    if not token:
        return "no token"
    try:
        obj = jws.extract_compact(token.encode()[:MAX_TOKEN_BYTES])
        header = obj.headers()
        claims = json.loads(obj.payload or b"{}")
        if not isinstance(claims, dict):
            claims = {}
        parts = {
            "alg": header.get("alg"),
            "kid": header.get("kid"),
            "token_type": claims.get("token_type"),
            "user_id": claims.get("user_id"),
            "edge_id": claims.get("edge_id"),
            "jti": claims.get("jti"),
        }
        return " ".join(f"{k}={str(v)[:64]!r}" for k, v in parts.items() if v is not None)
    except Exception:
        return f"unreadable token of {len(token)} characters"


class _Repeated(Exception):
    def __init__(self, member: str) -> None:
        self.member = member


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _Repeated(key)
        seen[key] = value
    return seen


def check_unique_members(token: str) -> None:
    """Refuse a token whose header or payload repeats a JSON member (ambiguous claims)."""
    repeated = _repeated_member(token)
    if repeated is not None:
        raise AuthError(
            f"token refused: member {repeated[:40]!r} appears twice in the token's JSON; "
            "a parser that keeps the first and one that keeps the last would disagree"
        )


# A client presents the same token on every request: parse each one once (~30 µs).
@functools.lru_cache(maxsize=4096)
def _repeated_member(token: str) -> str | None:
    """The first JSON member repeated in the token's header or payload, if any."""
    for segment in token.split(".")[:2]:
        padded = segment + "=" * (-len(segment) % 4)
        try:
            json.loads(base64.urlsafe_b64decode(padded.encode("ascii")), object_pairs_hook=_unique)
        except _Repeated as exc:
            return exc.member
        except (ValueError, UnicodeEncodeError):
            return None  # not base64 or not JSON: the decoder refused it already
    return None


def _edges(value: Any, claim: str) -> frozenset[str]:
    if value is None:
        return frozenset()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AuthError(f"claim `{claim}` must be a list of edge ids")
    return frozenset(value)


def _check_times(claims: dict[str, Any], now: float, max_lifetime_s: int, leeway_s: int) -> None:
    """Refuse absurd time claims: every one must lie within one token lifetime of now."""
    low, high = now - max_lifetime_s - leeway_s, now + max_lifetime_s + leeway_s
    for name in TIME_CLAIMS:
        if name not in claims:
            continue
        value = claims[name]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise AuthError(f"token refused: claim `{name}` must be a number of seconds")
        if not math.isfinite(value) or not low <= value <= high:
            raise AuthError(
                f"token refused: claim `{name}`={value!r} is not within {max_lifetime_s} s of "
                "now (the longest lifetime this gateway accepts)"
            )


class Authenticator:
    def __init__(self, config: AuthConfig, jwks: JwksSource | None = None) -> None:
        self.config = config
        self._user_key = signing_key(config.jwt_secret)
        self._edge_key = signing_key(config.edge_secret or config.jwt_secret)
        self.jwks = jwks
        self._registries = {
            alg: JWSRegistry(header_registry=_REFUSED_HEADERS, algorithms=[alg])
            for alg in (HMAC_ALGORITHM, *KEY_TYPES)
        }

    @property
    def leeway_s(self) -> int:
        return self.config.jwt_leeway_s

    async def _key(
        self, header: dict[str, Any], allowed: tuple[str, ...], *, edge: bool
    ) -> tuple[str, Any]:
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in allowed:
            raise AuthError(
                f"token refused: algorithm {str(alg)[:20]!r} is not accepted "
                f"(accepted: {', '.join(allowed)})"
            )
        if alg == HMAC_ALGORITHM:
            kid = header.get("kid")
            expected = "" if edge else self.config.jwt_key_id
            if kid is not None and (not expected or kid != expected):
                known = f"only {expected!r}" if expected else "none (DISPATCH_JWT_KEY_ID)"
                raise AuthError(
                    f"token refused: unknown kid {str(kid)[:64]!r} for HS256; known: {known}"
                )
            return alg, None  # the caller's own secret
        if self.jwks is None:
            raise AuthError(f"token refused: no key set is configured for {alg}")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise AuthError("token refused: `kid` must be a string")
        key: PublicKey | None = await self.jwks.key(kid, alg)
        if key is None:
            raise AuthError(
                f"token refused: no {alg} key with kid {str(kid)[:64]!r} in the key set"
            )
        return alg, key

    async def _claims(
        self, token: str, token_type: str, *, edge: bool
    ) -> tuple[dict[str, Any], float]:
        """Verified claims and the time the token stops being accepted."""
        cfg = self.config
        try:
            if not isinstance(token, str) or len(token) > MAX_TOKEN_BYTES:
                raise AuthError(f"token refused: longer than {MAX_TOKEN_BYTES} bytes")
            header = jws.extract_compact(token.encode()).headers()
            allowed = (HMAC_ALGORITHM,) if edge else cfg.jwt_algorithms
            alg, key = await self._key(header, allowed, edge=edge)
            if key is None:
                key = self._edge_key if edge else self._user_key
            decoded = jwt.decode(token, key, algorithms=[alg], registry=self._registries[alg])
            # Signed, but is it unambiguous? (`alg` twice was resolved last-wins above.)
            check_unique_members(token)
            claims = dict(decoded.claims)
            options: dict[str, Any] = {
                "exp": {"essential": True},
                "token_type": {"essential": True, "value": token_type},
                "jti": {"essential": True},
            }
            if cfg.jwt_issuer and not edge:
                options["iss"] = {"essential": True, "value": cfg.jwt_issuer}
            if cfg.jwt_audience and not edge:
                options["aud"] = {"essential": True, "value": cfg.jwt_audience}
            now = time.time()
            _check_times(
                claims,
                now,
                cfg.edge_max_lifetime_s if edge else cfg.jwt_max_lifetime_s,
                cfg.jwt_leeway_s,
            )
            JWTClaimsRegistry(now=int(now), leeway=cfg.jwt_leeway_s, **options).validate(claims)
            if not isinstance(claims["jti"], str) or not 0 < len(claims["jti"]) <= 255:
                raise AuthError("token refused: claim `jti` must be a string of 1-255 characters")
            return claims, float(claims["exp"]) + cfg.jwt_leeway_s
        except AuthError:
            raise
        except JoseError as exc:
            raise AuthError(f"token refused: {exc.error}: {exc.description or exc}") from None
        except Exception as exc:  # malformed tokens raise arbitrary errors: fail closed
            raise AuthError(f"token refused: unreadable ({type(exc).__name__})") from None

    async def user(self, token: str) -> User:
        claims, valid_until = await self._claims(token, ACCESS_TOKEN_TYPE, edge=False)
        user_id = claims.get("user_id")
        if not isinstance(user_id, str | int) or isinstance(user_id, bool):
            raise AuthError("token refused: claim `user_id` is missing")
        if not SAFE_USER_ID.fullmatch(str(user_id)):
            raise AuthError(
                "token refused: claim `user_id` must be 1-128 letters, digits or '_.@+:-'"
            )
        return User(
            user_id=str(user_id),
            jti=claims["jti"],
            expires_at=float(claims["exp"]),
            control=_edges(claims.get("can_control"), "can_control"),
            view=_edges(claims.get("can_view"), "can_view"),
            valid_until=valid_until,
        )

    async def edge(self, token: str, edge_id: str) -> EdgeIdentity:
        claims, valid_until = await self._claims(token, EDGE_TOKEN_TYPE, edge=True)
        if claims.get("edge_id") != edge_id:
            raise AuthError(f"token refused: this credential is not for edge {edge_id!r}")
        return EdgeIdentity(
            edge_id=edge_id,
            jti=claims["jti"],
            expires_at=float(claims["exp"]),
            valid_until=valid_until,
        )
