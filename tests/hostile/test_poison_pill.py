"""Text PostgreSQL cannot hold never stops the projector nor the audit queries.

A valid setpoint whose `source` holds NUL is admitted, executed and projected (the
derived columns hold the documented escape `\\u0000`); refusals whose edge id or excerpt
hold NUL keep `/api/rejections` and its CSV export answering; CSV cells that a
spreadsheet would run as formulas are neutralised with a leading quote.
"""

from __future__ import annotations

import csv
import io
import json
import urllib.parse
import urllib.request
import uuid

import pytest
from websockets.exceptions import InvalidStatus

from .conftest import EDGE, Site, ws_connect
from support import command, http, wait_until

ESCAPED_NUL = "\\u0000"  # what the audit's text columns hold for a NUL (docs/audit.md)


def submit(site: Site, **fields: object) -> str:
    body = command(f"cmd_{uuid.uuid4().hex[:12]}", edge_id=EDGE, **fields)
    code, _, reply = http("POST", f"{site.gw.http}/api/commands", site.token(), body)
    assert code == 202, reply
    return str(body["command_id"])


def get(site: Site, path: str) -> tuple[int, object]:
    code, _, body = http("GET", f"{site.gw.http}{path}", site.token())
    return code, body


def csv_rows(site: Site, path: str) -> list[dict[str, str]]:
    req = urllib.request.Request(f"{site.gw.http}{path}")
    req.add_header("Authorization", f"Bearer {site.token()}")
    with urllib.request.urlopen(req, timeout=20) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    assert text.endswith("\r\n"), text[-200:]
    return list(csv.DictReader(io.StringIO(text, newline="")))


def test_setpoint_with_nul_in_source_is_executed_projected_and_queryable(site: Site) -> None:
    command_id = submit(site, source="a\u0000b")
    assert site.wait_status(command_id, "executed") == "executed"
    assert site.wait_projected(command_id, "executed") == "executed"
    site.assert_projector_alive()

    # The escaped form in every query: list, filter by the original text, CSV, JSON export.
    code, page = get(site, f"/api/commands?edge_id={EDGE}&limit=1000")
    assert code == 200
    rows = {r["command_id"]: r for r in page["commands"]}  # type: ignore[index]
    assert rows[command_id]["source"] == f"a{ESCAPED_NUL}b"
    code, page = get(site, "/api/commands?source=" + urllib.parse.quote("a\u0000b"))
    assert code == 200 and [r["command_id"] for r in page["commands"]] == [command_id]  # type: ignore[index]
    exported = {r["command_id"]: r for r in csv_rows(site, "/api/commands?format=csv")}
    assert exported[command_id]["source"] == f"a{ESCAPED_NUL}b"
    assert exported[command_id]["status"] == "executed"

    rc, out = site.audit("show", command_id, "--json")
    assert rc == 0, out
    shown = json.loads(out)
    assert shown["command"]["source"] == f"a{ESCAPED_NUL}b"
    # The payload keeps the ledger's bytes: the original, losslessly.
    issued = next(e for e in shown["events"] if e["status"] == "issued")
    assert json.loads(issued["payload"])["command"]["source"] == "a\u0000b"
    rc, out = site.audit("verify", "--commands")
    assert rc == 0 and "audit chain intact" in out, out


def test_refusals_holding_nul_keep_the_history_readable(site: Site) -> None:
    # An edge id with NUL in the path, no token: refused at the handshake, and audited.
    with pytest.raises(InvalidStatus):
        ws_connect(f"{site.gw.ws}/ws/edge/abc%00def").close()
    # A signed-in user sending a text frame with NUL: answered `rejected`, and audited.
    marker = uuid.uuid4().hex[:8]
    dash = site.prober()
    try:
        dash.send(f"abc\u0000def {marker}")
        reply = json.loads(dash.recv(timeout=10))
        assert reply["status"] == "rejected", reply
    finally:
        dash.close()

    def refusals() -> list[dict[str, str]]:
        code, page = get(site, "/api/rejections?limit=1000")
        assert code == 200, page
        return list(page["rejections"])  # type: ignore[index]

    def both_projected() -> bool:
        excerpts = [r.get("input_excerpt") or "" for r in refusals()]
        frame = any(f"abc{ESCAPED_NUL}def {marker}" in e for e in excerpts)
        path = any(f"abc{ESCAPED_NUL}def" in e and "/ws/edge/" in e for e in excerpts)
        return frame and path

    wait_until(both_projected, 20, what="both refusals in /api/rejections")
    rows = refusals()
    exported = csv_rows(site, "/api/rejections?format=csv")
    assert sorted(r["event_id"] for r in exported) == sorted(r["event_id"] for r in rows)
    site.assert_projector_alive()
    rc, out = site.audit("refusals", "--limit", "1000")
    assert rc == 0, out
    rc, out = site.audit("export", "--refusals", "--format", "csv")
    assert rc == 0 and f"abc{ESCAPED_NUL}def {marker}" in out, out[-2000:]


FORMULAS = ["=1+2", "+1", "-cmd", "@SUM(A1)", "\tx", "\rx"]


def test_csv_cells_that_would_run_as_formulas_are_neutralised(site: Site) -> None:
    ids = {submit(site, source=text): text for text in FORMULAS}
    negative = submit(site, value=-5000, source="plain")
    marker = uuid.uuid4().hex[:8]
    dash = site.prober()
    try:
        dash.send(f'=HYPERLINK("http://x") {marker}')
        assert json.loads(dash.recv(timeout=10))["status"] == "rejected"
    finally:
        dash.close()
    for command_id in [*ids, negative]:
        site.wait_projected(command_id, "executed")

    by_id = {r["command_id"]: r for r in csv_rows(site, "/api/commands?format=csv")}
    for command_id, text in ids.items():
        assert by_id[command_id]["source"] == "'" + text
    assert by_id[negative]["value"] == "-5000"  # numbers stay numbers

    rc, out = site.audit("export", "--format", "csv")
    assert rc == 0, out
    cli = {r["command_id"]: r for r in csv.DictReader(io.StringIO(out, newline=""))}
    for command_id, text in ids.items():
        assert cli[command_id]["source"] == "'" + text

    def refusal_row() -> dict[str, str] | None:
        rows = csv_rows(site, "/api/rejections?format=csv")
        return next((r for r in rows if marker in r["input_excerpt"]), None)

    row = wait_until(refusal_row, 20, what="the formula refusal in the CSV export")
    assert row["input_excerpt"].startswith("'=HYPERLINK")
    rc, out = site.audit("export", "--refusals", "--format", "csv")
    assert rc == 0 and f'\'=HYPERLINK(""http://x"") {marker}' in out, out[-2000:]
