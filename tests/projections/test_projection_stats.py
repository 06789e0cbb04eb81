"""`dispatch audit stats` / `GET /api/stats`: the same buckets on native partitions
(`date_bin`) and on TimescaleDB (`time_bucket`)."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from projection_support import drop_schemas, pg, roles, running, wait_caught_up
from psycopg import AsyncConnection, sql

from dispatch.settings import Settings
from ledger.store import Ledger
from projections import loadgen, rebuild, schema, stats
from projections.worker import Database

from support import Processes, http, user_token

# Spread the commands over 30 hours (three UTC days) from a fixed time, the same way on both
# servers (a time of its own: the run's clock could straddle an hour).
SPREAD = (
    "UPDATE {s}.commands c SET issued_at = '2026-01-10T00:30:00Z'::timestamptz"
    " - n.k * interval '1 hour'"
    " FROM (SELECT command_id, (row_number() OVER (ORDER BY command_id)) % 30 AS k"
    " FROM {s}.commands) n WHERE n.command_id = c.command_id"
)


async def summary(conn: AsyncConnection, ns: str, **params: str) -> list[dict[str, Any]]:
    return await stats.stats(conn, ns, stats.StatsQuery.from_params(params), None)


async def test_stats_are_the_same_on_native_partitions_and_timescaledb(
    ledger: Ledger, settings: Settings, timescale_server: str, processes: Processes
) -> None:
    ns = settings.namespace
    plans = await loadgen.generate(ledger, range(90))
    async with running(ledger, settings):  # native partitions, the machine's PostgreSQL
        await wait_caught_up(settings, ledger.redis, ledger.keys)
    # The same log projected into TimescaleDB, then put in place as the namespace's schema.
    report = await rebuild.rebuild(ledger, Database(timescale_server, roles(settings)))
    native = await pg(settings)
    hyper = await AsyncConnection.connect(timescale_server, autocommit=True)
    try:
        await rebuild.swap(hyper, ns, report.schema)
        assert await schema.storage_of(native, ns) == schema.PARTITIONED
        assert await schema.storage_of(hyper, ns) == schema.TIMESCALEDB
        for conn in (native, hyper):
            await conn.execute(sql.SQL(SPREAD).format(s=sql.Identifier(ns)))
        cases: list[dict[str, str]] = [
            {"bucket": "hour"},
            {"bucket": "day"},
            {"bucket": "hour", "edge_id": plans[0].edge_id},
            {"bucket": "day", "since": "2000-01-01T00:00:00Z", "until": "2100-01-01T00:00:00Z"},
            {"bucket": "hour", "since": "2026-01-09T12:00:00Z", "until": "2026-01-10T00:00:00Z"},
        ]
        for params in cases:
            a, b = await summary(native, ns, **params), await summary(hyper, ns, **params)
            assert a == b, params
        window = await summary(
            native, ns, bucket="hour", since="2026-01-09T12:00:00Z", until="2026-01-10T00:00:00Z"
        )
        assert [b["bucket"][11:13] for b in window] == [f"{h:02d}" for h in range(12, 24)]
        hourly = await summary(native, ns, bucket="hour")
        daily = await summary(native, ns, bucket="day")
        assert len(hourly) == 30 and [b["bucket"] for b in daily] == [
            "2026-01-08T00:00:00.000Z",
            "2026-01-09T00:00:00.000Z",
            "2026-01-10T00:00:00.000Z",
        ]
        assert all(b["bucket"].endswith(":00:00.000Z") for b in hourly)
        assert all(b["bucket"].endswith("T00:00:00.000Z") for b in daily)
        wanted = Counter(p.status for p in plans)
        for buckets in (hourly, daily):
            got: Counter[str] = Counter()
            for b in buckets:
                got.update(b["statuses"])
                assert b["total"] == sum(b["statuses"].values())
            assert got == wanted
        finals = sum(n for s, n in wanted.items() if s not in ("queued", "routed", "delivered"))
        assert sum(b["final"] for b in daily) == finals
    finally:
        await native.close()
        await hyper.close()

    # The CLI on TimescaleDB and the API on native partitions answer the same.
    cli = processes.dispatch(
        "stats", "audit", "stats", "--bucket", "day", "--json",
        env={"DISPATCH_DATABASE_URL": timescale_server},
    )  # fmt: skip
    try:
        assert cli.popen.wait(60) == 0, cli.log()
        assert json.loads(cli.log()) == {"bucket": "day", "buckets": daily}
        gw = processes.gateway()
        grant = processes.dispatch("grant", "grant", "auditor", "*", "can_view")
        assert grant.popen.wait(20) == 0, grant.log()
        status, _, body = http("GET", f"{gw.http}/api/stats?bucket=day", user_token("auditor"))
        assert status == 200 and body == {"bucket": "day", "buckets": daily}
        # A viewer of one edge sees only that edge's commands.
        one = plans[0].edge_id
        status, _, body = http("GET", f"{gw.http}/api/stats", user_token("v", view=[one]))
        assert status == 200
        assert sum(b["total"] for b in body["buckets"]) == sum(p.edge_id == one for p in plans)
        status, _, body = http("GET", f"{gw.http}/api/stats?bucket=week", user_token("auditor"))
        assert status == 400 and "`bucket` must be one of" in body["error"]["message"]
    finally:
        drop_schemas(timescale_server, ns)
