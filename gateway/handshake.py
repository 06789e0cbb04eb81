"""WebSocket handshakes: where the bearer token is, which origins may connect, refusals.

Browsers cannot set an Authorization header on a WebSocket, so a dashboard in a browser
offers the subprotocols `dispatch.v1` and `bearer.<token>`; the gateway answers with
`dispatch.v1`. Either way the token travels in a header, never in the URL (uvicorn
logs request lines).
"""

from __future__ import annotations

import contextlib
from typing import Any
from urllib.parse import urlsplit

import msgspec
from starlette.responses import JSONResponse
from starlette.websockets import WebSocket

from gateway.auth import bearer_token
from schemas.errors import ErrorObject

SUBPROTOCOL = "dispatch.v1"
BEARER_PREFIX = "bearer."


def credentials(ws: WebSocket) -> tuple[str | None, str | None]:
    """(token, subprotocol to accept) from the Authorization header or subprotocols."""
    token = bearer_token(ws.headers.get("authorization"))
    offered = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",")]
    if token is None:
        token = next(
            (p[len(BEARER_PREFIX) :] for p in offered if p.startswith(BEARER_PREFIX)), None
        )
    return token, (SUBPROTOCOL if SUBPROTOCOL in offered else None)


_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_key(origin: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an origin, the triple browsers compare; None if unusable."""
    try:
        parts = urlsplit(origin.strip())
        scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
        port = parts.port or _DEFAULT_PORTS.get(scheme)
    except ValueError:  # a port that is not a number, a bad IPv6 literal
        return None
    if scheme not in _DEFAULT_PORTS or not host or port is None:
        return None
    return scheme, host, port


def own_origin(ws: WebSocket) -> tuple[str, str, int] | None:
    """The gateway's own origin as this request reached it (scheme from TLS or the proxy)."""
    scheme = "https" if ws.url.scheme in ("wss", "https") else "http"
    return origin_key(f"{scheme}://{ws.headers.get('host', '')}")


def origin_allowed(ws: WebSocket, allowed: tuple[str, ...]) -> bool:
    """Refuse browser pages from other origins (cross-site WebSocket hijacking).

    Clients that are not browsers send no Origin. A browser page may connect when its
    origin (scheme, host and port) is the gateway's own or is listed in
    DISPATCH_ALLOWED_ORIGINS: `https://127.0.0.1:8000` is not the origin of a gateway
    served over plain http on that port.
    """
    origin = ws.headers.get("origin")
    if origin is None:
        return True
    if "*" in allowed:
        return True
    key = origin_key(origin)
    if key is None:
        return False  # `null`, opaque or malformed origins
    if any(origin_key(entry) == key for entry in allowed):
        return True
    return key == own_origin(ws)


def denial_body(err: ErrorObject) -> dict[str, Any]:
    """The JSON body of a refused handshake or request: `{status, error}`."""
    return {"status": "rejected", "error": msgspec.to_builtins(err)}


async def refuse_with(
    ws: WebSocket, status: int, err: ErrorObject, headers: dict[str, str] | None = None
) -> None:
    """Refuse the handshake with an HTTP error and a JSON body naming the cause."""
    try:
        await ws.send_denial_response(JSONResponse(denial_body(err), status, headers))
    except RuntimeError:
        # The server lacks the denial extension: a plain close becomes HTTP 403.
        with contextlib.suppress(Exception):
            await ws.close(code=1008, reason=err.message[:120])


async def refuse(ws: WebSocket, status: int, code: str, message: str) -> None:
    """Refuse the handshake with an HTTP error and a JSON body naming the cause."""
    await refuse_with(ws, status, ErrorObject(code=code, message=message))
