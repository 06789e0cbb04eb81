"""WebSocket handshakes: where the bearer token is, which origins may connect, refusals.

Browsers cannot set an Authorization header on a WebSocket, so a dashboard in a browser
offers the subprotocols `dispatch.v1` and `bearer.<token>`; the gateway answers with
`dispatch.v1`. Either way the token travels in a header, never in the URL (uvicorn
logs request lines).
"""

from __future__ import annotations

import contextlib
from urllib.parse import urlsplit

from starlette.responses import JSONResponse
from starlette.websockets import WebSocket

from gateway.auth import bearer_token

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


def origin_allowed(ws: WebSocket, allowed: tuple[str, ...]) -> bool:
    """Refuse browser pages from other origins (cross-site WebSocket hijacking).

    Clients that are not browsers send no Origin. A browser page may connect when its
    origin is the gateway's own host or is listed in DISPATCH_ALLOWED_ORIGINS.
    """
    origin = ws.headers.get("origin")
    if origin is None:
        return True
    if origin in allowed or "*" in allowed:
        return True
    return urlsplit(origin).netloc.lower() == ws.headers.get("host", "").lower()


async def refuse(ws: WebSocket, status: int, code: str, message: str) -> None:
    """Refuse the handshake with an HTTP error and a JSON body naming the cause."""
    body = {"status": "rejected", "error": {"code": code, "message": message}}
    try:
        await ws.send_denial_response(JSONResponse(body, status_code=status))
    except RuntimeError:
        # The server lacks the denial extension: a plain close becomes HTTP 403.
        with contextlib.suppress(Exception):
            await ws.close(code=1008, reason=message[:120])
