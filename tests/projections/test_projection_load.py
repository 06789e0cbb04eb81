"""10,000 commands through the real ledger, projected by two projectors, queried by filter."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import urllib.request
from collections import Counter
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import pytest
from projection_support import log_ids, pg, running, scalar, wait_caught_up

from config.settings import Settings
from ledger.ids import new_event_id
from ledger.store import Ledger
from projections import loadgen
from schemas.errors import ErrorCode, error
from schemas.events import Rejected

from support import Gateway, Processes, http, user_token

pytestmark = pytest.mark.slow


async def redis_now(ledger: Ledger) -> datetime:
    seconds, micros = await ledger.redis.time()
    return datetime.fromtimestamp(seconds + micros / 1e6, UTC)


async def refusals(ledger: Ledger, count: int) -> None:
    for i in range(count):
        await ledger.record_rejection(
            Rejected(
                event_id=new_event_id(),
                at=int(datetime.now(UTC).timestamp() * 1000),
                command_id=f"bad_{i}",
                edge_id="edge_00" if i % 2 else "",
                actor="user:mallory",
                error=error(ErrorCode.FORBIDDEN, "lacks can_control"),
                stage="gateway",
                input_digest="d" * 64,
                input_excerpt='{"command_id": "bad"}',
            )
        )


def fetch_raw(url: str, token: str) -> tuple[int, str, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return resp.status, resp.headers.get("content-type", ""), resp.read()


def csv_rows(gw: Gateway, token: str, **params: str) -> list[dict[str, str]]:
    status, ctype, body = fetch_raw(
        f"{gw.http}/api/commands?{urlencode({**params, 'format': 'csv'})}", token
    )
    assert status == 200 and ctype.startswith("text/csv")
    return list(csv.DictReader(io.StringIO(body.decode())))


def all_pages(gw: Gateway, token: str, **params: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    cursor = ""
    while True:
        query = {**params, "limit": "1000", **({"cursor": cursor} if cursor else {})}
        status, _, body = http("GET", f"{gw.http}/api/commands?{urlencode(query)}", token)
        assert status == 200, body
        assert body["count"] == len(body["commands"]) <= 1000
        rows.extend(body["commands"])
        cursor = body["next_cursor"]
        if not cursor:
            return rows


async def test_ten_thousand_commands_projected_and_queried(
    ledger: Ledger, settings: Settings, processes: Processes
) -> None:
    plans = await loadgen.generate(ledger, range(5000))
    await asyncio.sleep(0.01)
    cut = await redis_now(ledger)
    await asyncio.sleep(0.01)
    plans += await loadgen.generate(ledger, range(5000, 10_000))
    await refusals(ledger, 20)
    expected_ids = await log_ids(ledger.redis, ledger.keys)

    async with running(ledger, settings, count=2, batch=500) as projectors:
        await wait_caught_up(settings, ledger.redis, ledger.keys, timeout_s=120)
        # Two processes shared the partitions, and no event was projected twice.
        assert all(p.leases.held for p in projectors)
        assert sum(p.projected for p in projectors) == len(expected_ids)

    conn = await pg(settings)
    s = settings.namespace
    try:
        stored = await conn.execute(f'SELECT stream, entry_id FROM "{s}".events')
        assert {(a, b) for a, b in await stored.fetchall()} == expected_ids
        assert await scalar(
            conn, "SELECT count(DISTINCT event_id) FROM {s}.events", schema=s
        ) == len(expected_ids)
        assert await scalar(conn, "SELECT count(*) FROM {s}.commands", schema=s) == 10_000
        cur = await conn.execute(f'SELECT status, count(*) FROM "{s}".commands GROUP BY status')
        assert dict(await cur.fetchall()) == Counter(p.status for p in plans)
        # Timings of an executed command: issued -> routed -> delivered -> executed.
        cur = await conn.execute(
            f'SELECT route_ms, deliver_ms, execute_ms, total_ms, actor, source, value FROM "{s}".commands'
            " WHERE command_id = %s",
            (plans[1].command_id,),
        )
        route_ms, deliver_ms, execute_ms, total_ms, actor, source, value = await cur.fetchone()  # type: ignore[misc]
        assert plans[1].status == "executed" and actor == "user:bob" and source == "bob"
        assert value == 10
        assert 0 <= route_ms <= deliver_ms + route_ms <= total_ms
        assert execute_ms is not None and total_ms == route_ms + deliver_ms + execute_ms
    finally:
        await conn.close()

    gw = processes.gateway()
    assert processes.dispatch("grant", "grant", "auditor", "*", "can_view").popen.wait(20) == 0
    auditor = user_token("auditor")

    def expect(**params: str) -> None:
        def keep(p: loadgen.Planned) -> bool:
            return (
                all(
                    {
                        "edge_id": p.edge_id,
                        "source": p.source,
                        "user": p.user,
                        "status": p.status,
                        "command_type": p.command_type,
                    }.get(k, "")
                    == v
                    for k, v in params.items()
                    if k not in ("since", "until")
                )
                and (("since" not in params) or p.number >= 5000)
                and (("until" not in params) or p.number < 5000)
            )

        want = sorted(p.command_id for p in plans if keep(p))
        assert want, f"the plan has no command for {params}: the check would prove nothing"
        got = sorted(r["command_id"] for r in csv_rows(gw, auditor, **params))
        assert got == want, params

    since = cut.isoformat().replace("+00:00", "Z")
    expect()
    expect(edge_id="edge_03")
    expect(source="scheduler")
    expect(user="bob")
    for status in ("executed", "failed", "rejected", "delivered", "routed", "cancelled", "queued"):
        expect(status=status)
    expect(command_type="mode_change")
    expect(since=since)
    expect(until=since)
    expect(edge_id="edge_01", status="failed", since=since)
    expect(user="carol", command_type="setpoint", until=since)

    # Cursor pagination walks every row once, newest first.
    pages = all_pages(gw, auditor, status="executed")
    assert (
        len(pages)
        == len({r["command_id"] for r in pages})
        == Counter(p.status for p in plans)["executed"]
    )
    issued = [(r["issued_at"], r["command_id"]) for r in pages]
    assert issued == sorted(issued, reverse=True)

    # JSON export streams the same rows as an array.
    _, ctype, body = fetch_raw(f"{gw.http}/api/commands?edge_id=edge_05&format=json", auditor)
    exported = json.loads(body)
    assert ctype.startswith("application/json")
    assert {r["command_id"] for r in exported} == {
        p.command_id for p in plans if p.edge_id == "edge_05"
    }

    # Access: can_view on one edge sees only that edge; nothing granted sees nothing.
    viewer = user_token("viewer", view=["edge_02"])
    assert {r["edge_id"] for r in csv_rows(gw, viewer)} == {"edge_02"}
    assert csv_rows(gw, viewer, edge_id="edge_05") == []
    assert csv_rows(gw, user_token("nobody")) == []

    # Refusals before admission: auditors see all, an edge's viewers those naming it.
    status, _, body = http("GET", f"{gw.http}/api/rejections?limit=100", auditor)
    assert status == 200 and body["count"] == 20
    assert {r["error_code"] for r in body["rejections"]} == {"forbidden"}
    status, _, body = http("GET", f"{gw.http}/api/rejections", user_token("v0", view=["edge_00"]))
    assert status == 200 and body["count"] == 10

    # The command line reads the same tables.
    proc = processes.dispatch(
        "audit", "audit", "list", "--status", "rejected", "--limit", "5", "--json"
    )
    assert proc.popen.wait(30) == 0
    page = json.loads(next(line for line in proc.log().splitlines() if line.startswith("{")))
    assert page["count"] == 5 and page["next_cursor"]
    assert all(
        r["status"] == "rejected" and r["error_code"] == "out_of_range" for r in page["commands"]
    )
