"""Gateway memory per connected edge with many idle edges (default 10,000), and the
light-load latency with them connected against with 100 (issue 9: <= 50 KiB per edge,
p99 <= 2x)."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
import urllib.request
from dataclasses import dataclass, field

import uvloop
import websockets

from bench import throughput
from bench.harness import Bench, bench, command, percentile, raise_fd_limit, rss_kib

FEW = 100  # idle edges connected for the light-load figure to compare with


def connected_edges(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    match = re.search(r"^dispatch_edges_connected (\S+)$", text, re.M)
    return int(float(match.group(1))) if match else 0


async def hold_edges(
    port: int,
    names: list[str],
    tokens: list[str],
    ready: asyncio.Event,
    release: asyncio.Event,
    concurrency: int,
) -> list[object]:
    gate = asyncio.Semaphore(concurrency)
    sockets: list[object] = []

    async def one(name: str, token: str) -> None:
        async with gate:
            ws = await websockets.connect(
                f"ws://127.0.0.1:{port}/ws/edge/{name}",
                additional_headers={"Authorization": f"Bearer {token}"},
                compression=None,
                open_timeout=60,
                ping_interval=None,
            )
            sockets.append(ws)

    await asyncio.gather(*(one(n, t) for n, t in zip(names, tokens, strict=True)))
    ready.set()
    await release.wait()
    return sockets


@dataclass
class Figures:
    count: int = 0
    rss_before_kib: int = 0
    rss_after_kib: int = 0
    routed_ms: float = 0.0
    light_few: list[float] = field(default_factory=list)  # light load, FEW idle edges
    light_many: list[float] = field(default_factory=list)  # light load, all idle edges


async def light(b: Bench, port: int, seconds: float, run: str) -> list[float]:
    """Send -> executed latencies, one scripted edge and one command in flight."""
    _, latencies = await throughput.measure(b, port, 1, 1, 1, seconds, run)
    return latencies


async def run(edges: int, concurrency: int, light_s: float) -> Figures:
    out = Figures()
    with bench() as b:
        proc, port = b.gateway()
        names = [f"idle{i:05d}" for i in range(edges)]
        b.enroll(names)
        tokens = [b.edge_token(n) for n in names]
        await asyncio.sleep(1.0)
        out.rss_before_kib = rss_kib(proc.pid)
        # Light load with FEW idle edges connected, then with all of them: the same
        # gateway, the same load generator, so the ratio shows what the fleet costs.
        few_ready, few_release = asyncio.Event(), asyncio.Event()
        few = asyncio.create_task(
            hold_edges(port, names[:FEW], tokens[:FEW], few_ready, few_release, concurrency)
        )
        await few_ready.wait()
        out.light_few = await light(b, port, light_s, "few")
        ready, release = asyncio.Event(), asyncio.Event()
        holder = asyncio.create_task(
            hold_edges(port, names[FEW:], tokens[FEW:], ready, release, concurrency)
        )
        await ready.wait()
        deadline = time.monotonic() + 120
        while connected_edges(port) < edges and time.monotonic() < deadline:  # noqa: ASYNC110 (polls another process)
            await asyncio.sleep(0.5)
        out.count = connected_edges(port)  # the light-load run's edge has gone by now
        await asyncio.sleep(3.0)  # let allocations settle
        out.rss_after_kib = rss_kib(proc.pid)
        out.light_many = await light(b, port, light_s, "many")
        # A command still flows to one of them while all are connected.
        token = b.user_token("op", [names[0]])
        async with websockets.connect(
            f"ws://127.0.0.1:{port}/ws/dashboard",
            additional_headers={"Authorization": f"Bearer {token}"},
        ) as dash:
            started = time.perf_counter()
            await dash.send(json.dumps(command("idle-probe", names[0], 1)))
            while True:
                msg = json.loads(await asyncio.wait_for(dash.recv(), 10))
                if msg.get("status") == "routed":
                    break
            out.routed_ms = (time.perf_counter() - started) * 1000
        release.set()
        few_release.set()
        for ws in [*await holder, *await few]:
            await ws.close()  # type: ignore[attr-defined]
        return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench idle_edges")
    parser.add_argument("--idle-edges", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--light-seconds", type=float, default=4.0)
    args, _ = parser.parse_known_args(argv)
    raise_fd_limit()
    f = uvloop.run(run(args.idle_edges, args.concurrency, args.light_seconds))
    per_edge = (f.rss_after_kib - f.rss_before_kib) / max(1, f.count)
    print(
        f"idle_edge_rss: {per_edge:.1f} KiB per connected edge ({per_edge / 50:.2f}x the 50 KiB "
        f"bound; gateway RSS {f.rss_before_kib / 1024:.0f} MiB -> {f.rss_after_kib / 1024:.0f} "
        f"MiB with {f.count} idle edges)"
    )
    few99, many99 = percentile(f.light_few, 99), percentile(f.light_many, 99)
    print(
        f"idle_fleet_light_load_p99: {many99:.2f} ms with {f.count} idle edges vs "
        f"{few99:.2f} ms with {FEW} ({many99 / few99:.2f}x; bound 2x; p50 "
        f"{percentile(f.light_many, 50):.2f} vs {percentile(f.light_few, 50):.2f} ms; send -> "
        "executed, one scripted edge, one command in flight)"
    )
    print(
        f"idle_fleet_routed_latency: {f.routed_ms:.1f} ms (send -> routed with {f.count} edges "
        "connected)"
    )
    return 0 if f.count == args.idle_edges else 1
