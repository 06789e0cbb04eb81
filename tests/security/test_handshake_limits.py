"""Handshake limits at a real gateway: request heads bounded in size and time, refused
handshakes throttled per address, a socket cap per user, forwarded headers and origins
believed only when configured, and no token in any log line.

Refusal buckets are per client address, so each test speaks from its own loopback
address (127.0.0.N) and finds a fresh bucket; 127.0.0.1 is left to the site's barrier.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import re
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection

from gateway.admission import Admission, AdmissionLimits, bucket_key
from gateway.logfilter import RedactSecrets, redact

from .conftest import NO_LIMITS, Site, start_gateway, ws_connect
from support import Gateway, user_token, wait_until
from support import http as http_call

TIMEOUT_S = 2.0
BURST = 5
WINDOW_S = 2.0
SOCKET_CAP = 3


@pytest.fixture(scope="module")
def site_env() -> dict[str, str]:
    return {
        "DISPATCH_HANDSHAKE_TIMEOUT_S": str(TIMEOUT_S),
        # One refusal back every 20 s: nothing refills while a test runs.
        "DISPATCH_HANDSHAKE_REFUSALS_PER_S": "0.05",
        "DISPATCH_HANDSHAKE_REFUSAL_BURST": str(BURST),
        "DISPATCH_HANDSHAKE_SUMMARY_WINDOW_S": str(WINDOW_S),
        "DISPATCH_MAX_SOCKETS_PER_USER": str(SOCKET_CAP),
    }


def upgrade_head(path: str = "/ws/dashboard", *extra: str) -> bytes:
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def exchange(
    port: int, source: str, data: bytes, timeout_s: float
) -> tuple[int | None, bytes, float]:
    """Send `data` from `source`, read until the server closes: (status, reply, seconds)."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        if data:
            writer.write(data)
            await writer.drain()
        reply = await asyncio.wait_for(reader.read(), timeout_s)  # until EOF
    finally:
        writer.close()
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", reply)
    return (int(match.group(1)) if match else None), reply, time.monotonic() - started


def refusals_from(site: Site, source: str) -> list[dict[str, Any]]:
    return [e for e in site.audit(2000) if e["actor"].startswith(f"anonymous@{source}")]


def summarised(entries: list[dict[str, Any]]) -> int:
    """How many throttled refusals the summary entries account for."""
    total = 0
    for entry in entries:
        if entry["error"]["code"] == "rate_limited":
            found = re.match(r"(\d+) refused handshake", entry["error"]["message"])
            assert found, entry
            total += int(found.group(1))
    return total


def connect_from(site: Site, source: str, token: str | None, **kwargs: Any) -> ClientConnection:
    sock = socket.create_connection(("127.0.0.1", site.gw.port), source_address=(source, 0))
    return ws_connect(f"{site.gw.ws}/ws/dashboard", token, sock=sock, **kwargs)


def test_500_oversized_header_lines_are_all_answered_431_and_closed(site: Site) -> None:
    source = "127.0.0.2"
    head = upgrade_head("/ws/dashboard", "X-Padding: " + "a" * 9000)

    async def flood() -> list[tuple[int | None, bytes, float]]:
        return await asyncio.gather(*(exchange(site.gw.port, source, head, 30) for _ in range(500)))

    started = time.monotonic()
    results = asyncio.run(flood())
    elapsed = time.monotonic() - started
    assert [status for status, _, _ in results] == [431] * 500
    assert b"DISPATCH_HTTP_MAX_LINE_BYTES" in results[0][1]
    print(f"500 oversized handshakes answered 431 and closed in {elapsed:.2f} s")
    assert elapsed < 20, f"500 refusals took {elapsed:.1f} s"

    # The first BURST are recorded one by one, the rest summarised per window.
    def accounting() -> tuple[int, int] | None:
        entries = refusals_from(site, source)
        individual = sum(e["error"]["code"] == "too_large" for e in entries)
        total = summarised(entries)
        return (individual, total) if individual + total >= 500 else None

    individual, total = wait_until(
        accounting, 2 * WINDOW_S + 10, what="every refusal recorded or summarised"
    )
    assert (individual, total) == (BURST, 500 - BURST)
    # The log, too, has one line per recorded refusal and one warning for the throttle.
    log = site.gw.proc.log()
    assert log.count(f"gateway.http.refused client={source}:") == BURST
    assert log.count(f"gateway.admission.throttled address={source} ") >= 1
    site.assert_edge_got_nothing()


def test_oversized_head_and_too_many_headers_are_answered_431(site: Site) -> None:
    source = "127.0.0.11"
    many = [f"X-Filler-{i}: " + "b" * 4000 for i in range(10)]  # 40 KB in lines < 8 KB
    status, reply, _ = asyncio.run(exchange(site.gw.port, source, upgrade_head("/", *many), 10))
    assert status == 431 and b"DISPATCH_HTTP_MAX_HEAD_BYTES" in reply
    fields = [f"X-F{i}: x" for i in range(120)]
    status, reply, _ = asyncio.run(exchange(site.gw.port, source, upgrade_head("/", *fields), 10))
    assert status == 431 and b"DISPATCH_HTTP_MAX_HEADERS" in reply
    long_url = upgrade_head("/ws/dashboard?" + "q" * 8180)
    status, reply, _ = asyncio.run(exchange(site.gw.port, source, long_url, 10))
    assert status == 431 and b"request line" in reply
    # Plain HTTP requests are bounded the same way.
    api = f"GET /api/commands HTTP/1.1\r\nHost: x\r\nX-Pad: {'c' * 9000}\r\n\r\n".encode()
    status, _, _ = asyncio.run(exchange(site.gw.port, source, api, 10))
    assert status == 431


def test_half_sent_and_silent_connections_are_closed_408_within_the_limit(site: Site) -> None:
    source = "127.0.0.3"
    half = b"GET /ws/dashboard HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"

    async def both() -> list[tuple[int | None, bytes, float]]:
        return await asyncio.gather(
            exchange(site.gw.port, source, half, TIMEOUT_S + 8),
            exchange(site.gw.port, source, b"", TIMEOUT_S + 8),
        )

    for status, reply, seconds in asyncio.run(both()):
        assert status == 408, reply
        assert TIMEOUT_S - 0.2 <= seconds < TIMEOUT_S + 5, seconds
        assert b"DISPATCH_HANDSHAKE_TIMEOUT_S" in reply
    records = wait_until(
        lambda: len(r := refusals_from(site, source)) == 2 and r,
        5,
        what="two audit records",
    )
    assert {r["error"]["code"] for r in records} == {"protocol_error"}


def test_refused_handshakes_are_throttled_per_address(site: Site) -> None:
    source = "127.0.0.4"
    for _ in range(BURST):
        with pytest.raises(InvalidStatus) as refused:
            connect_from(site, source, None)
        assert refused.value.response.status_code == 401
    throttled = 0
    for _ in range(3):
        with pytest.raises(InvalidStatus) as refused:
            connect_from(site, source, site.token())  # even a valid token waits its turn
        response = refused.value.response
        assert response.status_code == 429
        assert int(response.headers["Retry-After"]) >= 1
        body = json.loads(response.body or b"{}")
        assert body["error"]["code"] == "rate_limited"
        assert "refused handshakes per address" in body["error"]["limit"]
        throttled += 1
    conn = http.client.HTTPConnection("127.0.0.1", site.gw.port, source_address=(source, 0))
    conn.request("GET", "/api/rejections", headers={"Authorization": f"Bearer {site.token()}"})
    reply = conn.getresponse()
    assert reply.status == 429 and reply.getheader("Retry-After")
    conn.close()
    throttled += 1
    # Another address is served as usual.
    with connect_from(site, "127.0.0.5", site.token()) as dash:
        site.assert_edge_got_nothing(dash)
    # BURST refusals recorded one by one; the throttled ones in one summary entry.
    entries = wait_until(
        lambda: summarised(e := refusals_from(site, source)) == throttled and e,
        WINDOW_S + 10,
        what="the summary entry",
    )
    assert [e["error"]["code"] for e in entries].count("unauthenticated") == BURST
    assert [e["error"]["code"] for e in entries].count("rate_limited") == 1
    log = site.gw.proc.log()
    assert not re.search(rf'{source}:\d+ - "WebSocket /ws/dashboard" 429', log)
    assert "without completing handshake" not in log  # uvicorn's spurious ERROR per denial
    _, _, metrics = http_call("GET", f"{site.gw.http}/metrics")
    counted = re.search(r"^dispatch_handshakes_throttled_total (\S+)$", metrics, re.M)
    assert counted and float(counted.group(1)) >= throttled


def test_sockets_per_user_are_capped(site: Site) -> None:
    user = f"capped_{uuid.uuid4().hex[:6]}"
    token = user_token(user, control=[site.edge_id])
    source = "127.0.0.6"
    open_ = [connect_from(site, source, token) for _ in range(SOCKET_CAP)]
    with pytest.raises(InvalidStatus) as refused:
        connect_from(site, source, token)
    assert refused.value.response.status_code == 429
    body = json.loads(refused.value.response.body or b"{}")
    assert body["error"]["code"] == "rate_limited"
    assert "DISPATCH_MAX_SOCKETS_PER_USER" in body["error"]["message"]
    assert body["error"]["limit"] == f"sockets per user: {SOCKET_CAP}"
    site.audit_for(code="rate_limited", actor=f"user:{user}")
    # Others are not affected, and a closed socket frees its slot.
    with connect_from(site, source, site.token()):
        pass
    open_.pop().close()

    def reconnect() -> ClientConnection | None:
        try:
            return connect_from(site, source, token)
        except InvalidStatus:
            return None

    again = wait_until(reconnect, 10, interval_s=0.2, what="a freed slot")
    for ws in [*open_, again]:
        ws.close()


PROXY = "127.0.0.9"
CONSOLE = "https://console.example"


@pytest.fixture(scope="module")
def behind_proxy(site: Site) -> Iterator[Gateway]:
    """A second gateway that trusts PROXY's forwarded headers and allows CONSOLE pages."""
    gw = start_gateway(
        site.processes,
        {**NO_LIMITS, "DISPATCH_FORWARDED_ALLOW_IPS": PROXY, "DISPATCH_ALLOWED_ORIGINS": CONSOLE},
    )
    yield gw
    gw.proc.stop()


def via(gw: Gateway, source: str, token: str | None, **headers: str) -> ClientConnection:
    sock = socket.create_connection(("127.0.0.1", gw.port), source_address=(source, 0))
    return ws_connect(f"{gw.ws}/ws/dashboard", token, sock=sock, additional_headers=headers)


def test_forwarded_for_is_believed_only_from_configured_proxies(
    site: Site, behind_proxy: Gateway
) -> None:
    # From 127.0.0.1, which uvicorn trusts by default: here the socket's peer counts.
    spoof = {"X-Forwarded-For": "6.6.6.6"}
    with pytest.raises(InvalidStatus):
        ws_connect(f"{site.gw.ws}/ws/dashboard?spoofed", None, additional_headers=spoof)
    site.audit_for(code="unauthenticated", actor="anonymous@127.0.0.1:")
    assert not refusals_from(site, "6.6.6.6")
    # Through the configured proxy, the forwarded address is the client's.
    with pytest.raises(InvalidStatus):
        via(behind_proxy, PROXY, None, **spoof)
    wait_until(lambda: refusals_from(site, "6.6.6.6"), 5, what="the proxied client's address")
    # The same header from anyone else is ignored.
    with pytest.raises(InvalidStatus):
        via(behind_proxy, "127.0.0.13", None, **{"X-Forwarded-For": "7.7.7.7"})
    wait_until(lambda: refusals_from(site, "127.0.0.13"), 5, what="the direct client's address")
    assert not refusals_from(site, "7.7.7.7")


def test_origin_must_match_scheme_host_and_port(site: Site, behind_proxy: Gateway) -> None:
    source = "127.0.0.8"
    port = site.gw.port
    for origin in (f"https://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}"):
        with pytest.raises(InvalidStatus) as refused:
            connect_from(site, source, site.token(), additional_headers={"Origin": origin})
        assert refused.value.response.status_code == 403, origin
    with connect_from(
        site, source, site.token(), additional_headers={"Origin": f"http://127.0.0.1:{port}"}
    ):
        pass
    # Configured origins compare the same way (the default port may be spelled out) ...
    token = site.token()
    via(behind_proxy, source, token, Origin=f"{CONSOLE}:443").close()
    with pytest.raises(InvalidStatus):
        via(behind_proxy, source, token, Origin="http://console.example")
    # ... and behind a TLS proxy the gateway's own origin is https.
    own = f"https://127.0.0.1:{behind_proxy.port}"
    via(behind_proxy, PROXY, token, Origin=own, **{"X-Forwarded-Proto": "https"}).close()
    with pytest.raises(InvalidStatus):
        via(behind_proxy, source, token, Origin=own, **{"X-Forwarded-Proto": "https"})


@pytest.fixture
def tokens() -> Iterator[dict[str, str]]:
    yield {
        name: user_token(f"logged_{i}", control=[])
        for i, name in enumerate(
            ("token", "access_token", "JWT", "Bearer", "auth", "Authorization")
        )
    }


def test_no_token_in_any_log_line(site: Site, tokens: dict[str, str]) -> None:
    source = "127.0.0.10"
    query = "&".join(f"{name}={token}" for name, token in tokens.items())
    with pytest.raises(InvalidStatus) as refused:
        sock = socket.create_connection(("127.0.0.1", site.gw.port), source_address=(source, 0))
        ws_connect(f"{site.gw.ws}/ws/dashboard?{query}", None, sock=sock)
    assert refused.value.response.status_code == 401
    wait_until(
        lambda: "/ws/dashboard?token=[redacted]" in site.gw.proc.log(), 5, what="the log line"
    )
    log = site.gw.proc.log()
    for token in tokens.values():
        assert token not in log
        assert token.rsplit(".", 1)[1] not in log  # not even the signature


JWT = user_token("someone")


@pytest.mark.parametrize(
    "line",
    [
        f'127.0.0.1:5 - "WebSocket /ws/dashboard?token={JWT}" 401',
        f"GET /api/commands?x=1&ACCESS_TOKEN={JWT}&y=2",
        f"/ws/dashboard?%61uth={JWT}",  # percent-encoded parameter name
        f"/ws/dashboard?a=b;jwt={JWT}",
        f"Authorization: Bearer {JWT}",
        f"Sec-WebSocket-Protocol: dispatch.v1, bearer.{JWT}",
        f"a token pasted anywhere: {JWT}.",
    ],
)
def test_redact_removes_the_credential(line: str) -> None:
    cleaned = redact(line)
    assert JWT not in cleaned and JWT.rsplit(".", 1)[1] not in cleaned
    assert "[redacted]" in cleaned


@pytest.mark.parametrize("scheme", ["Bearer", "BEARER", "bEaReR"])
def test_redact_removes_an_opaque_bearer_value_in_any_case(scheme: str) -> None:
    secret = "opaque0123456789abcdefXYZ"
    cleaned = redact(f"upstream said: Authorization: {scheme} {secret} (refused)")
    assert secret not in cleaned and f"{scheme} [redacted]" in cleaned


def test_redact_filter_formats_each_record_once() -> None:
    record = logging.LogRecord(
        "dispatch.transition", logging.INFO, __file__, 1, "a=%s token=%s", ("1", JWT), None
    )
    assert RedactSecrets().filter(record)
    assert (record.msg, record.args) == ("a=1 token=[redacted]", None)
    assert record.getMessage() == "a=1 token=[redacted]"


def test_redact_keeps_everything_else() -> None:
    line = '127.0.0.1:5 - "WebSocket /ws/dashboard?view=all&tokens_left=3" 403'
    assert redact(line) == line
    hint = "no bearer token: send `Authorization: Bearer <token>`"
    assert redact(hint) == hint


def test_refusal_bucket_refills_and_groups_ipv6_by_64() -> None:
    now = [0.0]
    admission = Admission(AdmissionLimits(refusals_per_s=2, refusal_burst=3), lambda: now[0])
    for _ in range(3):
        assert admission.retry_after_s("10.0.0.1") is None
        admission.charge("10.0.0.1")
    assert admission.retry_after_s("10.0.0.1") == pytest.approx(0.5)
    assert admission.retry_after_s("10.0.0.2") is None
    now[0] = 0.5
    assert admission.retry_after_s("10.0.0.1") is None
    assert bucket_key("2001:db8::1") == bucket_key("2001:db8::ffff:1") == "2001:db8::/64"
    assert bucket_key("::ffff:10.0.0.1") == "10.0.0.1"


@pytest.mark.parametrize("header", ["Content-Length: 5", "Transfer-Encoding: chunked"])
def test_upgrade_the_websocket_parser_refuses_is_closed_not_held(site: Site, header: str) -> None:
    """A request httptools passes but websockets refuses: answered or closed at once."""
    source = "127.0.0.12"
    status, reply, seconds = asyncio.run(
        exchange(site.gw.port, source, upgrade_head("/ws/dashboard", header), 10)
    )
    assert seconds < TIMEOUT_S, (status, reply)
    assert status == 400 and b"not a valid WebSocket upgrade request" in reply, reply
    wait_until(
        lambda: any(e["error"]["code"] == "protocol_error" for e in refusals_from(site, source)),
        5,
        what="the audit record",
    )
