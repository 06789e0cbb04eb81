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
from pathlib import Path

import uvloop
import websockets

from bench import throughput
from bench.harness import Bench, bench, command, free_port, p50_p99
from bench.throughput import Steps
from edge.capabilities import decode_config
from edge.modbus import ModbusDevices

EDGE = "site1_edge_prod"
SITES = Path(__file__).resolve().parent.parent / "edge" / "sites"


def wait_port(port: int, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


async def measure(b: Bench, port: int, count: int, steps: Steps | None = None) -> list[float]:
    token = b.user_token("bench", [EDGE])
    latencies: list[float] = []
    sent: dict[str, float] = {}
    async with websockets.connect(
        f"ws://127.0.0.1:{port}/ws/dashboard",
        additional_headers={"Authorization": f"Bearer {token}"},
        compression=None,
    ) as ws:
        for i in range(count + 10):
            cid = f"lat-{i}"
            started = sent[cid] = time.perf_counter()
            await ws.send(json.dumps(command(cid, EDGE, (i % 200) * 100, priority="emergency")))
            while True:
                msg = json.loads(await asyncio.wait_for(ws.recv(), 15))
                if steps is not None and i >= 10 and msg.get("status"):
                    steps.note(msg.get("command_id") or "", msg["status"], sent)
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


async def device_floor(port: int, count: int) -> list[float]:
    """Write + read-back through the agent's own Modbus client (edge/modbus.py), timed."""
    site = decode_config((SITES / f"{EDGE}.json").read_bytes()).with_address(
        "bms_main", "127.0.0.1", port
    )
    device = site.device("bms_main")
    assert device is not None
    channel = next(c for c in device.channels if c.name == "SetActivePower")
    devices = ModbusDevices()
    took: list[float] = []
    try:
        for i in range(count + 10):
            started = time.perf_counter()
            await devices.write(device, channel, (i % 200) * 100)
            if i >= 10:
                took.append((time.perf_counter() - started) * 1000)
    finally:
        await devices.close()
    return took


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
        steps = Steps()
        latencies = uvloop.run(measure(b, port, args.commands, steps))
        device = uvloop.run(device_floor(modbus, args.commands))
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
    print(f"light_load_latency_steps: p50 ms after the send: {steps.line()}")
    (d50, d99) = p50_p99(device)
    print(
        f"device_write_readback: p50 {d50:.2f} ms, p99 {d99:.2f} ms (the agent's Modbus client"
        f" alone, same simulated BMS: write + read-back of SetActivePower, {len(device)} times;"
        " inside every real-agent figure above)"
    )
    return 0
