"""What the operator console reads besides the command API: who is signed in, the edges
the user may view (presence, last seen, queue depth) and their capability config.

Read-only: presence and queue depth come from the ledger's keys, the capability config
from the store the edges sync from (or the config shipped for a known site).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from gateway.api import STATIC, problem, user_route
from gateway.auth import User
from gateway.grants import CAN_CONTROL, CAN_VIEW
from gateway.state import GatewayState
from schemas.errors import ErrorCode
from schemas.identifiers import is_edge_id

EDGE_GROUP = "edge"  # the consumer group of every edge stream (ledger/lua/common.lua)


def _state(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.gateway
    return state


def _iso(seconds: float) -> str:
    stamp = datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


@user_route
async def me(request: Request, user: User) -> Response:
    return JSONResponse(
        {"user_id": user.user_id, "actor": user.actor, "expires_at": _iso(user.expires_at)}
    )


@user_route
async def list_edges(request: Request, user: User) -> Response:
    """The enrolled edges the user may view, with presence and queue depth."""
    state = _state(request)
    keys = state.ledger.keys
    enrolled = sorted(_text(e) for e in await state.redis.smembers(keys.edges()))
    visible = await state.grants.visible_edges(user)
    shown = [e for e in enrolled if visible is None or e in visible]
    # One round trip for all of them: the console polls this every few seconds.
    pipe = state.redis.pipeline(transaction=False)
    for edge_id in shown:
        pipe.pttl(keys.presence(edge_id))
        pipe.xinfo_groups(keys.edge_stream(edge_id))
    replies = await pipe.execute(raise_on_error=False) if shown else []
    edges = [
        {
            "edge_id": edge_id,
            **_presence(state, replies[2 * i]),
            "queue_depth": _queue_depth(replies[2 * i + 1]),
            "can_control": await state.grants.allows(user, edge_id, CAN_CONTROL) is not None,
        }
        for i, edge_id in enumerate(shown)
    ]
    return JSONResponse({"edges": edges})


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _presence(state: GatewayState, ttl_ms: Any) -> dict[str, Any]:
    online = isinstance(ttl_ms, int) and ttl_ms > 0
    # The gateway holding the edge refreshes its presence every third of the TTL: the
    # TTL left says when it last did, i.e. when the edge was last seen alive.
    last_seen: str | None = None
    if online:
        age_s = max(0.0, (state.settings.presence_ttl_ms - ttl_ms) / 1000)
        last_seen = _iso(time.time() - age_s)
    return {"online": online, "last_seen": last_seen}


def _queue_depth(groups: Any) -> int | None:
    """Entries of the edge's stream not yet handed to it (None when Redis cannot tell)."""
    if isinstance(groups, Exception):  # no stream yet: nothing was ever sent to this edge
        return 0
    for group in groups:
        if _text(group.get("name")) == EDGE_GROUP:
            lag = group.get("lag")
            return None if lag is None else int(lag)
    return 0


@user_route
async def capabilities(request: Request, user: User) -> Response:
    """The edge's capability config (devices, channels, limits, controllers) for viewers."""
    from edge.capabilities import shipped_config  # noqa: PLC0415 (api.py does the same)

    state = _state(request)
    edge_id = request.path_params["edge_id"]
    if not is_edge_id(edge_id):
        return problem(400, ErrorCode.INVALID_COMMAND, "the edge id has characters it may not")
    if await state.grants.allows(user, edge_id, CAN_VIEW) is None:
        return problem(403, ErrorCode.FORBIDDEN, f"no can_view on edge {edge_id!r}")
    stored = await state.redis.get(state.ledger.keys.edge_config(edge_id))
    raw = stored if stored is not None else shipped_config(edge_id)
    if raw is None:
        return problem(404, "not_found", f"no capability config for edge {edge_id!r}")
    return Response(raw, media_type="application/json")


def routes() -> list[BaseRoute]:
    return [
        Route("/api/me", me, methods=["GET"]),
        Route("/api/edges", list_edges, methods=["GET"]),
        Route("/api/edges/{edge_id}/capabilities", capabilities, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
