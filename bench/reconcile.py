"""Reconciliation cost: a full check of a projected backlog, and an incremental one.

Commands are driven through the real ledger and projected by one `Projector` (as in
`bench projector`); then the ledger's logs are compared with the audit tables: a full
check (what the projector does at start and after a Redis restart or failover, and what
`dispatch audit reconcile` does) reads every retained link, and an incremental check
(every DISPATCH_RECONCILE_INTERVAL_S) reads only what was stored since (here: nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import time

import psycopg

from bench.harness import Bench, bench
from bench.projector import _drop, backlog
from config.settings import Settings
from projections import reconcile
from projections.worker import Projector, ProjectorConfig


async def measure(b: Bench, commands: int) -> tuple[int, int, float, float]:
    async with backlog(b, commands) as (ledger, total):
        projector = Projector(ledger, b.database_url, ProjectorConfig())
        await projector.migrate()
        task = asyncio.create_task(projector.run())
        while projector.projected < total:
            if task.done():
                task.result()
            await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        checker = reconcile.Reconciler(
            ledger.redis, ledger.keys, b.namespace, retain_log_s=Settings().retain_log_s
        )
        conn = await psycopg.AsyncConnection.connect(b.database_url, autocommit=True)
        try:
            started = time.perf_counter()
            full = await checker.check(conn, full=True)
            full_s = time.perf_counter() - started
            started = time.perf_counter()
            await checker.check(conn)
            incremental_s = time.perf_counter() - started
        finally:
            await conn.close()
    if full.missing or full.skipped:
        raise AssertionError("a projected backlog reconciled with differences")
    return total, sum(s.checked for s in full.streams), full_s, incremental_s


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench reconcile")
    parser.add_argument("--commands", type=int, default=20_000)
    args, _ = parser.parse_known_args(argv)
    with bench() as b:
        try:
            total, links, full_s, incremental_s = asyncio.run(measure(b, args.commands))
        finally:
            _drop(b)
    print(
        f"reconcile_full: {links / full_s:.0f} links/s ({links} links of {total} events, "
        f"{args.commands} commands, {full_s:.2f} s)"
    )
    print(f"reconcile_incremental: {incremental_s * 1000:.0f} ms (nothing stored since)")
    return 0
