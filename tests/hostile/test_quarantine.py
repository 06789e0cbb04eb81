"""Garbage in a partition log: quarantined, counted, alarmed, named by verify; the real
projector goes on with the next event.

Entries are XADDed straight into the logs of a real Redis (as a bug, an old version or a
hostile writer would leave them) around commands the ledger wrote itself, and a real
`dispatch projector` runs over them.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import psycopg
import pytest
from psycopg import AsyncConnection, sql
from redis.asyncio import Redis

from config.settings import Settings
from ledger.ids import new_event_id
from ledger.store import Ledger
from projections import loadgen, queries
from schemas.errors import ErrorObject
from schemas.events import Rejected

from .conftest import audit
from support import DATABASE_URL, Processes, free_port, wait_until


def event(**fields: Any) -> bytes:
    base = {
        "status": "executed",
        "at": int(time.time() * 1000),
        "event_id": new_event_id() + "-x",
        "command_id": "cmd_orphan",
        "edge_id": "edge_00",
        "actor": "edge:edge_00",
    }
    return json.dumps({**base, **fields}).encode()


GARBAGE: list[tuple[str, dict[bytes, bytes], str]] = [
    ("not UTF-8", {b"e": b"\xff\xfe{not json"}, "undecodable"),
    ("no e field", {b"x": b"1", b"y": b"2"}, "undecodable"),
    ("unknown tag (a newer version)", {b"e": event(status="teleported")}, "undecodable"),
    ("an older version without required fields", {b"e": b'{"status":"issued"}'}, "undecodable"),
    ("a lone surrogate", {b"e": event(actor="edge:\udc00")}, "undecodable"),
    ("a time PostgreSQL cannot hold", {b"e": event(at=10**17)}, "unstorable"),
]


def quarantined(namespace: str) -> dict[str, tuple[bytes, str, str]]:
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        try:
            rows = conn.execute(
                sql.SQL("SELECT entry_id, raw, kind, reason FROM {}.quarantine").format(
                    sql.Identifier(namespace)
                )
            ).fetchall()
        except psycopg.errors.UndefinedTable:
            return {}
    return {e: (bytes(raw), kind, reason) for e, raw, kind, reason in rows}


def stored_entries(namespace: str) -> set[str]:
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        try:
            rows = conn.execute(
                sql.SQL("SELECT entry_id FROM {}.events").format(sql.Identifier(namespace))
            ).fetchall()
        except psycopg.errors.UndefinedTable:
            return set()
    return {r[0] for r in rows}


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


@pytest.fixture
async def ledger(settings: Settings) -> AsyncIterator[Ledger]:
    """An hour's ack timeout: no verdict may append to the logs while verify reads them."""
    client = Redis.from_url(settings.redis_url)
    led = Ledger(
        client, replace(settings.ledger(), ack_timeout_ms=3_600_000), url=settings.redis_url
    )
    await led.start()
    yield led
    await led.close()
    await client.aclose()


async def test_garbage_entries_are_quarantined_and_the_projector_goes_on(
    ledger: Ledger, settings: Settings, processes: Processes, env: dict[str, str]
) -> None:
    redis: Any = ledger.redis
    stream = ledger.keys.log(ledger.keys.partition("edge_00"))
    await loadgen.generate(ledger, range(8), edge_ids=["edge_00"], offline=0)
    garbage = {str((await redis.xadd(stream, f)).decode()): (f, kind) for _, f, kind in GARBAGE}
    # A refusal whose edge id holds NUL is storable (escaped), not garbage.
    nul_refusal = Rejected(
        event_id=new_event_id(),
        at=int(time.time() * 1000),
        command_id="",
        edge_id="abc\x00def",
        actor="anonymous@127.0.0.1:1",
        error=ErrorObject(code="unauthenticated", message="no token\x00"),
        stage="gateway",
    )
    await ledger.record_rejection(nul_refusal)
    await loadgen.generate(ledger, range(8, 16), edge_ids=["edge_00"], offline=0)

    metrics_port = free_port()
    projector = processes.dispatch(
        "projector", "projector", env={"DISPATCH_PROJECTOR_METRICS_PORT": str(metrics_port)}
    )
    valid: set[str] = set()
    for s in (stream, ledger.keys.audit()):
        valid |= {r[0].decode() for r in await redis.xrange(s)}
    valid -= set(garbage)

    def done() -> bool:
        return set(quarantined(settings.namespace)) == set(garbage) and valid <= stored_entries(
            settings.namespace
        )

    wait_until(done, 60, interval_s=0.2, what="garbage quarantined and the rest stored")
    # Everything after the garbage was projected by the same, still running, process.
    assert projector.alive(), projector.log()[-4000:]
    assert projector.log().count("projector.started") == 1, projector.log()[-4000:]

    held = quarantined(settings.namespace)
    for entry_id, (fields, kind) in garbage.items():
        raw, stored_kind, reason = held[entry_id]
        expected = fields.get(b"e", b"x=1\ny=2")
        assert (raw, stored_kind) == (expected, kind), (entry_id, reason)
        assert reason
        line = f"projector.event.quarantined stream={stream} entry={entry_id} kind={kind}"
        projector.wait_log(line)

    metrics = scrape(metrics_port)
    assert 'dispatch_projector_quarantined_total{kind="undecodable"} 5.0' in metrics, metrics
    assert 'dispatch_projector_quarantined_total{kind="unstorable"} 1.0' in metrics, metrics

    code, out = await asyncio.to_thread(audit, env, "verify", "--commands")
    assert code == 0, out
    assert "audit chain intact" in out and "audit GAPS: 6 log entries quarantined" in out, out
    for entry_id in garbage:
        assert f"quarantined: stream {stream} entry {entry_id} (" in out, out
    code, out = await asyncio.to_thread(audit, env, "verify", "--fail-on-gaps")
    assert code == 1, out

    conn = await AsyncConnection.connect(DATABASE_URL, autocommit=True)
    try:
        page = await queries.list_refusals(conn, settings.namespace, queries.RefusalQuery(), None)
    finally:
        await conn.close()
    [refusal] = [r for r in page.rows if r["event_id"] == nul_refusal.event_id]
    assert refusal["edge_id"] == "abc\\u0000def"
    assert refusal["error_message"] == "no token\\u0000"
