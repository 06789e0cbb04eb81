"""Light-load latency: dashboard send -> dashboard receives `executed`, one in flight.

Real processes end to end: gateway, projector, simulated BMS (Modbus TCP) and the edge
agent; commands are `priority: emergency`, so the Core Cycle applies them at once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import time

import uvloop
import websockets

from bench import throughput
from bench.harness import Bench, bench, command, free_port, p50_p99

EDGE = "site1_edge_prod"


def wait_port(port: int, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


async def measure(b: Bench, port: int, count: int) -> list[float]:
    token = b.user_token("bench", [EDGE])
    latencies: list[float] = []
    async with websockets.connect(
        f"ws://127.0.0.1:{port}/ws/dashboard",
        additional_headers={"Authorization": f"Bearer {token}"},
        compression=None,
    ) as ws:
        for i in range(count + 10):
            cid = f"lat-{i}"
            started = time.perf_counter()
            await ws.send(json.dumps(command(cid, EDGE, (i % 200) * 100, priority="emergency")))
            while True:
                msg = json.loads(await asyncio.wait_for(ws.recv(), 15))
                if msg.get("command_id") == cid and msg["status"] in (
                    "executed",
                    "failed",
                    "rejected",
                ):
                    if msg["status"] != "executed":
                        raise RuntimeError(f"command {cid} ended {msg}")
                    break
            if i >= 10:  # the first ones warm up connections and caches
                latencies.append((time.perf_counter() - started) * 1000)
    return latencies


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench latency")
    parser.add_argument("--commands", type=int, default=300)
    args, _ = parser.parse_known_args(argv)
    with bench() as b:
        _, port = b.gateway()
        b.dispatch("projector", "projector")
        modbus = free_port()
        b.dispatch("simulator", "simulate-device", "--port", str(modbus))
        wait_port(modbus)
        b.enroll([EDGE])
        b.dispatch(
            "edge",
            "edge",
            "--edge-id",
            EDGE,
            "--gateway",
            f"ws://127.0.0.1:{port}",
            "--token",
            b.edge_token(EDGE),
            "--modbus",
            f"bms_main=127.0.0.1:{modbus}",
            "--state-dir",
            str(b.log_dir / f"edge-{b.namespace}"),
        )
        time.sleep(2.0)  # the agent connects and syncs its config
        latencies = uvloop.run(measure(b, port, args.commands))
        # The bare relay with a scripted edge, same run: the ratio's denominator.
        _, relay_port = b.relay()
        _, relay = uvloop.run(throughput.measure(b, relay_port, 1, 1, 1, 2.0, "lat-relay"))
    (p50, p99), (r50, r99) = p50_p99(latencies), p50_p99(relay)
    print(
        f"light_load_latency_p50: {p50:.2f} ms ({p50 / r50:.1f}x the relay's {r50:.2f} ms; "
        f"send -> executed, emergency, real edge agent + Modbus write/read-back, "
        f"{len(latencies)} commands)"
    )
    print(f"light_load_latency_p99: {p99:.2f} ms ({p99 / r99:.1f}x the relay's {r99:.2f} ms)")
    return 0
