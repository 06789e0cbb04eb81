"""Auditor queries at the edges: bad filters, cursors, exports and the `dispatch audit` CLI."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from urllib.parse import urlencode

import pytest
from projection_support import record_refusal, running, wait_caught_up

from config.settings import Settings
from ledger.store import Ledger
from projections import loadgen
from projections.queries import Cursor, QueryError

from support import Processes, http, user_token


@pytest.fixture
async def history(ledger: Ledger, settings: Settings) -> list[loadgen.Planned]:
    plans = await loadgen.generate(ledger, range(60))
    await record_refusal(
        ledger,
        "anonymous@10.0.0.9:5555",
        "not valid JSON: truncated",
        excerpt='{"command_id": "x"',
    )
    async with running(ledger, settings):
        await wait_caught_up(settings, ledger.redis, ledger.keys)
    return plans


async def test_bad_filters_are_refused_with_the_cause(
    history: list[loadgen.Planned], processes: Processes
) -> None:
    gw = processes.gateway()
    token = user_token("auditor", view=["edge_00"])
    for params, cause in (
        ({"status": "done"}, "`status` must be one of"),
        ({"command_type": "reboot"}, "`command_type` must be one of"),
        ({"since": "yesterday"}, "`since` must be an ISO 8601 time"),
        ({"until": "2026-02-15T14:30:00"}, "`until` needs a timezone"),
        ({"since": "2026-02-16T00:00:00Z", "until": "2026-02-15T00:00:00Z"}, "earlier than"),
        ({"limit": "0"}, "`limit` must be a whole number from 1 to 1000"),
        ({"limit": "5000"}, "`limit` must be a whole number from 1 to 1000"),
        ({"cursor": "not-a-cursor"}, "is not a cursor from a previous page"),
        ({"edge_id": "a b"}, "is not a valid edge id"),
        ({"format": "xml"}, "`format` must be one of"),
    ):
        code, _, body = http("GET", f"{gw.http}/api/commands?{urlencode(params)}", token)
        assert code == 400, (params, body)
        assert body["error"]["code"] == "invalid_query" and cause in body["error"]["message"]
    code, _, body = http("GET", f"{gw.http}/api/commands")
    assert code == 401 and body["error"]["code"] == "unauthenticated"


async def test_pages_follow_the_cursor_and_exports_stream_csv(
    history: list[loadgen.Planned], processes: Processes
) -> None:
    gw = processes.gateway()
    token = user_token("v", view=["edge_01"])
    mine = sorted(p.command_id for p in history if p.edge_id == "edge_01")
    seen: list[str] = []
    cursor = ""
    while True:
        query = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        code, _, body = http("GET", f"{gw.http}/api/commands?{urlencode(query)}", token)
        assert code == 200
        seen += [r["command_id"] for r in body["commands"]]
        cursor = body["next_cursor"]
        if not cursor:
            break
        assert Cursor.decode(cursor).key == body["commands"][-1]["command_id"]
    assert sorted(seen) == mine and len(seen) == len(set(seen))
    code, headers, text = http("GET", f"{gw.http}/api/commands?format=csv&limit=3", token)
    assert code == 200 and headers["content-disposition"] == 'attachment; filename="commands.csv"'
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 3 and {r["edge_id"] for r in rows} == {"edge_01"}
    assert rows[0]["issued_at"].endswith("Z") and rows[0]["status"]


def test_cursor_round_trip_and_refusal() -> None:
    from datetime import UTC, datetime  # noqa: PLC0415

    at = datetime(2026, 2, 15, 14, 30, 0, 123456, tzinfo=UTC)
    assert Cursor.decode(Cursor(at, "cmd_1").encode()) == Cursor(at, "cmd_1")
    with pytest.raises(QueryError, match="not a cursor"):
        Cursor.decode("eyJ4Ijo")


async def test_audit_command_line(
    history: list[loadgen.Planned], processes: Processes, tmp_path: Path
) -> None:
    rejected = next(p for p in history if p.status == "rejected")
    show = processes.dispatch("show", "audit", "show", rejected.command_id, "--json")
    assert show.popen.wait(30) == 0, show.log()
    shown = json.loads(next(ln for ln in show.log().splitlines() if ln.startswith("{")))
    assert shown["command"]["status"] == "rejected"
    assert shown["command"]["error_code"] == "out_of_range"
    assert [e["status"] for e in shown["events"]] == ["issued", "authorized", "routed", "rejected"]
    assert [e["seq"] for e in shown["events"]] == sorted(e["seq"] for e in shown["events"])

    out = tmp_path / "export.csv"
    export = processes.dispatch(
        "export", "audit", "export", "--edge", "edge_02", "--status", "executed", "-o", str(out)
    )
    assert export.popen.wait(30) == 0, export.log()
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    want = {p.command_id for p in history if p.edge_id == "edge_02" and p.status == "executed"}
    assert {r["command_id"] for r in rows} == want and want

    refusals = processes.dispatch("refusals", "audit", "refusals", "--code", "malformed_json")
    assert refusals.popen.wait(30) == 0
    assert "anonymous@10.0.0.9:5555" in refusals.log() and "(1 rows)" in refusals.log()

    listing = processes.dispatch("list", "audit", "list", "--user", "carol", "--limit", "3")
    assert listing.popen.wait(30) == 0
    assert "more: add --cursor " in listing.log() and "user:carol" in listing.log()

    bad = processes.dispatch("bad", "audit", "list", "--since", "soon")
    assert bad.popen.wait(30) == 1
    assert "`since` must be an ISO 8601 time" in bad.log()


def test_before_any_projection_the_api_says_so(processes: Processes) -> None:
    gw = processes.gateway()
    token = user_token("auditor", view=["edge_00"])
    for query in ("", "?format=csv", "?format=json"):
        code, _, body = http("GET", f"{gw.http}/api/commands{query}", token)
        assert code == 503, body
        assert "start `dispatch projector`" in body["error"]["message"]
    code, _, body = http("GET", f"{gw.http}/api/rejections", token)
    assert code == 503
