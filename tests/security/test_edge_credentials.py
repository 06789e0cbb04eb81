"""Edge credentials: an edge connects only as itself, and a second session replaces the first.

Every refused handshake is in the audit stream, and the legitimate edge (connected
throughout) receives nothing but the sentinel commands of the barrier.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest
from websockets.exceptions import InvalidStatus

from dispatch.tokens import edge_claims, sign

from .conftest import EDGE, NO_LIMITS, EdgeWatcher, Site, recv_json, start_gateway, ws_connect
from support import SECRET, Processes, command, edge_token, user_token, wait_until

EDGE_B = "sec_edge_b"


def refused_status(site: Site, path: str, token: str | None, **headers: str) -> int:
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(f"{site.gw.ws}{path}", token, additional_headers=headers)
    return refused.value.response.status_code


@pytest.mark.parametrize(
    ("path", "make_token", "status", "code"),
    [
        (f"/ws/edge/{EDGE}", lambda: edge_token(EDGE_B), 401, "unauthenticated"),
        (f"/ws/edge/{EDGE}", lambda: user_token("op", control=[EDGE]), 401, "unauthenticated"),
        (f"/ws/edge/{EDGE}", lambda: None, 401, "unauthenticated"),
        (f"/ws/edge/{EDGE}", lambda: edge_token(EDGE, ttl_s=-120), 401, "unauthenticated"),
        (
            f"/ws/edge/{EDGE}",
            lambda: sign(edge_claims(EDGE, 600), "x" * 48),
            401,
            "unauthenticated",
        ),
        (
            f"/ws/edge/{EDGE}",
            lambda: sign({**edge_claims(EDGE, 600), "edge_id": [EDGE]}, SECRET),
            401,
            "unauthenticated",
        ),
        ("/ws/edge/sec%20edge", lambda: edge_token("sec edge"), 400, "invalid_command"),
        ("/ws/edge/..", lambda: edge_token(EDGE), 400, "invalid_command"),
        ("/ws/edge/%7Bp0%7Dx", lambda: edge_token(EDGE), 400, "invalid_command"),
        (f"/ws/edge/{'e' * 65}", lambda: edge_token(EDGE), 400, "invalid_command"),
    ],
    ids=[
        "another_edges_credential",
        "user_token_as_edge",
        "no_credential",
        "expired_credential",
        "wrong_signing_key",
        "edge_id_claim_not_a_string",
        "edge_id_with_space",
        "edge_id_traversal",
        "edge_id_hash_tag",
        "edge_id_too_long",
    ],
)
def test_edge_cannot_connect_as_anyone_else(
    site: Site, path: str, make_token: object, status: int, code: str
) -> None:
    token = make_token()  # type: ignore[operator]
    assert refused_status(site, path, token) == status
    site.audit_for(code=code, input_excerpt="/ws/edge/")
    site.assert_edge_got_nothing()


def test_browser_page_cannot_connect_as_an_edge(site: Site) -> None:
    assert refused_status(site, f"/ws/edge/{EDGE}", edge_token(EDGE), Origin=site.gw.http) == 403
    site.audit_for(code="forbidden", edge_id=EDGE)
    site.assert_edge_got_nothing()


def test_garbage_acknowledgments_change_nothing(site: Site) -> None:
    """An edge's own malformed or foreign acks are answered and ignored."""
    body = command(edge_id=EDGE)
    with site.dashboard() as dash:
        dash.send(json.dumps(body))
        wait_until(lambda: body["command_id"] in site.edge.ids(), 10, what="delivery")
        impostor = ws_connect(f"{site.gw.ws}/ws/edge/{EDGE_B}", edge_token(EDGE_B))
        # Edge B acknowledges edge A's command: unknown to B, nothing changes.
        impostor.send(json.dumps({"command_id": body["command_id"], "status": "executed"}))
        notice = recv_json(impostor)
        assert notice["type"] == "ack_refused" and notice["error"]["code"] == "unknown_command"
        for garbage in ("{", b"\xff\xfe", json.dumps({"command_id": "x y", "status": "executed"})):
            impostor.send(garbage)
            assert recv_json(impostor)["error"]["code"] == "invalid_ack"
        impostor.close()
    status = site.redis.hget(site.keys.command(EDGE, body["command_id"]), "status")
    assert status == b"routed"  # still waiting for its own edge's acknowledgment


def test_second_session_replaces_the_first_with_4001(site: Site) -> None:
    site.redis.sadd(site.keys.edges(), EDGE_B)
    first = EdgeWatcher(f"{site.gw.ws}/ws/edge/{EDGE_B}", edge_token(EDGE_B))
    with site.dashboard(site.token(control=[EDGE_B])) as dash:
        one = command(f"one_{uuid.uuid4().hex[:8]}", edge_id=EDGE_B)
        dash.send(json.dumps(one))
        wait_until(lambda: one["command_id"] in first.ids(), 10, what="delivery to the first")
        second = EdgeWatcher(f"{site.gw.ws}/ws/edge/{EDGE_B}", edge_token(EDGE_B))
        assert first.ended.wait(5), "the first session was not closed"
        assert first.close_code == 4001
        # Delivery is not split: everything after the replacement goes to the second.
        later = [command(edge_id=EDGE_B, channel=f"c{i}") for i in range(3)]
        for body in later:
            dash.send(json.dumps(body))
        wait_until(lambda: len(second.ids()) >= 4, 10, what="deliveries to the second")
        time.sleep(0.2)
        assert [c["command_id"] for c in later] == [
            i for i in second.ids() if i != one["command_id"]
        ]
        assert not set(first.ids()) & {c["command_id"] for c in later}
        second.close()


def test_replacement_across_gateways(site: Site, processes: Processes) -> None:
    """The old session on another gateway is closed too (through the wake stream)."""
    other_gw = start_gateway(processes, {**NO_LIMITS, "DISPATCH_NAMESPACE": site.namespace})
    edge_c = "sec_edge_c"
    site.redis.sadd(site.keys.edges(), edge_c)
    first = EdgeWatcher(f"{site.gw.ws}/ws/edge/{edge_c}", edge_token(edge_c))
    time.sleep(0.2)
    second = EdgeWatcher(f"{other_gw.ws}/ws/edge/{edge_c}", edge_token(edge_c))
    assert first.ended.wait(5) and first.close_code == 4001
    with site.dashboard(site.token(control=[edge_c])) as dash:
        body = command(edge_id=edge_c)
        dash.send(json.dumps(body))
        wait_until(lambda: body["command_id"] in second.ids(), 10, what="delivery via gateway two")
    assert body["command_id"] not in first.ids()
    second.close()
