"""A slow edge link (a throttled proxy, a small kernel send buffer): commands are
delayed, none is timed out unsent, the session survives, the gateway's memory is flat."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from hotpath_kit import Dashboard, Edge, enroll
from netproxy import NetProxy
from redis.asyncio import Redis

from dispatch.settings import Settings
from ledger.store import Ledger

from support import Gateway, Processes, command, user_token

EDGE = "hot_slow_edge"
COMMANDS = 600
# 600 frames of ~600 bytes: ~12 s of link, over twice the ack timeout; what the gateway
# lets wait in its socket (the transport's 64 KiB high-water mark) drains in ~2.5 s.
LINK_BYTES_PER_S = 30_000
ACK_TIMEOUT_MS = 5000


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


async def verdicts_forever(env: dict[str, str]) -> None:
    """The timeout verdicts, as a projector would reach them."""
    settings = Settings.from_env(env)
    client = Redis.from_url(settings.redis_url)
    ledger = Ledger(client, settings.ledger())
    await ledger.start()
    try:
        while True:
            await ledger.reach_verdicts(ledger.keys.partition(EDGE), actor="test:verdicts")
            await asyncio.sleep(0.1)  # the verdict loop's own poll period, not a wait
    finally:
        await ledger.close()
        await client.aclose()


async def test_a_throttled_edge_link_delays_commands_and_loses_none(processes: Processes) -> None:
    processes.env["DISPATCH_ACK_TIMEOUT_MS"] = str(ACK_TIMEOUT_MS)
    processes.env["DISPATCH_SOCKET_SEND_BUFFER_BYTES"] = "8192"
    enroll(processes.env, EDGE)
    gw = processes.gateway()
    proxy = NetProxy("127.0.0.1", gw.port, receive_buffer_bytes=8192).start_in_thread()
    proxy.throttle(LINK_BYTES_PER_S)
    verdicts = asyncio.create_task(verdicts_forever(processes.env))
    edge = await Edge().connect(Gateway(gw.proc, proxy.port), EDGE)
    dash = await Dashboard().connect(gw, user_token("op", control=[EDGE]))
    try:
        acked = 0

        async def execute_all() -> None:
            nonlocal acked
            while acked < COMMANDS:
                frame = await edge.command(acked, timeout_s=30)
                await edge.ack(frame["command_id"], "accepted")
                await edge.ack(frame["command_id"], "executed")
                acked += 1

        runner = asyncio.create_task(execute_all())
        ids = []
        for i in range(COMMANDS):
            body = command(edge_id=EDGE, channel=f"C{i}")
            ids.append(body["command_id"])
            await dash.send(body)
        for cid in ids:
            await dash.status(cid, "routed", timeout_s=30)
        rss_start = rss_kib(gw.proc.popen.pid)
        await runner
        for cid in ids:
            await dash.status(cid, "executed", "timed_out", timeout_s=30)
        ended = {cid: dash.statuses(cid) for cid in ids}
        assert [c for c, s in ended.items() if "timed_out" in s] == []
        assert [c["command_id"] for c in edge.commands] == ids  # each once, in order
        assert edge.close_code is None  # the session survived
        grown_kib = rss_kib(gw.proc.popen.pid) - rss_start
        print(f"gateway RSS grew {grown_kib} KiB while the link drained {COMMANDS} commands")
        assert grown_kib < 20_000
    finally:
        verdicts.cancel()
        with contextlib.suppress(BaseException):
            await verdicts
        await dash.close()
        await edge.close()
        proxy.stop_thread()
