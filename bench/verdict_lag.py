"""Timeout verdict lag: from a command's ack deadline to its `timed_out` verdict.

A scripted edge receives commands and never acknowledges them; a dashboard sends them
at a steady pace to a gateway (and a projector: both run the verdict loop, as in a
deployment) with a short ack timeout. For each command the deadline is its last
`routed` time plus the ack timeout; the lag is the `timed_out` verdict's time minus
that deadline (both on the Redis clock, as recorded in the ledger), and how late the
dashboard saw it (its receive time on this host's clock, the same clock Redis reads
here). Issue 9 asks for p99 <= 200 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from datetime import datetime

import uvloop
import websockets

from bench.harness import Bench, bench, command, p50_p99

EDGE = "verdict_edge"


def _ms(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000


async def silent_edge(url: str, token: str, ready: asyncio.Event) -> None:
    """Receives every command and never acknowledges one."""
    async with websockets.connect(
        url, additional_headers={"Authorization": f"Bearer {token}"}, compression=None
    ) as ws:
        ready.set()
        async for _ in ws:
            pass


async def measure(
    b: Bench, port: int, commands: int, rate: float, ack_timeout_ms: int
) -> tuple[list[float], list[float], int]:
    """(recorded lags ms, seen lags ms, verdicts missing)."""
    b.enroll([EDGE])
    ready = asyncio.Event()
    edge = asyncio.create_task(
        silent_edge(f"ws://127.0.0.1:{port}/ws/edge/{EDGE}", b.edge_token(EDGE), ready)
    )
    await asyncio.wait_for(ready.wait(), 10)
    routed: dict[str, float] = {}
    recorded: list[float] = []
    seen: list[float] = []
    async with websockets.connect(
        f"ws://127.0.0.1:{port}/ws/dashboard",
        additional_headers={"Authorization": f"Bearer {b.user_token('op', [EDGE])}"},
        compression=None,
        max_queue=None,
    ) as ws:

        async def send() -> None:
            for i in range(commands):
                # Distinct channels: setpoints for one channel would supersede each other.
                body = command(f"vl-{i}", EDGE, i)
                body["target"]["channel"] = f"Channel{i}"
                await ws.send(json.dumps(body))
                await asyncio.sleep(1 / rate)

        sender = asyncio.create_task(send())
        wait_s = commands / rate + ack_timeout_ms / 1000 + 10
        deadline = time.monotonic() + wait_s
        while len(recorded) < commands and time.monotonic() < deadline:
            try:
                raw = await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                break
            now_ms = time.time() * 1000
            msg = json.loads(raw)
            cid, status = msg.get("command_id"), msg.get("status")
            if status == "routed":
                routed[cid] = _ms(msg["at"])
            elif status == "timed_out" and cid in routed:
                due = routed[cid] + ack_timeout_ms
                recorded.append(_ms(msg["at"]) - due)
                seen.append(now_ms - due)
        await sender
    edge.cancel()
    await asyncio.gather(edge, return_exceptions=True)
    return recorded, seen, commands - len(recorded)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench verdict_lag")
    parser.add_argument("--commands", type=int, default=300)
    parser.add_argument("--rate", type=float, default=100.0, help="commands sent per second")
    parser.add_argument("--ack-timeout-ms", type=int, default=1000)
    args, _ = parser.parse_known_args(argv)
    with bench({"DISPATCH_ACK_TIMEOUT_MS": str(args.ack_timeout_ms)}) as b:
        _, port = b.gateway()
        b.dispatch("projector", "projector")
        recorded, seen, missing = uvloop.run(
            measure(b, port, args.commands, args.rate, args.ack_timeout_ms)
        )
    (r50, r99), (s50, s99) = p50_p99(recorded), p50_p99(seen)
    print(
        f"verdict_lag: p50 {r50:.0f} ms, p99 {r99:.0f} ms ({r99 / 200:.2f}x the 200 ms bound; "
        f"ack deadline -> timed_out recorded, {len(recorded)} commands to an edge that never "
        f"acks, {args.rate:.0f}/s, ack timeout {args.ack_timeout_ms} ms"
        + (f"; {missing} got no verdict" if missing else "")
        + ")"
    )
    print(f"verdict_lag_seen: p50 {s50:.0f} ms, p99 {s99:.0f} ms (deadline -> dashboard has it)")
    return 1 if missing else 0
