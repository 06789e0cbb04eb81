"""Hostile input on `/ws/dashboard` and `POST /api/commands` against a real gateway.

Every bad input gets the contract's `rejected` answer naming the cause (or a refused
handshake / a protocol close), is in the audit stream with the cause and the sender,
and appends nothing that could reach the edge: the connected edge receives nothing,
its delivery stream and its partition log hold nothing new (see `Site` barrier).
"""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.http11 import Response
from websockets.uri import parse_uri

from ledger.keys import Keys

from .conftest import (
    EDGE,
    NO_LIMITS,
    PARTITIONS,
    Site,
    enroll,
    recv_for,
    recv_json,
    recv_refusal,
    start_gateway,
    ws_connect,
)
from support import REDIS_URL, Processes, command, edge_token, http, user_token, wait_until

OTHER_EDGE = "sec_edge_other"  # enrolled, but the operator may not control it
NEVER_ENROLLED = "sec_edge_ghost"


def cmd(**changes: Any) -> dict[str, Any]:
    body = command(f"bad_{uuid.uuid4().hex[:10]}", edge_id=EDGE)
    body.update(changes)
    return body


def with_target(**target: Any) -> str:
    body = cmd()
    body["target"] = {**body["target"], **target}
    return json.dumps(body)


def without(field: str) -> str:
    body = cmd()
    del body[field]
    return json.dumps(body)


def raw_value(literal: str) -> str:
    """A command whose `value` is spliced in as raw JSON text (NaN, Infinity, ...)."""
    return json.dumps(cmd(value=0)).replace('"value": 0', f'"value": {literal}')


def ago(**delta: float) -> str:
    return (datetime.now(UTC) - timedelta(**delta)).isoformat().replace("+00:00", "Z")


def ahead(**delta: float) -> str:
    return (datetime.now(UTC) + timedelta(**delta)).isoformat().replace("+00:00", "Z")


# (name, frame factory, expected error.code). Each frame is built when its test runs.
BAD_FRAMES: list[tuple[str, Callable[[], str | bytes], str]] = [
    ("not_json", lambda: "{not json", "malformed_json"),
    ("empty_frame", lambda: "", "malformed_json"),
    ("truncated_json", lambda: json.dumps(cmd())[:-7], "malformed_json"),
    ("json_null", lambda: "null", "invalid_command"),
    ("json_array", lambda: "[]", "invalid_command"),
    ("json_string", lambda: '"setpoint"', "invalid_command"),
    ("nan_value", lambda: raw_value("NaN"), "malformed_json"),
    ("infinity_value", lambda: raw_value("Infinity"), "malformed_json"),
    ("overflowing_float", lambda: raw_value("1e999"), "invalid_command"),
    ("absurd_setpoint", lambda: json.dumps(cmd(value=10**13)), "invalid_command"),
    ("string_setpoint", lambda: json.dumps(cmd(value="fifty")), "invalid_command"),
    ("numeric_string_setpoint", lambda: json.dumps(cmd(value="50000")), "invalid_command"),
    ("bool_setpoint", lambda: json.dumps(cmd(value=True)), "invalid_command"),
    ("array_value", lambda: json.dumps(cmd(value=[1, 2])), "invalid_command"),
    ("object_value", lambda: json.dumps(cmd(value={"$gt": 1})), "invalid_command"),
    ("deeply_nested_value", lambda: raw_value("[" * 20_000 + "]" * 20_000), "invalid_command"),
    ("deeply_nested_document", lambda: "[" * 30_000 + "]" * 30_000, "invalid_command"),
    ("unknown_command_type", lambda: json.dumps(cmd(command_type="reboot_now")), "invalid_command"),
    ("numeric_command_type", lambda: json.dumps(cmd(command_type=1)), "invalid_command"),
    ("missing_command_id", lambda: without("command_id"), "invalid_command"),
    ("missing_target", lambda: without("target"), "invalid_command"),
    ("unknown_field", lambda: json.dumps(cmd(admin=True)), "invalid_command"),
    ("edge_id_space", lambda: with_target(edge_id="sec edge 1"), "invalid_command"),
    ("edge_id_hash_tag", lambda: with_target(edge_id="{p0}sec_edge_1"), "invalid_command"),
    ("edge_id_traversal", lambda: with_target(edge_id="../sec_edge_1"), "invalid_command"),
    ("edge_id_nul", lambda: with_target(edge_id="sec_edge_1\u0000"), "invalid_command"),
    ("edge_id_glob", lambda: with_target(edge_id="sec_edge_*"), "invalid_command"),
    ("edge_id_crlf", lambda: with_target(edge_id="sec_edge_1\r\nXADD x"), "invalid_command"),
    ("edge_id_homoglyph", lambda: with_target(edge_id="sec_\u0435dge_1"), "invalid_command"),
    ("edge_id_too_long", lambda: with_target(edge_id="e" * 65), "invalid_command"),
    ("edge_id_number", lambda: with_target(edge_id=7), "invalid_command"),
    ("device_id_quote", lambda: with_target(device_id='bms"main'), "invalid_command"),
    (
        "command_id_json_breakout",
        lambda: json.dumps(cmd(command_id='x","status":"executed')),
        "invalid_command",
    ),
    ("command_id_too_long", lambda: json.dumps(cmd(command_id="c" * 129)), "invalid_command"),
    ("timestamp_words", lambda: json.dumps(cmd(timestamp="yesterday")), "invalid_command"),
    (
        "timestamp_without_zone",
        lambda: json.dumps(cmd(timestamp="2026-02-15T14:30:00")),
        "invalid_command",
    ),
    ("timestamp_far_future", lambda: json.dumps(cmd(timestamp=ahead(hours=2))), "clock_skew"),
    ("already_expired", lambda: json.dumps(cmd(timestamp=ago(hours=1), expiry_sec=60)), "expired"),
    ("expiry_zero", lambda: json.dumps(cmd(expiry_sec=0)), "invalid_command"),
    ("expiry_absurd", lambda: json.dumps(cmd(expiry_sec=10**9)), "invalid_command"),
    ("priority_unknown", lambda: json.dumps(cmd(priority="urgent")), "invalid_command"),
    ("duration_on_setpoint", lambda: json.dumps(cmd(duration_sec=60)), "invalid_command"),
    (
        "override_without_duration",
        lambda: json.dumps(cmd(command_type="config_override")),
        "invalid_command",
    ),
    (
        "system_shell",
        lambda: json.dumps(cmd(command_type="system", value="rm -rf /")),
        "invalid_command",
    ),
    ("unit_too_long", lambda: json.dumps(cmd(unit="W" * 17)), "invalid_command"),
    ("empty_source", lambda: json.dumps(cmd(source="")), "invalid_command"),
    ("utf8_bom", lambda: "\ufeff" + json.dumps(cmd()), "malformed_json"),
    ("unknown_edge", lambda: with_target(edge_id=NEVER_ENROLLED), "unknown_edge"),
    ("no_permission_on_edge", lambda: with_target(edge_id=OTHER_EDGE), "forbidden"),
    ("binary_frame", lambda: json.dumps(cmd()).encode(), "malformed_json"),
    ("binary_invalid_utf8", lambda: b'{"command_id": "\xff\xfe"}', "malformed_json"),
    ("binary_utf16", lambda: json.dumps(cmd()).encode("utf-16"), "malformed_json"),
    ("over_64_kib", lambda: json.dumps(cmd(source="s" * 100, pad="x" * (70 * 1024))), "too_large"),
]


@pytest.fixture(scope="module", autouse=True)
def other_edge(site: Site) -> None:
    enroll(site.processes, OTHER_EDGE)


def test_there_are_at_least_thirty_distinct_bad_inputs() -> None:
    names = [name for name, _, _ in BAD_FRAMES]
    assert len(set(names)) == len(names) >= 30


@pytest.mark.parametrize(
    ("frame", "code"), [(f, c) for _, f, c in BAD_FRAMES], ids=[n for n, _, _ in BAD_FRAMES]
)
def test_bad_frame_is_rejected_recorded_and_reaches_no_edge(
    site: Site, frame: Callable[[], str | bytes], code: str
) -> None:
    raw = frame()
    with site.dashboard() as dash:
        dash.send(raw)
        reply = recv_refusal(dash)
        assert reply["error"]["code"] == code, reply
        assert reply["error"]["message"]
        record = site.audit_for(code=code, raw=raw if isinstance(raw, bytes) else raw.encode())
        assert record["actor"] == f"user:{site.user}" and record["stage"] == "gateway"
        assert record["status"] == "rejected" and record["at"] > 0
        # The connection stays usable: the barrier's sentinel goes through it.
        site.assert_edge_got_nothing(dash)


def test_reused_command_id_with_another_body_is_a_duplicate(site: Site) -> None:
    with site.dashboard() as dash:
        body = cmd()
        dash.send(json.dumps(body))
        wait_until(lambda: body["command_id"] in site.edge.ids(), 10, what="the first command")
        frames, stream = len(site.edge.frames), site.edge_stream_len()
        changed = json.dumps({**body, "value": -50000})
        dash.send(changed)
        reply = recv_for(dash, body["command_id"])
        while reply["status"] != "rejected":  # lifecycle events of the first one come too
            reply = recv_for(dash, body["command_id"])
        assert reply["error"]["code"] == "duplicate"
        site.audit_for(code="duplicate", raw=changed.encode(), command_id=body["command_id"])
        site.assert_edge_got_nothing(dash)
        assert site.edge.ids()[frames:].count(body["command_id"]) == 0
        assert site.edge_stream_len() == stream + 1  # only the sentinel


def test_frame_beyond_the_hard_limit_closes_the_connection_1009(site: Site) -> None:
    dash = site.dashboard(max_size=None)
    dash.send("x" * (300 * 1024))
    with pytest.raises(ConnectionClosed) as closed:
        recv_json(dash)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    record = site.audit_for(code="too_large", actor=f"user:{site.user}", error="(1009)")
    assert "hard limit" in record["error"]["message"]
    site.assert_edge_got_nothing()


def test_invalid_utf8_text_frame_closes_the_connection_1007(site: Site) -> None:
    dash = site.dashboard()
    dash.send(b'{"command_id": "\xff\xfe\xfd"}', text=True)
    with pytest.raises(ConnectionClosed) as closed:
        recv_json(dash)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1007
    record = site.audit_for(code="malformed_json", actor=f"user:{site.user}", error="(1007)")
    assert "UTF-8" in record["error"]["message"]
    site.assert_edge_got_nothing()


@pytest.mark.parametrize(
    "origin", ["https://evil.example", "null", "http://127.0.0.1.evil.example"]
)
def test_page_from_another_origin_is_refused(site: Site, origin: str) -> None:
    with pytest.raises(InvalidStatus) as refused:
        site.dashboard(additional_headers={"Origin": origin})
    assert refused.value.response.status_code == 403
    body = json.loads(refused.value.response.body or b"{}")
    assert body["error"]["code"] == "forbidden"
    record = site.audit_for(code="forbidden", input_excerpt="/ws/dashboard")
    assert record["actor"].startswith("anonymous@127.0.0.1")
    site.assert_edge_got_nothing()


def test_page_from_the_gateways_own_origin_may_connect(site: Site) -> None:
    with site.dashboard(additional_headers={"Origin": site.gw.http}) as dash:
        site.assert_edge_got_nothing(dash)


def test_token_in_the_url_is_not_accepted(site: Site) -> None:
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(f"{site.gw.ws}/ws/dashboard?access_token={site.token()}")
    assert refused.value.response.status_code == 401
    site.audit_for(code="unauthenticated", input_excerpt="no token")


def test_http_bodies_that_are_too_large_or_malformed(site: Site) -> None:
    url = f"{site.gw.http}/api/commands"
    token = site.token()
    status, _, reply = http("POST", url, token, raw=b"{" + b" " * (70 * 1024) + b"}")
    assert status == 413 and reply["error"]["code"] == "too_large"
    status, _, reply = http("POST", url, token, raw=b"\xff\xfe{}")
    assert status == 400 and reply["error"]["code"] == "malformed_json"
    status, _, reply = http("POST", url, token, raw=with_target(edge_id="../x").encode())
    assert status == 422 and reply["error"]["code"] == "invalid_command"
    status, _, reply = http("POST", url, "not.a.token", body=cmd())
    assert status == 401 and reply["error"]["code"] == "unauthenticated"
    site.audit_for(code="malformed_json", raw=b"\xff\xfe{}")
    site.assert_edge_got_nothing()


class RawClient:
    """A WebSocket client on a bare socket with a tiny receive window, read only on demand."""

    def __init__(self, url: str, token: str) -> None:
        uri = parse_uri(url)
        self.proto = ClientProtocol(uri)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)  # before connect
        self.sock.connect((uri.host, uri.port))
        request = self.proto.connect()
        request.headers["Authorization"] = f"Bearer {token}"
        self.proto.send_request(request)
        self._flush()
        while not any(isinstance(e, Response) for e in self.proto.events_received()):
            self.proto.receive_data(self.sock.recv(65536))
        assert self.proto.handshake_exc is None, self.proto.handshake_exc

    def _flush(self) -> None:
        self.sock.sendall(b"".join(self.proto.data_to_send()))

    def send(self, text: str) -> None:
        self.proto.send_text(text.encode())
        self._flush()

    def read_until_closed(self, timeout_s: float = 15) -> int | None:
        """Read everything that was held back; the close code the server sent."""
        self.sock.settimeout(timeout_s)
        while self.proto.close_rcvd is None:
            data = self.sock.recv(65536)
            if not data:
                break
            self.proto.receive_data(data)
            self.proto.events_received()
        self.sock.close()
        return self.proto.close_rcvd.code if self.proto.close_rcvd else None


def test_slow_reading_dashboard_is_disconnected_1013(processes: Processes) -> None:
    """A dashboard that stops reading is cut off instead of buffering without bound."""
    enroll(processes, EDGE)
    gw = start_gateway(
        processes,
        {**NO_LIMITS, "DISPATCH_OUTBOX_FRAMES": "16", "DISPATCH_SOCKET_SEND_BUFFER_BYTES": "8192"},
    )
    keys = Keys(processes.env["DISPATCH_NAMESPACE"], PARTITIONS)
    client = redis.Redis.from_url(REDIS_URL)

    def overflowed() -> bool:
        # The whole stream: answers still in flight may be recorded after the verdict.
        rows = client.xrange(keys.audit())
        return any(json.loads(f[b"e"])["error"]["code"] == "slow_consumer" for _, f in rows)

    slow = RawClient(f"{gw.ws}/ws/dashboard", user_token("slow_reader", control=[EDGE]))
    # Every frame it sends is answered to it, and it reads none of the answers.
    sent = 0
    while sent < 10_000 and not overflowed():
        for _ in range(250):
            slow.send("{")
        sent += 250
        # Let the gateway catch up: every frame it answered left one audit record.
        wait_until(
            lambda n=sent: overflowed() or client.xlen(keys.audit()) >= n, 10, what="the answers"
        )
    assert overflowed(), f"{sent} unread answers did not overflow a 16-frame outbox"
    assert slow.read_until_closed() == 1013
    # Everyone else is still served.
    with ws_connect(f"{gw.ws}/ws/dashboard", user_token("other", control=[EDGE])) as other:
        body = command(edge_id=EDGE)
        other.send(json.dumps(body))
        assert recv_for(other, body["command_id"])["status"] == "issued"
    client.close()


@pytest.mark.parametrize(
    ("field", "frame"),
    [
        ("command_id", lambda: json.dumps(cmd(command_id=f"nl_{uuid.uuid4().hex[:8]}\n"))),
        ("device_id", lambda: with_target(device_id="bms_main\n")),
        ("channel", lambda: with_target(channel="SetActivePower\n")),
        ("edge_id", lambda: with_target(edge_id=f"{EDGE}\n")),
    ],
)
def test_identifier_ending_in_a_newline_is_refused_and_never_becomes_a_key(
    site: Site, field: str, frame: Callable[[], str]
) -> None:
    """`$` matches before a final newline: every identifier check must be full-match."""
    raw = frame()
    with site.dashboard() as dash:
        dash.send(raw)
        reply = recv_refusal(dash)
        assert reply["error"]["code"] == "invalid_command", reply
        assert field in reply["error"]["message"], reply
        site.audit_for(code="invalid_command", raw=raw.encode())
        site.assert_edge_got_nothing(dash)
    assert_no_key_ends_in_a_newline(site)


def test_edge_id_and_user_id_ending_in_a_newline_are_refused_at_the_handshake(
    site: Site,
) -> None:
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(f"{site.gw.ws}/ws/edge/abc%0A", edge_token("abc\n"))
    assert refused.value.response.status_code == 400
    body = json.loads(refused.value.response.body or b"{}")
    assert body["error"]["code"] == "invalid_command" and "edge id" in body["error"]["message"]
    site.audit_for(code="invalid_command", input_excerpt="'abc\\n'")
    with pytest.raises(InvalidStatus) as refused:
        site.dashboard(user_token(f"{site.user}\n", control=[EDGE]))
    assert refused.value.response.status_code == 401
    body = json.loads(refused.value.response.body or b"{}")
    assert body["error"]["code"] == "unauthenticated" and "user_id" in body["error"]["message"]
    site.assert_edge_got_nothing()
    assert_no_key_ends_in_a_newline(site)


def assert_no_key_ends_in_a_newline(site: Site) -> None:
    keys = list(site.redis.scan_iter(match=f"{site.namespace}:*", count=1000))
    assert keys and not [k for k in keys if k.endswith(b"\n")]
