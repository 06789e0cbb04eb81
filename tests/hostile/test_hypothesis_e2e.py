"""Arbitrary text through every text field of every message type, end to end.

Strings with NUL, lone surrogates, control characters, formula starts and up to 64 KiB go
into command fields, acknowledgment error messages, raw dashboard frames and edge ids
in handshake paths of a real gateway, a real projector and a real edge. After each
example every frame was answered, the commands reached a final status (the silent one by
the `timed_out` verdict), the projector is alive and the audit queries answer; at the
end the command line queries answer and `dispatch audit verify` passes (naming any
quarantined entry).
"""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import InvalidHandshake

from .conftest import EDGE, Site, close_site, open_site, ws_connect
from support import command, drop_namespace, http

ANY_CHAR = st.characters(codec=None, exclude_categories=())  # surrogates and controls too
HOSTILE = st.one_of(
    st.text(ANY_CHAR, max_size=40),
    st.text(st.sampled_from("\x00\x01\x1b\t\r\n\ud800\udfff=+-@'\",;\\\u2028\ufeff"), max_size=20),
    st.sampled_from(["a\x00b", "\ud800", "=1+2", "@SUM(A1)", "-", "\t", "\r", "\x00"]),
    st.integers(1, 64 * 1024).map(lambda n: ("\x00=\ud800x" * (n // 4 + 1))[:n]),
)
FINAL = ("executed", "failed", "rejected", "timed_out")


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    namespace = f"t{uuid.uuid4().hex[:10]}"
    site = open_site(
        namespace, tmp_path_factory.mktemp("hypothesis"), DISPATCH_ACK_TIMEOUT_MS="700"
    )
    try:
        yield site
    finally:
        close_site(site)
        drop_namespace(namespace)


def post(site: Site, body: dict[str, object]) -> tuple[int, dict[str, object]]:
    # json.dumps writes a lone surrogate as its \\udXXX escape: still a valid request.
    raw = json.dumps(body).encode()
    code, _, reply = http("POST", f"{site.gw.http}/api/commands", site.token(), raw=raw)
    assert code == 202 or 400 <= code < 500, (code, reply)  # admitted, or refused
    return code, reply


def get_text(site: Site, path: str) -> str:
    req = urllib.request.Request(f"{site.gw.http}{path}")
    req.add_header("Authorization", f"Bearer {site.token()}")
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200, path
        return str(resp.read().decode())


def frame_is_answered(site: Site, text: str) -> None:
    dash = site.prober()
    try:
        if any(0xD800 <= ord(c) <= 0xDFFF for c in text):
            dash.send(text.encode("utf-8", "surrogatepass"))  # not UTF-8: only as binary
        else:
            dash.send(text)
        reply = json.loads(dash.recv(timeout=10))
        assert reply["status"] == "rejected" and reply["error"]["code"], reply
    finally:
        dash.close()


def edge_path_is_refused(site: Site, text: str) -> None:
    quoted = urllib.parse.quote(text.encode("utf-8", "surrogatepass")[:200], safe="") or "%00"
    with pytest.raises(InvalidHandshake):
        ws_connect(f"{site.gw.ws}/ws/edge/{quoted}").close()


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(text=HOSTILE, short=st.text(ANY_CHAR, min_size=1, max_size=16))
def test_arbitrary_text_never_stops_the_projector_verdicts_or_queries(
    e2e: Site, text: str, short: str
) -> None:
    site = e2e
    assert site.edge is not None
    tag = uuid.uuid4().hex[:10]
    # A command with the text as `source` (1-128 characters are accepted), whose edge
    # answers `failed` with the text (up to 64 KiB) as error message, `short` as code.
    source = text if 1 <= len(text) <= 128 else short
    answered = command(f"cmd_{tag}", edge_id=EDGE, source=source, unit=short)
    site.edge.replies[answered["command_id"]] = {
        "status": "failed",
        "error": {"code": short, "message": text},
    }
    silent = command(f"silent_{tag}", edge_id=EDGE, source=short)
    admitted = [b["command_id"] for b in (answered, silent) if post(site, b)[0] == 202]
    # The text in every other field of a command: each refused with a reason.
    for field in ("command_id", "source", "unit", "command_type", "timestamp"):
        post(site, command(**{field: text}))
    post(site, command(device_id=text, value=text))
    post(site, command(channel=text, edge_id=text))
    frame_is_answered(site, text)
    edge_path_is_refused(site, text)

    for command_id in admitted:
        site.wait_status(str(command_id), *FINAL)
        site.wait_projected(str(command_id), *FINAL)
    if silent["command_id"] in admitted:
        assert site.status(str(silent["command_id"])) == "timed_out"
    site.assert_projector_alive()
    for path in ("/api/commands?limit=20", "/api/rejections?limit=20"):
        code, _, page = http("GET", f"{site.gw.http}{path}", site.token())
        assert code == 200, page
    for path in ("/api/commands?format=csv", "/api/rejections?format=csv&limit=200"):
        assert get_text(site, path).endswith("\r\n")


def test_audit_command_line_after_the_hostile_examples(e2e: Site, tmp_path: Path) -> None:
    """After the examples above (same site; also alone): every CLI query answers and
    verify passes, naming any quarantined entry."""
    site = e2e
    body = command(f"cmd_{uuid.uuid4().hex[:12]}", edge_id=EDGE, source="\x00=\u2028")
    assert post(site, body)[0] == 202
    site.wait_projected(str(body["command_id"]), *FINAL)
    for args in (
        ("show", str(body["command_id"])),
        ("export", "--format", "csv", "-o", str(tmp_path / "c.csv")),
        ("export", "--refusals", "--format", "json", "-o", str(tmp_path / "r.json")),
    ):
        rc, out = site.audit(*args)
        assert rc == 0, (args, out[-3000:])
    json.loads((tmp_path / "r.json").read_text())
    rc, out = site.audit("verify", "--commands")
    assert rc == 0 and "audit chain intact" in out, out[-3000:]
    if "audit GAPS" in out:
        assert "quarantined: stream " in out, out[-3000:]
    site.assert_projector_alive()
