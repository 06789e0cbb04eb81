"""What the lifecycle metrics cost: saturated throughput with them on and off.

Runs the saturated-throughput load (bench/throughput.py) against a fresh gateway with
`DISPATCH_METRICS_LIFECYCLE=1` and with `=0`, alternating, several rounds, and prints
the median of each and their ratio. Call it as `python -m bench metrics_overhead
[--rounds N] [--seconds S]`; `make bench` runs it last.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import statistics
import time
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path

import msgspec
import uvloop

from bench.harness import Bench, command, load_parser, raise_fd_limit
from bench.throughput import measure
from gateway.lifecycle_metrics import LifecycleMetrics
from schemas.commands import Command, EdgeCommand
from schemas.events import Authorized, Delivered, Event, Executed, Issued, Routed

COMMAND = msgspec.json.Decoder(Command)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def admitted(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    match = re.search(r'^dispatch_commands_total\{outcome="admitted"\} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def one_run(lifecycle: bool, args: argparse.Namespace) -> tuple[float, float]:
    """Commands/s under load, and the gateway's CPU microseconds per admitted command."""
    # Transition lines off in both: their cost is printed apart (metrics_cpu_per_command).
    switch = {
        "DISPATCH_METRICS_LIFECYCLE": "1" if lifecycle else "0",
        "DISPATCH_LOG_TRANSITIONS": "0",
    }
    b = Bench(extra=switch)
    cores = sorted(os.sched_getaffinity(0))
    # Gateway on one core, load generator on the others: they no longer steal each
    # other's time, which was most of the run-to-run spread on 2 cores.
    gateway_cores, load_cores = ({cores[0]}, set(cores[1:])) if len(cores) > 1 else (cores, cores)
    try:
        with _affinity(gateway_cores):  # inherited by the gateway process
            proc, port = b.gateway()
        idle_cpu_s = cpu_s(proc.pid)
        with _affinity(load_cores):
            rate, _ = uvloop.run(
                measure(b, port, args.edges, args.dashboards, args.window, args.seconds)
            )
        per_command_us = (cpu_s(proc.pid) - idle_cpu_s) / max(admitted(port), 1) * 1e6
    finally:
        b.close()
    return rate, per_command_us


@contextlib.contextmanager
def _affinity(cpus: Iterable[int]) -> Iterator[None]:
    """Run this process (and what it starts) on `cpus` for the block."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(cpus))
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def main(argv: list[str]) -> int:
    parser = load_parser("bench metrics_overhead", seconds=8.0)
    parser.add_argument("--rounds", type=int, default=3)
    args, _ = parser.parse_known_args(argv)
    raise_fd_limit()
    on: list[float] = []
    off: list[float] = []
    cpu_on: list[float] = []
    cpu_off: list[float] = []
    for _ in range(args.rounds):
        rate, cpu = one_run(False, args)
        off.append(rate)
        cpu_off.append(cpu)
        rate, cpu = one_run(True, args)
        on.append(rate)
        cpu_on.append(cpu)
    rate_on, rate_off = statistics.median(on), statistics.median(off)
    detail = f"median of {args.rounds} alternating runs of {args.seconds:.0f} s, 1 gateway"
    print(f"metrics_on_throughput: {rate_on:.0f} commands/s ({detail}; runs {on_list(on)})")
    print(f"metrics_off_throughput: {rate_off:.0f} commands/s ({detail}; runs {on_list(off)})")
    print(f"metrics_overhead_ratio: {rate_on / rate_off:.3f} (on / off; 1.000 = no cost)")
    gw_on, gw_off = statistics.median(cpu_on), statistics.median(cpu_off)
    print(
        f"gateway_cpu_per_command: {gw_on:.0f} us on, {gw_off:.0f} us off "
        f"(ratio {gw_on / gw_off:.3f}; CPU time of the gateway process under load / commands "
        "admitted; steadier than throughput on a shared machine)"
    )
    bare_us, logged_us = cost_per_command_us()
    print(
        f"metrics_cpu_per_command: {bare_us:.1f} us (LifecycleMetrics.observe over 5 events; "
        f"{logged_us:.1f} us with the transition log lines formatted)"
    )
    return 0


def cost_per_command_us(commands: int = 20_000) -> tuple[float, float]:
    """CPU per command of `LifecycleMetrics.observe` (six events), without and with the
    transition log line (formatted, written to a discarding handler)."""
    logger = logging.getLogger("dispatch.transition")
    logger.propagate = False
    logger.addHandler(logging.NullHandler())
    events = list(_lifecycle(commands))
    results = []
    for level in (logging.WARNING, logging.INFO):
        logger.setLevel(level)
        tracker = LifecycleMetrics(10_000)
        started = time.perf_counter()
        for event in events:
            tracker.observe(event)
        results.append((time.perf_counter() - started) / commands * 1e6)
    return results[0], results[1]


def _lifecycle(commands: int) -> Iterator[Event]:
    body = COMMAND.decode(json.dumps(command("c", "edge1", 1)))
    for i in range(commands):
        cid, at = f"cmd{i}", 1_700_000_000_000 + i
        head = {"command_id": cid, "edge_id": "edge1", "actor": "user:u"}
        edge_cmd = EdgeCommand(
            command_id=cid,
            command_type=body.command_type,
            target=body.target,
            value=body.value,
            expiry_sec=300,
            source="bench",
            timestamp=body.timestamp,
            expires_at=body.timestamp,
        )
        yield Issued(at=at, event_id=f"{i}-i", command=edge_cmd, digest="d", **head)
        yield Authorized(at=at, event_id=f"{i}-a", grant="g", **head)
        yield Routed(at=at, event_id=f"{i}-r", gateway="gw", **head)
        yield Delivered(at=at + 2, event_id=f"{i}-d", **head)
        yield Executed(at=at + 5, event_id=f"{i}-e", **head)


def on_list(rates: list[float]) -> str:
    return ", ".join(f"{r:.0f}" for r in rates)
