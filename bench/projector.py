"""Projector throughput: lifecycle events per second from the Redis logs into PostgreSQL.

Commands are driven through the real ledger first (every event comes from its Lua
scripts: issued, authorized, routed/queued, delivered, executed/failed/rejected,
cancelled), then one projector process worth of work (one `Projector`, all partitions)
projects the backlog; the figure is events stored per second until it has caught up.
A rebuild of the same log into fresh tables is timed too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import psycopg
from redis.asyncio import Redis

from bench.harness import Bench, bench
from config.settings import Settings
from ledger.store import Ledger
from projections import loadgen, rebuild
from projections.schema import Roles
from projections.worker import Database, Projector, ProjectorConfig


async def _events(ledger: Ledger) -> int:
    total = 0
    for stream in [ledger.keys.log(p) for p in ledger.keys.all_partitions()]:
        total += int(await ledger.redis.xlen(stream))
    return total


@contextlib.asynccontextmanager
async def backlog(b: Bench, commands: int) -> AsyncIterator[tuple[Ledger, int]]:
    """A ledger with `commands` driven through it: (the ledger, events in its logs)."""
    settings = Settings(redis_url=b.redis_url, database_url=b.database_url, namespace=b.namespace)
    redis = Redis.from_url(b.redis_url)
    # An hour's ack timeout: commands left routed must not time out during the run.
    ledger = Ledger(redis, replace(settings.ledger(), ack_timeout_ms=3_600_000), url=b.redis_url)
    await ledger.start()
    try:
        await loadgen.generate(ledger, range(commands), offline=1)
        yield ledger, await _events(ledger)
    finally:
        await ledger.close()
        await redis.aclose()


async def measure(b: Bench, commands: int, batch: int) -> tuple[int, float, float]:
    async with backlog(b, commands) as (ledger, total):
        projector = Projector(ledger, b.database_url, ProjectorConfig(batch=batch))
        await projector.migrate()
        started = time.perf_counter()
        task = asyncio.create_task(projector.run())
        while projector.projected < total:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        incremental = time.perf_counter() - started
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        database = Database(b.database_url, Roles.for_prefix(b.namespace))
        report = await rebuild.rebuild(ledger, database, batch=batch)
        return total, incremental, report.seconds


def _drop(b: Bench) -> None:
    roles = Roles.for_prefix(b.namespace)
    with psycopg.connect(b.database_url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{rebuild.rebuild_schema(b.namespace)}" CASCADE')
        conn.execute(f'DROP SCHEMA IF EXISTS "{b.namespace}" CASCADE')
        for role in roles.all():
            if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
                conn.execute(f'DROP OWNED BY "{role}" CASCADE')
                conn.execute(f'DROP ROLE "{role}"')


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench projector")
    parser.add_argument("--commands", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=2000)
    args, _ = parser.parse_known_args(argv)
    with bench() as b:
        try:
            total, incremental, rebuilt = asyncio.run(measure(b, args.commands, args.batch))
        finally:
            _drop(b)
    print(
        f"projector_throughput: {total / incremental:.0f} events/s ({total} events of "
        f"{args.commands} commands, batch {args.batch}, 1 projector, {incremental:.1f} s)"
    )
    print(
        f"projector_rebuild_throughput: {total / rebuilt:.0f} events/s ({total} events into "
        f"fresh tables, {rebuilt:.1f} s)"
    )
    return 0
