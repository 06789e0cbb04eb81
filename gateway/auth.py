"""Who is calling: user JWTs (Django SimpleJWT compatible) and edge credentials.

Verification fails closed: any exception while checking a token is a refusal.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any

from joserfc import jwt
from joserfc.errors import JoseError, SecurityWarning
from joserfc.jwk import OctKey
from joserfc.jwt import JWTClaimsRegistry

ALGORITHMS = ["HS256"]
LEEWAY_S = 30
EDGE_TOKEN_TYPE = "edge"
ACCESS_TOKEN_TYPE = "access"


class AuthError(Exception):
    """The caller could not be authenticated; the message is safe to show them."""


@dataclass(frozen=True, slots=True)
class User:
    user_id: str
    jti: str
    expires_at: float
    control: frozenset[str] = frozenset()  # edges named in the token ("*" = all)
    view: frozenset[str] = frozenset()

    @property
    def actor(self) -> str:
        return f"user:{self.user_id}"


@dataclass(frozen=True, slots=True)
class EdgeIdentity:
    edge_id: str
    jti: str
    expires_at: float

    @property
    def actor(self) -> str:
        return f"edge:{self.edge_id}"


def signing_key(secret: str) -> OctKey:
    with warnings.catch_warnings():
        # Short secrets are warned about once, at start-up (dispatch.settings).
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


def _edges(value: Any, claim: str) -> frozenset[str]:
    if value is None:
        return frozenset()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AuthError(f"claim `{claim}` must be a list of edge ids")
    return frozenset(value)


class Authenticator:
    def __init__(self, secret: str, *, issuer: str = "", audience: str = "") -> None:
        self._key = signing_key(secret)
        self._issuer = issuer
        self._audience = audience

    def _claims(self, token: str, token_type: str) -> dict[str, Any]:
        try:
            decoded = jwt.decode(token, self._key, algorithms=ALGORITHMS)
            options: dict[str, Any] = {
                "exp": {"essential": True},
                "token_type": {"essential": True, "value": token_type},
                "jti": {"essential": True},
            }
            if self._issuer:
                options["iss"] = {"essential": True, "value": self._issuer}
            if self._audience:
                options["aud"] = {"essential": True, "value": self._audience}
            JWTClaimsRegistry(leeway=LEEWAY_S, **options).validate(decoded.claims)
            return dict(decoded.claims)
        except JoseError as exc:
            raise AuthError(f"token refused: {exc.error}: {exc.description or exc}") from None
        except Exception as exc:  # malformed tokens raise arbitrary errors: fail closed
            raise AuthError(f"token refused: unreadable ({type(exc).__name__})") from None

    def user(self, token: str) -> User:
        claims = self._claims(token, ACCESS_TOKEN_TYPE)
        user_id = claims.get("user_id")
        if not isinstance(user_id, str | int) or isinstance(user_id, bool) or str(user_id) == "":
            raise AuthError("token refused: claim `user_id` is missing")
        return User(
            user_id=str(user_id),
            jti=str(claims["jti"]),
            expires_at=float(claims["exp"]),
            control=_edges(claims.get("can_control"), "can_control"),
            view=_edges(claims.get("can_view"), "can_view"),
        )

    def edge(self, token: str, edge_id: str) -> EdgeIdentity:
        claims = self._claims(token, EDGE_TOKEN_TYPE)
        if claims.get("edge_id") != edge_id:
            raise AuthError(f"token refused: this credential is not for edge {edge_id!r}")
        return EdgeIdentity(
            edge_id=edge_id, jti=str(claims["jti"]), expires_at=float(claims["exp"])
        )


def expired(expires_at: float, now: float | None = None) -> bool:
    return (now or time.time()) > expires_at + LEEWAY_S
