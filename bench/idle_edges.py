"""Gateway memory per connected edge with many idle edges (default 10,000)."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
import urllib.request

import uvloop
import websockets

from bench.harness import bench, command, raise_fd_limit, rss_kib


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


async def run(edges: int, concurrency: int) -> tuple[int, int, int, float]:
    with bench() as b:
        proc, port = b.gateway()
        names = [f"idle{i:05d}" for i in range(edges)]
        b.enroll(names)
        tokens = [b.edge_token(n) for n in names]
        await asyncio.sleep(1.0)
        before = rss_kib(proc.pid)
        ready, release = asyncio.Event(), asyncio.Event()
        holder = asyncio.create_task(hold_edges(port, names, tokens, ready, release, concurrency))
        await ready.wait()
        deadline = time.monotonic() + 120
        while connected_edges(port) < edges and time.monotonic() < deadline:  # noqa: ASYNC110 (polls another process)
            await asyncio.sleep(0.5)
        count = connected_edges(port)
        await asyncio.sleep(3.0)  # let allocations settle
        after = rss_kib(proc.pid)
        # A command still flows to one of them while all are connected.
        sockets = holder
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
            routed_ms = (time.perf_counter() - started) * 1000
        release.set()
        for ws in await sockets:
            await ws.close()  # type: ignore[attr-defined]
        return count, before, after, routed_ms


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench idle_edges")
    parser.add_argument("--idle-edges", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=200)
    args, _ = parser.parse_known_args(argv)
    raise_fd_limit()
    count, before, after, routed_ms = uvloop.run(run(args.idle_edges, args.concurrency))
    per_edge = (after - before) / max(1, count)
    print(
        f"idle_edge_rss: {per_edge:.1f} KiB per connected edge (gateway RSS {before / 1024:.0f} MiB "
        f"-> {after / 1024:.0f} MiB with {count} idle edges)"
    )
    print(
        f"idle_fleet_routed_latency: {routed_ms:.1f} ms (send -> routed with {count} edges connected)"
    )
    return 0 if count == args.idle_edges else 1
