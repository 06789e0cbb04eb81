"""Projector throughput: lifecycle events per second from the Redis logs into PostgreSQL.

Commands are driven through the real ledger first (every event comes from its Lua
scripts: issued, authorized, routed/queued, delivered, executed/failed/rejected,
cancelled). Then, for each process count asked for (`--processes 1,2`), that many
projector processes (each a real `Projector`: leases, consumer group, verdict loop)
project the whole backlog into fresh tables; the partitions are shared by the leases,
exactly as `dispatch projector` processes share them. The figure is events stored per
second from the common start until the last process has caught up, with each process'
own events, rate, CPU time per event, and its PostgreSQL backend's CPU time per event
(read from /proc when the server is local). A rebuild of the same log is timed too.

Noise: on a shared machine the rates follow the load; the CPU time per event does
much less, and says what the machine could do: with C µs of CPU per event (projector
plus PostgreSQL), K free cores store about K / C events per µs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from multiprocessing.synchronize import Event as EventType
from typing import Any

import psycopg

from bench.harness import Bench, bench
from config.settings import Settings
from ledger.connection import AnyRedis, close, connect
from ledger.keys import PROJECTOR_GROUP
from ledger.store import Ledger
from projections import loadgen, rebuild
from projections.schema import Roles
from projections.worker import Database, Projector, ProjectorConfig

ACK_TIMEOUT_MS = 3_600_000  # commands left routed must not time out during the run
# As many edges as the throughput bench's fleet: 8 would fill at most 8 of the 16
# partitions, and the processes' shares of the work would depend on which they took.
FLEET = tuple(loadgen.edges(100))


@dataclass(frozen=True)
class Run:
    """One process' share of a measured run."""

    owner: str
    events: int
    seconds: float  # from the common start to its last stored event
    cpu_s: float  # the process' CPU time over the run
    pg_cpu_s: float | None  # its PostgreSQL backend's CPU time (None: not readable)
    partitions: int
    storage: str


def _settings(b: Bench) -> Settings:
    return Settings(redis_url=b.redis_url, database_url=b.database_url, namespace=b.namespace)


def _ledger(b: Bench, redis: AnyRedis) -> Ledger:
    config = replace(_settings(b).ledger(), ack_timeout_ms=ACK_TIMEOUT_MS)
    return Ledger(redis, config, url=b.redis_url)


def _streams(ledger: Ledger) -> list[str]:
    keys = ledger.keys
    return [*(keys.log(p) for p in keys.all_partitions()), keys.audit()]


async def _events(ledger: Ledger) -> int:
    return sum([int(await ledger.redis.xlen(s)) for s in _streams(ledger)[:-1]])


def _backend_cpu_s(database_url: str, application: str) -> float | None:
    """CPU seconds of the PostgreSQL backends serving `application` (local server only)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        pids = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (application,)
        ).fetchall()
    total = 0.0
    try:
        for (pid,) in pids:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return None
    return total if pids else None


def _child(
    b: Bench, owner: str, config: ProjectorConfig, start: EventType, stop: EventType, out: Any
) -> None:
    asyncio.run(_project(b, owner, config, start, stop, out))


async def _project(
    b: Bench, owner: str, config: ProjectorConfig, start: EventType, stop: EventType, out: Any
) -> None:
    redis = connect(b.redis_url)  # the client `dispatch projector` uses
    ledger = _ledger(b, redis)
    await ledger.start()
    projector = Projector(ledger, b.database_url, config, owner=owner)
    await projector.migrate()
    out.put(("ready", owner))
    await asyncio.to_thread(start.wait)
    cpu0, began = time.process_time(), time.perf_counter()
    task = asyncio.create_task(projector.run())
    seen, last = 0, began
    try:
        while not stop.is_set():
            if task.done():
                task.result()
            if projector.projected != seen:
                seen, last = projector.projected, time.perf_counter()
                out.put(("progress", owner, seen))
            await asyncio.sleep(0.005)
        cpu = time.process_time() - cpu0
        application = f"dispatch-projector:{b.namespace}:{owner}"
        pg_cpu = await asyncio.to_thread(_backend_cpu_s, b.database_url, application)
        run = Run(
            owner, seen, last - began, cpu, pg_cpu, len(projector.leases.held), projector.storage
        )
        out.put(("done", run))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await ledger.close()
        await close(redis)


async def _reset(b: Bench, ledger: Ledger, owners: list[str]) -> None:
    """Fresh tables and consumer groups; `owners` announced so each takes its share."""
    await asyncio.to_thread(_drop, b)
    for stream in _streams(ledger):
        with contextlib.suppress(Exception):
            await ledger.redis.xgroup_destroy(stream, PROJECTOR_GROUP)
    await ledger.redis.delete(
        *(ledger.keys.projector_lease(p) for p in ledger.keys.all_partitions())
    )
    await ledger.redis.delete(ledger.keys.projectors())
    now_ms = int(time.time() * 1000)
    await ledger.redis.zadd(ledger.keys.projectors(), dict.fromkeys(owners, now_ms))


def measure_processes(
    b: Bench, processes: int, config: ProjectorConfig, total: int
) -> tuple[float, list[Run]]:
    """Project the backlog with `processes` projector processes: (seconds, per process)."""
    owners = [f"bench-{processes}-{i}" for i in range(processes)]

    async def reset() -> None:
        redis = connect(b.redis_url)  # the client `dispatch projector` uses
        try:
            await _reset(b, _ledger(b, redis), owners)
        finally:
            await close(redis)

    asyncio.run(reset())
    ctx = multiprocessing.get_context("spawn")
    start, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_child, args=(b, o, config, start, stop, out)) for o in owners]
    for proc in procs:
        proc.start()
    try:
        ready = 0
        while ready < processes:
            if out.get(timeout=120)[0] == "ready":
                ready += 1
        began = time.perf_counter()
        start.set()
        counts: dict[str, int] = {}
        while sum(counts.values()) < total:
            message = out.get(timeout=300)
            if message[0] == "progress":
                counts[message[1]] = message[2]
        seconds = time.perf_counter() - began
        stop.set()
        runs: list[Run] = []
        while len(runs) < processes:
            message = out.get(timeout=60)
            if message[0] == "done":
                runs.append(message[1])
        return seconds, sorted(runs, key=lambda r: r.owner)
    finally:
        stop.set()
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()


@contextlib.asynccontextmanager
async def backlog(b: Bench, commands: int) -> AsyncIterator[tuple[Ledger, int]]:
    """A ledger with `commands` driven through it: (the ledger, events in its logs)."""
    redis = connect(b.redis_url)  # the client `dispatch projector` uses
    ledger = _ledger(b, redis)
    await ledger.start()
    try:
        await loadgen.generate(ledger, range(commands), edge_ids=FLEET, offline=1)
        yield ledger, await _events(ledger)
    finally:
        await ledger.close()
        await close(redis)


async def _generate(b: Bench, commands: int) -> int:
    async with backlog(b, commands) as (_, total):
        return total


async def _rebuild(b: Bench, batch: int) -> float:
    redis = connect(b.redis_url)  # the client `dispatch projector` uses
    ledger = _ledger(b, redis)
    await ledger.start()
    try:
        database = Database(b.database_url, Roles.for_prefix(b.namespace))
        report = await rebuild.rebuild(ledger, database, batch=batch)
        return report.seconds
    finally:
        await ledger.close()
        await close(redis)


def _drop(b: Bench) -> None:
    roles = Roles.for_prefix(b.namespace)
    with psycopg.connect(b.database_url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{rebuild.rebuild_schema(b.namespace)}" CASCADE')
        conn.execute(f'DROP SCHEMA IF EXISTS "{b.namespace}" CASCADE')
        for role in roles.all():
            if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
                conn.execute(f'DROP OWNED BY "{role}" CASCADE')
                conn.execute(f'DROP ROLE "{role}"')


def _per_event_us(seconds: float | None, events: int) -> str:
    return "n/a" if seconds is None or not events else f"{1e6 * seconds / events:.1f}"


def report(
    processes: int,
    config: ProjectorConfig,
    total: int,
    commands: int,
    seconds: float,
    runs: list[Run],
) -> None:
    cpu = sum(r.cpu_s for r in runs)
    pg = [r.pg_cpu_s for r in runs]
    pg_total = None if any(p is None for p in pg) else sum(p or 0.0 for p in pg)
    print(
        f"projector_throughput: {total / seconds:.0f} events/s ({processes} projector "
        f"process{'es' if processes > 1 else ''} of {config.lanes} lane"
        f"{'s' if config.lanes > 1 else ''}, {total} events of {commands} commands, "
        f"batch {config.batch}, storage {runs[0].storage}, {seconds:.1f} s; CPU per event: "
        f"projectors {_per_event_us(cpu, total)} µs + PostgreSQL "
        f"{_per_event_us(pg_total, total)} µs; load average {os.getloadavg()[0]:.1f})"
    )
    for r in runs:
        rate = r.events / r.seconds if r.seconds > 0 else 0.0
        print(
            f"projector_throughput_per_process: {rate:.0f} events/s ({r.owner}: {r.events} "
            f"events of {r.partitions} partitions in {r.seconds:.1f} s; CPU per event "
            f"{_per_event_us(r.cpu_s, r.events)} µs + PostgreSQL "
            f"{_per_event_us(r.pg_cpu_s, r.events)} µs)"
        )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench projector")
    parser.add_argument("--commands", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument(
        "--processes", default="1,2", help="projector process counts to measure, e.g. 1,2"
    )
    parser.add_argument(
        "--lanes",
        type=int,
        default=ProjectorConfig().lanes,
        help="writers (PostgreSQL connections) per process, as `dispatch projector --lanes`",
    )
    args, _ = parser.parse_known_args(argv)
    counts = [int(n) for n in str(args.processes).split(",") if n.strip()]
    with bench() as b:
        try:
            total = asyncio.run(_generate(b, args.commands))
            config = ProjectorConfig(batch=args.batch, lanes=args.lanes)
            for processes in counts:
                seconds, runs = measure_processes(b, processes, config, total)
                report(processes, config, total, args.commands, seconds, runs)
            rebuilt = asyncio.run(_rebuild(b, args.batch))
        finally:
            _drop(b)
    print(
        f"projector_rebuild_throughput: {total / rebuilt:.0f} events/s ({total} events into "
        f"fresh tables, {rebuilt:.1f} s)"
    )
    return 0
