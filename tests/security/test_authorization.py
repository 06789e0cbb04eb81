"""Authorization per command and per event: grants, site groups, revocations, expiry.

Changes made in Redis (a revoked grant, a revoked token, a group change) must reach
open connections within a second; timings are taken from the moment just before the
change was written to the moment the gateway acted (its own audit timestamps or the
close frame).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection

from gateway import grants
from gateway.revocations import revoke_token

from .conftest import (
    EDGE,
    NO_LIMITS,
    EdgeWatcher,
    Site,
    enroll,
    recv_for,
    recv_json,
    start_gateway,
    ws_connect,
)
from support import REDIS_URL, Processes, command, edge_token, http, user_token, wait_until

OTHER = "authz_other_edge"
BARRIER = "authz_barrier_edge"
LATE_MEMBER = "authz_late_member"


@pytest.fixture(scope="module", autouse=True)
def edges(site: Site) -> None:
    site.redis.sadd(site.keys.edges(), OTHER, BARRIER, LATE_MEMBER)


def change(site: Site, action: Callable[[Redis], Awaitable[None]]) -> float:
    """Apply a change to the store in-process; returns the wall time just before it."""

    async def run() -> None:
        client = Redis.from_url(REDIS_URL)
        try:
            await action(client)
        finally:
            await client.aclose()

    started = time.time()
    asyncio.run(run())
    return started


def send(dash: ClientConnection, edge_id: str) -> dict[str, Any]:
    """Send a command; the first answer about it (`issued` or a rejection)."""
    body = command(edge_id=edge_id)
    dash.send(json.dumps(body))
    return recv_for(dash, body["command_id"])


def test_revoked_grant_refuses_the_next_command_within_1_s(site: Site) -> None:
    user = "grantee"
    change(site, lambda r: grants.grant(r, site.keys, user, EDGE, grants.CAN_CONTROL))
    with site.dashboard(user_token(user)) as dash:
        wait_until(lambda: send(dash, EDGE)["status"] == "issued", 5, what="the grant")
        revoked_at = change(
            site, lambda r: grants.revoke(r, site.keys, user, EDGE, grants.CAN_CONTROL)
        )
        deadline = time.monotonic() + 3
        while (reply := send(dash, EDGE))["status"] == "issued":
            assert time.monotonic() < deadline, "the revoked grant still admits commands"
            time.sleep(0.02)
        assert reply["error"]["code"] == "forbidden"
        record = site.audit_for(code="forbidden", command_id=reply["command_id"])
        assert record["at"] / 1000 - revoked_at < 1.0
        assert record["actor"] == f"user:{user}"
        site.assert_edge_got_nothing(site.dashboard())
    # The HTTP API asks again on every request too.
    status, _, reply = http(
        "POST", f"{site.gw.http}/api/commands", user_token(user), command(edge_id=EDGE)
    )
    assert status == 403 and reply["error"]["code"] == "forbidden"


def _closed_within(ws: ClientConnection, seconds: float) -> tuple[int, float]:
    """(close code, wall time) of the server's close frame, waiting at most `seconds`."""
    deadline = time.monotonic() + seconds
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            ws.recv(timeout=max(0.01, deadline - time.monotonic()))
    at = time.time()
    assert closed.value.rcvd is not None, "no close frame from the gateway"
    return closed.value.rcvd.code, at


def test_revoked_token_closes_open_connections_within_1_s(site: Site) -> None:
    token = user_token("revokee", control=[EDGE])
    dash = site.dashboard(token)
    assert send(dash, EDGE)["status"] == "issued"
    edge_cred = edge_token(OTHER)
    edge = EdgeWatcher(f"{site.gw.ws}/ws/edge/{OTHER}", edge_cred)
    jti = json.loads(_payload(token))["jti"]
    edge_jti = json.loads(_payload(edge_cred))["jti"]
    revoked_at = change(site, lambda r: revoke_token(r, site.keys, jti, time.time() + 3600))
    code, at = _closed_within(dash, 2)
    assert code == 4003 and at - revoked_at < 1.0
    site.audit_for(code="unauthenticated", actor="user:revokee", error="token revoked")
    with pytest.raises(InvalidStatus) as refused:
        site.dashboard(token)
    assert b"revoked" in (refused.value.response.body or b"")
    # The same for an edge credential, revoked by its bare jti through the CLI.
    proc = site.processes.dispatch("revoke", "revoke-token", edge_jti)
    assert proc.popen.wait(20) == 0, proc.log()
    assert edge.ended.wait(2) and edge.close_code == 4003
    site.audit_for(code="unauthenticated", actor=f"edge:{OTHER}", error="credential revoked")


def _payload(token: str) -> bytes:
    import base64  # noqa: PLC0415

    return base64.urlsafe_b64decode(token.split(".")[1] + "==")


def test_revoke_token_cli_accepts_a_whole_token(site: Site) -> None:
    token = user_token("cli_revokee", control=[EDGE])
    proc = site.processes.dispatch("revoke", "revoke-token", token)
    assert proc.popen.wait(20) == 0, proc.log()
    assert "revoked token jti=" in proc.log()
    status, _, reply = http("POST", f"{site.gw.http}/api/commands", token, command(edge_id=EDGE))
    assert status == 401 and "revoked" in reply["error"]["message"]


def test_expired_token_closes_the_dashboard(processes: Processes) -> None:
    enroll(processes, EDGE)
    gw = start_gateway(processes, {**NO_LIMITS, "DISPATCH_JWT_LEEWAY_S": "0"})
    token = user_token("short_lived", control=[EDGE], ttl_s=2)
    exp = json.loads(_payload(token))["exp"]
    dash = ws_connect(f"{gw.ws}/ws/dashboard", token)
    code, at = _closed_within(dash, 5)
    assert code == 4003
    assert exp - 0.1 <= at <= exp + 1.0


def test_dashboard_sees_only_edges_it_may_view_and_loses_them_within_1_s(site: Site) -> None:
    viewer = "viewer"
    change(site, lambda r: grants.change_group(r, site.keys, "fleet_a", [EDGE], add=True))
    change(site, lambda r: grants.grant(r, site.keys, viewer, "group:fleet_a", grants.CAN_VIEW))
    change(site, lambda r: grants.grant(r, site.keys, viewer, BARRIER, grants.CAN_VIEW))
    operator = Operator(site, user_token("op", control=[EDGE, OTHER, BARRIER]))
    with site.dashboard(user_token(viewer)) as watch:
        seen = _events_between(operator, watch, [EDGE, OTHER])
        assert seen == {EDGE}  # OTHER is never shown
        # A viewer cannot command what it may only watch.
        assert send(watch, EDGE)["error"]["code"] == "forbidden"
        removed_at = change(
            site, lambda r: grants.change_group(r, site.keys, "fleet_a", [EDGE], add=False)
        )
        wait_until(
            lambda: _events_between(operator, watch, [EDGE]) == set(), 3, what="the view to end"
        )
        assert time.time() - removed_at < 1.5
        assert _events_between(operator, watch, [EDGE, OTHER]) == set()


class Operator:
    """Sends commands through the HTTP API (it has no socket that would need reading)."""

    def __init__(self, site: Site, token: str) -> None:
        self.url, self.token = f"{site.gw.http}/api/commands", token

    def send(self, body: dict[str, Any]) -> None:
        status, _, reply = http("POST", self.url, self.token, body)
        assert status == 202, reply


def _events_between(operator: Operator, watch: ClientConnection, edges: list[str]) -> set[str]:
    """Edges whose events reached `watch` for commands sent to `edges` and a barrier."""
    ids = {}
    for edge_id in [*edges, BARRIER]:
        body = command(edge_id=edge_id)
        operator.send(body)
        ids[body["command_id"]] = edge_id
    seen: set[str] = set()
    while True:  # the barrier's events come after those of the commands sent before it
        msg = recv_json(watch)
        if msg.get("command_id") in ids:
            seen.add(ids[msg["command_id"]])
            if ids[msg["command_id"]] == BARRIER and msg["status"] == "queued":
                return seen - {BARRIER}


def test_fleet_grant_covers_edges_added_to_the_group_later(site: Site) -> None:
    user = "fleet_operator"
    proc = site.processes.dispatch("grant", "grant", user, "group:fleet_b", "can_control")
    assert proc.popen.wait(20) == 0, proc.log()
    proc = site.processes.dispatch("group", "group", "add", "fleet_b", OTHER)
    assert proc.popen.wait(20) == 0, proc.log()
    with site.dashboard(user_token(user)) as dash:
        wait_until(lambda: send(dash, OTHER)["status"] == "issued", 3, what="the fleet grant")
        assert send(dash, LATE_MEMBER)["error"]["code"] == "forbidden"
        added_at = change(
            site, lambda r: grants.change_group(r, site.keys, "fleet_b", [LATE_MEMBER], add=True)
        )
        wait_until(lambda: send(dash, LATE_MEMBER)["status"] == "issued", 3, what="the new member")
        assert time.time() - added_at < 1.5
    # The admission names the grant it used.
    rows = site.redis.xrange(site.keys.log(site.keys.partition(LATE_MEMBER)))
    authorized = [e for _, f in rows if (e := json.loads(f[b"e"]))["status"] == "authorized"]
    assert any(e["grant"] == "grant:can_control:group:fleet_b" for e in authorized)


def test_reading_a_command_needs_can_view(site: Site) -> None:
    body = command(edge_id=EDGE)
    status, _, _ = http("POST", f"{site.gw.http}/api/commands", site.token(), body)
    assert status == 202
    url = f"{site.gw.http}/api/commands/{body['command_id']}"
    assert http("GET", url, user_token("stranger", control=[OTHER]))[0] == 403
    assert http("GET", url, user_token("watcher", view=[EDGE]))[0] == 200
    assert http("GET", url, None)[0] == 401
