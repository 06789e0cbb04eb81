"""Every lifecycle transition is one script in one hash slot: it runs on a real Redis Cluster."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import pytest
import websockets
from redis.asyncio.cluster import RedisCluster

from config.ledger import LedgerConfig
from ledger.records import SubmitOutcome
from ledger.store import Ledger
from schemas.commands import Ack, Command

from support import Processes, command, edge_token, user_token, wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("redis-server") is None, reason="redis-server is not installed"
    ),
]


def cluster_port(taken: list[int]) -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    for _ in range(200):
        port = random.randint(20000, 30000)
        if port in taken:
            continue
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[int]]:
    ports: list[int] = []
    for _ in range(3):
        ports.append(cluster_port(ports))
    procs = []
    for port in ports:
        data = tmp_path / str(port)
        data.mkdir()
        procs.append(
            subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--dir",
                    str(data),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    try:
        for port in ports:
            wait_until(
                lambda p=port: (
                    subprocess.run(
                        ["redis-cli", "-p", str(p), "ping"], check=False, capture_output=True
                    ).stdout.strip()
                    == b"PONG"
                ),
                10,
            )
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in ports),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        wait_until(
            lambda: (
                b"cluster_state:ok"
                in subprocess.run(
                    ["redis-cli", "-p", str(ports[0]), "cluster", "info"],
                    check=False,
                    capture_output=True,
                ).stdout
            ),
            15,
        )
        yield ports
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)


@pytest.fixture
async def cluster_ledger(cluster: list[int]) -> AsyncIterator[Ledger]:
    client = RedisCluster.from_url(f"redis://127.0.0.1:{cluster[0]}/0")
    ledger = Ledger(client, LedgerConfig(namespace="cl", partitions=12, ack_timeout_ms=200))
    await ledger.start()
    yield ledger
    await ledger.close()
    await client.aclose()


async def test_transitions_are_single_slot_scripts_on_a_cluster(cluster_ledger: Ledger) -> None:
    edges = [f"edge{i}" for i in range(12)]
    partitions = {cluster_ledger.keys.partition(e) for e in edges}
    assert len(partitions) > 3  # spread over partitions, hence over the three shards
    for i, edge in enumerate(edges):
        cmd = msgspec.json.decode(msgspec.json.encode(command(f"c{i}", edge_id=edge)), type=Command)
        result = await cluster_ledger.submit(cmd, actor="user:u", grant="g", gateway_id="gw")
        assert result.outcome is SubmitOutcome.ADMITTED and result.status == "queued"
        await cluster_ledger.connect_edge(edge, "gw|s1")
        delivered = await cluster_ledger.deliver(edge, "gw|s1", claim=True)
        assert delivered is not None and [d.command_id for d in delivered] == [f"c{i}"]
        if i % 2 == 0:
            assert (
                await cluster_ledger.acknowledge(edge, Ack(command_id=f"c{i}", status="executed"))
            ).applied
    await asyncio.sleep(0.25)
    verdicts = sum([await cluster_ledger.reach_verdicts(p, actor="t") for p in range(12)])
    assert verdicts == 6  # the unacknowledged half timed out, each exactly once
    for i in range(12):
        record = await cluster_ledger.lookup(f"c{i}")
        assert record is not None and record.status == ("executed" if i % 2 == 0 else "timed_out")


async def test_gateways_serve_a_full_lifecycle_on_a_cluster(
    cluster: list[int], processes: Processes
) -> None:
    processes.env["DISPATCH_REDIS_URL"] = f"redis://127.0.0.1:{cluster[0]}/0"
    processes.env["DISPATCH_REDIS_CLUSTER"] = "1"
    edge_id = "cluster_edge"
    assert processes.dispatch("token", "token", "--edge", edge_id).popen.wait(20) == 0
    gw_a, gw_b = processes.gateway(gateway_id="gw-a"), processes.gateway(gateway_id="gw-b")
    token = user_token(control=[edge_id])
    async with (
        websockets.connect(
            f"{gw_b.ws}/ws/edge/{edge_id}",
            additional_headers={"Authorization": f"Bearer {edge_token(edge_id)}"},
        ) as edge,
        websockets.connect(
            f"{gw_a.ws}/ws/dashboard", additional_headers={"Authorization": f"Bearer {token}"}
        ) as dash,
    ):
        await asyncio.sleep(0.3)
        body = command(edge_id=edge_id)
        await dash.send(json.dumps(body))
        msg = json.loads(await asyncio.wait_for(edge.recv(), 10))
        assert msg["command_id"] == body["command_id"]
        await edge.send(json.dumps({"command_id": msg["command_id"], "status": "accepted"}))
        await edge.send(
            json.dumps(
                {
                    "command_id": msg["command_id"],
                    "status": "executed",
                    "executed_at": None,
                    "error": None,
                }
            )
        )
        seen: list[str] = []
        while "executed" not in seen:
            update = json.loads(await asyncio.wait_for(dash.recv(), 10))
            seen.append(update["status"])
        assert seen == ["issued", "authorized", "routed", "delivered", "executed"]
