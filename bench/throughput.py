"""Saturated throughput: full command lifecycles per second through one gateway.

Scripted edges (WebSocket clients that accept and execute at once) and dashboards that
keep a window of commands in flight; a command counts when its dashboard receives
`executed`. Prints commands/s and the latency under that load.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import uvloop

from bench import _cpu as cpu
from bench.harness import Bench, bench, command, connect, load_parser, percentile, raise_fd_limit


async def run_edge(
    url: str, token: str, stop: asyncio.Event, seen: dict[str, float] | None = None
) -> None:
    """A scripted edge: accepts and executes every command at once; `seen`: when each
    command arrived."""
    async with connect(url, token) as ws:
        while not stop.is_set():
            try:
                raw = await asyncio.wait_for(ws.recv(), 0.5)
            except TimeoutError:
                continue
            msg = json.loads(raw)
            if "command_id" not in msg or msg.get("type"):
                continue
            cid = msg["command_id"]
            if seen is not None:
                seen[cid] = time.perf_counter()
            await ws.send(json.dumps({"command_id": cid, "status": "accepted"}))
            await ws.send(
                json.dumps(
                    {"command_id": cid, "status": "executed", "executed_at": None, "error": None}
                )
            )


async def run_dashboard(
    url: str,
    token: str,
    edges: list[str],
    window: int,
    stop: asyncio.Event,
    done: list[float],
    latencies: list[float],
    measuring: asyncio.Event,
    prefix: str,
    steps: Steps | None = None,
) -> None:
    sent: dict[str, float] = {}
    counter = 0
    async with connect(url, token) as ws:

        async def send_one() -> None:
            nonlocal counter
            counter += 1
            cid = f"{prefix}-{counter}"
            edge = edges[counter % len(edges)]
            sent[cid] = time.perf_counter()
            await ws.send(json.dumps(command(cid, edge, counter % 1000)))

        for _ in range(window):
            await send_one()
        while not stop.is_set():
            try:
                raw = await asyncio.wait_for(ws.recv(), 0.5)
            except TimeoutError:
                continue
            msg: dict[str, Any] = json.loads(raw)
            status = msg.get("status")
            if steps is not None and measuring.is_set() and status:
                steps.note(msg.get("command_id") or "", status, sent)
            if status in FINAL:
                started = sent.pop(msg.get("command_id") or "", None)
                if started is None:
                    continue
                if measuring.is_set():
                    now = time.perf_counter()
                    done.append(now)
                    latencies.append((now - started) * 1000)
                if not stop.is_set():
                    await send_one()


async def measure(
    b: Bench, port: int, edges: int, dashboards: int, window: int, seconds: float, run: str = ""
) -> tuple[float, list[float]]:
    measured = await observe(b, port, (edges, dashboards, window, seconds), run)
    return measured.rate, measured.latencies


FINAL = ("executed", "failed", "rejected", "timed_out")


@dataclass
class Steps:
    """When each status reached the sender, and the command the edge, after the send."""

    edge_seen: dict[str, float] = field(default_factory=dict)
    at: dict[str, list[float]] = field(default_factory=dict)

    def note(self, command_id: str, status: str, sent: dict[str, float]) -> None:
        started = sent.get(command_id)
        if started is None:
            return
        now = time.perf_counter()
        self.at.setdefault(status, []).append((now - started) * 1000)
        if status in FINAL and (seen := self.edge_seen.pop(command_id, None)):
            self.at.setdefault("at the edge", []).append((seen - started) * 1000)

    def line(self) -> str:
        order = sorted(self.at, key=lambda s: percentile(self.at[s], 50))
        return ", ".join(f"{s} {percentile(self.at[s], 50):.2f}" for s in order)


@dataclass
class Window:
    """What one measured window gave."""

    rate: float  # commands/s
    latencies: list[float]  # send -> final status, ms
    cpu: dict[str, float]  # CPU seconds per role
    steps: Steps


async def observe(
    b: Bench,
    port: int,
    shape: tuple[int, int, int, float],
    run: str = "",
    roles: cpu.Roles | None = None,
) -> Window:
    """Drive `shape` (edges, dashboards, window, seconds) and measure one window."""
    edges, dashboards, window, seconds = shape
    steps = Steps()
    names = [f"edge{i:05d}" for i in range(edges)]
    b.enroll(names)
    stop, measuring = asyncio.Event(), asyncio.Event()
    edge_tasks = [
        asyncio.create_task(
            run_edge(f"ws://127.0.0.1:{port}/ws/edge/{n}", b.edge_token(n), stop, steps.edge_seen)
        )
        for n in names
    ]
    await asyncio.sleep(1.0)
    done: list[float] = []
    latencies: list[float] = []
    groups = [names[i::dashboards] for i in range(dashboards)]
    dash_tasks = [
        asyncio.create_task(
            run_dashboard(
                f"ws://127.0.0.1:{port}/ws/dashboard",
                b.user_token(f"op{i}", group),
                group,
                window,
                stop,
                done,
                latencies,
                measuring,
                f"{run}d{i}",
                steps,
            )
        )
        for i, group in enumerate(groups)
    ]
    await asyncio.sleep(2.0)  # warm up
    before = roles.snapshot() if roles is not None else {}
    measuring.set()
    started = time.perf_counter()
    await asyncio.sleep(seconds)
    measuring.clear()
    elapsed = time.perf_counter() - started
    used = cpu.spent(before, roles.snapshot()) if roles is not None else {}
    stop.set()
    await asyncio.gather(*dash_tasks, *edge_tasks, return_exceptions=True)
    return Window(len(done) / elapsed, latencies, used, steps)


TARGET = 0.40  # issue 9: saturated full lifecycles >= 40 % of the relay


def main(argv: list[str]) -> int:
    parser = load_parser("bench throughput", seconds=10.0)
    parser.add_argument("--light-commands", type=int, default=300)
    args, _ = parser.parse_known_args(argv)
    raise_fd_limit()
    shape = (args.edges, args.dashboards, args.window, args.seconds)
    results: dict[str, Result] = {}
    me = os.getpid()
    with bench() as b:
        servers = {"Redis": [pid]} if (pid := cpu.redis_pid(b.redis_url)) else {}
        # The bare relay first, then the gateway with 1 and 2 workers: same load
        # generator, same machine, same run; each figure is also a ratio to the relay.
        relay, port = b.relay()
        roles = cpu.Roles({"relay": [relay.pid]}, {"load generator": me}, {})
        results["relay"] = _run(b, port, shape, args.light_commands, "r", roles)
        b.stop(relay)
        projector = b.dispatch("projector", "projector")
        for workers in (1, 2):
            gw, port = b.gateway(workers)
            roles = cpu.Roles(
                {"gateway": [gw.pid], **servers, "projector": [projector.pid]},
                {"load generator": me},
                {"PostgreSQL": cpu.POSTGRES},
            )
            results[f"gateway_{workers}w"] = _run(
                b, port, shape, args.light_commands, f"g{workers}", roles
            )
            b.stop(gw)
    relay_result = results["relay"]
    rate0, light0 = relay_result.saturated.rate, relay_result.light.latencies
    p50_0, p99_0 = percentile(light0, 50), percentile(light0, 99)
    print(
        f"relay_baseline: {rate0:.0f} commands/s saturated; light load p50 {p50_0:.2f} ms, "
        f"p99 {p99_0:.2f} ms (bare in-memory relay, same stack; {args.edges} scripted edges, "
        f"{args.dashboards} dashboards x {args.window} in flight, {args.seconds:.0f} s)"
    )
    print(f"light_load_steps_relay: p50 ms after the send: {relay_result.light.steps.line()}")
    print(f"saturated_cpu_relay: per command {relay_result.cpu_line()}")
    cores = os.cpu_count() or 1
    budget_us = cores / (TARGET * rate0) * 1e6
    for name, result in results.items():
        if name == "relay":
            continue
        rate, loaded, light = (
            result.saturated.rate,
            result.saturated.latencies,
            result.light.latencies,
        )
        p50, p99 = percentile(light, 50), percentile(light, 99)
        print(
            f"saturated_throughput_{name}: {rate:.0f} commands/s ({rate / rate0:.0%} of the relay; "
            f"full lifecycles issued..executed, 1 projector; loaded p50 "
            f"{percentile(loaded, 50):.1f} ms, p99 {percentile(loaded, 99):.1f} ms)"
        )
        others = sum(v for role, v in result.saturated.cpu.items() if role != "gateway")
        print(
            f"saturated_cpu_{name}: per command {result.cpu_line()} ({TARGET:.0%} of the relay"
            f" is {TARGET * rate0:.0f}/s: {budget_us:.0f} µs per command on {cores} cores for"
            f" everything; all but the gateway take {others / max(result.commands, 1) * 1e6:.0f}"
            " µs)"
        )
        print(
            f"light_load_scripted_edge_{name}: p50 {p50:.2f} ms ({p50 / p50_0:.1f}x the relay), "
            f"p99 {p99:.2f} ms ({p99 / p99_0:.1f}x) (send -> executed, one command in flight)"
        )
        print(f"light_load_steps_{name}: p50 ms after the send: {result.light.steps.line()}")
    return 0


@dataclass(frozen=True)
class Result:
    saturated: Window
    light: Window
    seconds: float  # of the saturated window

    @property
    def commands(self) -> int:
        return round(self.saturated.rate * self.seconds)

    def cpu_line(self) -> str:
        return cpu.per_command(self.saturated.cpu, max(self.commands, 1), self.seconds)


def _run(
    b: Bench,
    port: int,
    shape: tuple[int, int, int, float],
    light_commands: int,
    run: str,
    roles: cpu.Roles,
) -> Result:
    """The saturated rate, its latencies and CPU, and the light-load latencies on `port`.

    Light load first, once the projector has caught up with any earlier run: a light
    figure taken while it stores the saturated run's events measured that instead.
    """
    b.wait_projected()
    light_seconds = max(2.0, light_commands / 500)
    light = uvloop.run(observe(b, port, (1, 1, 1, light_seconds), run + "l"))
    saturated = uvloop.run(observe(b, port, shape, run, roles))
    return Result(saturated, light, shape[3])
