"""Rate limits per user, per edge and global: the Lua limiter and a real gateway under load."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest
import redis

from gateway.ratelimit import Rate, RateLimiter, RateLimits
from ledger.keys import Keys
from ledger.store import Ledger

from .conftest import (
    EDGE,
    NO_LIMITS,
    PARTITIONS,
    EdgeWatcher,
    enroll,
    recv_json,
    start_gateway,
    ws_connect,
)
from support import REDIS_URL, Processes, command, edge_token, http, user_token, wait_until

BIG = Rate(100_000, 100_000)


async def test_limiter_charges_every_scope_or_none(ledger: Ledger) -> None:
    limiter = RateLimiter(
        ledger.batcher, ledger.keys, RateLimits(user=Rate(1, 2), edge=Rate(1, 1), global_=BIG)
    )
    assert (await limiter.check("ann", "edge_a")).allowed
    refused = await limiter.check("ann", "edge_a")
    assert not refused.allowed and refused.scope == "edge"
    assert refused.limit == "edge:1/s burst 1" and 0.5 < refused.retry_after_s <= 1.0
    # The refusal charged nothing: ann still has one of her two burst slots.
    assert (await limiter.check("ann", None)).allowed
    refused = await limiter.check("ann", "edge_b")
    assert not refused.allowed and refused.scope == "user" and refused.limit == "user:1/s burst 2"
    assert (await limiter.check("bob", "edge_b")).allowed  # other users and edges unaffected
    keys = [k.decode() for k in await ledger.redis.keys(f"{ledger.keys.namespace}:{{rl}}:*")]
    assert sorted(keys) == sorted(
        ledger.keys.ratelimit(scope, who)
        for scope, who in [
            ("user", "ann"),
            ("user", "bob"),
            ("edge", "edge_a"),
            ("edge", "edge_b"),
            ("global", "all"),
        ]
    )
    assert all("{rl}" in k for k in keys)  # one hash slot: one atomic script on a cluster too


async def test_limiter_refills_at_the_configured_rate(ledger: Ledger) -> None:
    limiter = RateLimiter(ledger.batcher, ledger.keys, RateLimits(Rate(20, 1), BIG, BIG))
    assert (await limiter.check("cy", None)).allowed
    refused = await limiter.check("cy", None)
    assert not refused.allowed and refused.retry_after_s <= 0.05
    await asyncio.sleep(refused.retry_after_s + 0.01)
    assert (await limiter.check("cy", None)).allowed


def test_flood_of_frames_is_rate_limited_and_only_the_budget_reaches_the_edge(
    processes: Processes,
) -> None:
    enroll(processes, EDGE)
    limits = {**NO_LIMITS, "DISPATCH_RATE_USER_PER_S": "2", "DISPATCH_RATE_USER_BURST": "3"}
    gw = start_gateway(processes, limits)
    watcher = EdgeWatcher(f"{gw.ws}/ws/edge/{EDGE}", edge_token(EDGE))
    keys = Keys(processes.env["DISPATCH_NAMESPACE"], PARTITIONS)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        with ws_connect(f"{gw.ws}/ws/dashboard", user_token("flooder", control=[EDGE])) as dash:
            sent = [command(edge_id=EDGE) for _ in range(40)]
            for body in sent:
                dash.send(json.dumps(body))
            dash.send("{garbage")  # garbage counts against the same budget
            refusals: list[dict[str, Any]] = []
            while len(refusals) < 38:
                msg = recv_json(dash)
                if msg["status"] == "rejected":
                    refusals.append(msg)
        assert {r["error"]["code"] for r in refusals} == {"rate_limited"}
        err = refusals[0]["error"]
        assert err["limit"] == "user:2/s burst 3" and 0 < err["retry_after_s"] <= 1.5
        assert "user rate limit" in err["message"]
        admitted = {b["command_id"] for b in sent} - {r["command_id"] for r in refusals}
        assert len(admitted) == 3
        wait_until(lambda: len(watcher.frames) >= 3, 10, what="the admitted commands at the edge")
        time.sleep(0.3)
        assert set(watcher.ids()) == admitted
        assert client.xlen(keys.edge_stream(EDGE)) == 3
        audit = [json.loads(f[b"e"]) for _, f in client.xrange(keys.audit())]
        limited = [a for a in audit if a["error"]["code"] == "rate_limited"]
        assert len(limited) == 38 and {a["actor"] for a in limited} == {"user:flooder"}
    finally:
        watcher.close()
        client.close()


def test_http_429_with_retry_after_and_edge_budget_kept_for_the_allowed(
    processes: Processes,
) -> None:
    enroll(processes, EDGE)
    limits = {
        **NO_LIMITS,
        "DISPATCH_RATE_USER_PER_S": "1",
        "DISPATCH_RATE_USER_BURST": "2",
        "DISPATCH_RATE_EDGE_PER_S": "1",
        "DISPATCH_RATE_EDGE_BURST": "2",
    }
    gw = start_gateway(processes, limits)
    url = f"{gw.http}/api/commands"
    # Someone without permission hammers the edge: it must not spend the edge's budget.
    for _ in range(6):
        http("POST", url, user_token("mallory", control=["elsewhere"]), command(edge_id=EDGE))
    token = user_token("scheduler", control=[EDGE])
    codes = [http("POST", url, token, command(edge_id=EDGE))[0] for _ in range(2)]
    assert codes == [202, 202]
    status, headers, reply = http("POST", url, token, command(edge_id=EDGE))
    assert status == 429 and reply["error"]["code"] == "rate_limited"
    assert reply["error"]["limit"] in ("user:1/s burst 2", "edge:1/s burst 2")
    retry_after = int({k.lower(): v for k, v in headers.items()}["retry-after"])
    assert 1 <= retry_after <= 2 and reply["error"]["retry_after_s"] <= retry_after


SCENARIOS = {
    # scope: (limits, users, edges) for 20 concurrent clients
    "user": ({"DISPATCH_RATE_USER_PER_S": "50", "DISPATCH_RATE_USER_BURST": "20"}, 1, 20),
    "edge": ({"DISPATCH_RATE_EDGE_PER_S": "50", "DISPATCH_RATE_EDGE_BURST": "20"}, 20, 1),
    "global": ({"DISPATCH_RATE_GLOBAL_PER_S": "50", "DISPATCH_RATE_GLOBAL_BURST": "20"}, 20, 20),
}
CLIENTS, BURST_S, RATE, BURST = 20, 10.0, 50.0, 20


@pytest.mark.slow
@pytest.mark.parametrize("scope", list(SCENARIOS))
def test_limit_holds_within_5_percent_over_10_s_from_20_clients(
    processes: Processes, scope: str
) -> None:
    limits, users, edges = SCENARIOS[scope]
    keys = Keys(processes.env["DISPATCH_NAMESPACE"], PARTITIONS)
    edge_ids = [f"burst_edge_{i}" for i in range(edges)]
    client = redis.Redis.from_url(REDIS_URL)
    client.sadd(keys.edges(), *edge_ids)
    gw = start_gateway(processes, {**NO_LIMITS, **limits})
    tokens = [user_token(f"svc_{i % users}", control=edge_ids) for i in range(CLIENTS)]
    statuses = asyncio.run(_burst(f"{gw.http}/api/commands", tokens, edge_ids))
    admitted = statuses.count(202)
    assert statuses.count(429) > admitted  # the clients offered far more than the limit
    assert set(statuses) <= {202, 429}
    # Server-side timing: every admitted command's `issued` event, stamped by Redis.
    stamps = sorted(
        event["at"]
        for p in {keys.partition(e) for e in edge_ids}
        for _, f in client.xrange(keys.log(p))
        if (event := json.loads(f[b"e"]))["status"] == "issued"
    )
    client.close()
    assert len(stamps) == admitted
    span_s = (stamps[-1] - stamps[0]) / 1000
    observed = (admitted - BURST) / span_s
    print(f"{scope}: admitted={admitted} over {span_s:.2f} s -> {observed:.2f}/s (limit {RATE}/s)")
    assert span_s > BURST_S * 0.9  # admissions spread over the whole burst
    assert abs(observed - RATE) / RATE <= 0.05
    assert admitted <= BURST + RATE * span_s + 1


async def _burst(url: str, tokens: list[str], edge_ids: list[str]) -> list[int]:
    statuses: list[int] = []
    clients = [
        httpx.AsyncClient(headers={"Authorization": f"Bearer {t}"}, timeout=10) for t in tokens
    ]
    deadline = time.monotonic() + BURST_S  # once every client is ready

    async def one_client(i: int, http_client: httpx.AsyncClient) -> None:
        n = 0
        while time.monotonic() < deadline:
            body = command(edge_id=edge_ids[(i + n) % len(edge_ids)], channel=f"ch{i}_{n}")
            n += 1
            statuses.append((await http_client.post(url, json=body)).status_code)

    try:
        await asyncio.gather(*(one_client(i, c) for i, c in enumerate(clients)))
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    return statuses
