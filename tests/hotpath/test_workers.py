"""`dispatch gateway --workers 2`: two processes on one port, each serving commands."""

from __future__ import annotations

import asyncio
import re

from hotpath_kit import Dashboard, Edge, enroll

from support import Gateway, Processes, command, free_port, user_token, wait_until

EDGES = [f"hot_worker_edge_{i}" for i in range(20)]


async def test_two_workers_share_the_port_and_each_runs_commands(processes: Processes) -> None:
    enroll(processes.env, *EDGES)
    port = free_port()
    proc = processes.dispatch("gateway", "gateway", "--port", str(port), "--workers", "2")
    gw = Gateway(proc, port)
    gw.wait_ready()
    started = wait_until(
        lambda: len(set(re.findall(r"gateway\.started gateway_id=(\S+)", proc.log()))) == 2,
        30,
        what=f"two workers to start:\n{proc.log()}",
    )
    assert started
    # Connections land on either worker; keep connecting edges until both hold one.
    edges: list[Edge] = []
    owners: dict[str, str] = {}
    for edge_id in EDGES:  # the kernel picks the worker: 20 all on one is ~1 in 500,000
        edges.append(await Edge().connect(gw, edge_id))
        found = wait_until(
            lambda e=edge_id: re.findall(
                rf"edge\.session\.opened edge_id={e} owner=(\S+)\|", proc.log()
            ),
            10,
            what=f"{edge_id} to connect",
        )
        owners[edge_id] = found[0]
        if len(set(owners.values())) == 2:
            break
    assert len(set(owners.values())) == 2, f"all edges landed on one worker: {owners}"
    dash = await Dashboard().connect(gw, user_token("op", control=EDGES))
    try:
        picked = {worker: edge_id for edge_id, worker in owners.items()}  # one per worker
        for edge_id in picked.values():
            i = EDGES.index(edge_id)
            body = command(edge_id=edge_id)
            await dash.send(body)
            frame = await edges[i].command(0)
            assert frame["command_id"] == body["command_id"]
            await edges[i].ack(body["command_id"], "executed")
            await dash.status(body["command_id"], "executed")
    finally:
        await dash.close()
        await asyncio.gather(*(e.close() for e in edges))
