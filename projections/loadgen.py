"""Drive many commands through a real Ledger to mixed outcomes (load tests, benchmarks).

Every event comes from the ledger's own scripts, so the logs are exactly what a running
system writes. The plan is a pure function of the command index: tests compute the
expected counts per filter from it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import NamedTuple

from ledger.store import Ledger
from schemas.commands import Ack, Command, CommandType, Target
from schemas.errors import ErrorCode, error

USERS = ("alice", "bob", "carol")
GATEWAY_OWNER = "loadgen-gw|session"


class Planned(NamedTuple):
    number: int  # the command index the plan is a function of
    command_id: str
    edge_id: str
    user: str
    source: str
    command_type: str
    status: str  # the status the command ends in
    error_code: str | None


def edges(count: int) -> list[str]:
    return [f"edge_{i:02d}" for i in range(count)]


def plan(index: int, prefix: str, edge_ids: Sequence[str], offline: int) -> Planned:
    """What command `index` is and how it ends; the last `offline` edges stay offline."""
    edge = edge_ids[index % len(edge_ids)]
    user = USERS[index % len(USERS)]
    source = "scheduler" if index % 5 == 0 else user
    kind = CommandType.MODE_CHANGE if index % 4 == 3 else CommandType.SETPOINT
    if edge in edge_ids[len(edge_ids) - offline :]:
        status, code = ("cancelled", "cancelled") if index % 2 == 0 else ("queued", None)
    else:
        status, code = {
            5: ("failed", "device_error"),
            6: ("rejected", "out_of_range"),
            7: ("delivered", None),
            8: ("routed", None),
        }.get(index % 10, ("executed", None))
    return Planned(index, f"{prefix}{index:06d}", edge, user, source, kind.value, status, code)


def _command(p: Planned) -> Command:
    setpoint = p.command_type == CommandType.SETPOINT.value
    return Command(
        command_id=p.command_id,
        command_type=CommandType(p.command_type),
        # One channel per command: queued setpoints for one channel would coalesce.
        target=Target(edge_id=p.edge_id, device_id="bms_main", channel=f"ch{p.number}"),
        value=p.number * 10 if setpoint else "peak_shaving",
        unit="W" if setpoint else None,
        expiry_sec=3600,
        source=p.source,
        timestamp=datetime.now(UTC),
    )


async def _drive(ledger: Ledger, p: Planned) -> None:
    result = await ledger.submit(
        _command(p), actor=f"user:{p.user}", grant="grant:can_control:*", gateway_id="loadgen"
    )
    if result.status not in ("routed", "queued"):
        raise RuntimeError(f"loadgen: {p.command_id} was {result.outcome}/{result.status}")
    edge, cid = p.edge_id, p.command_id
    if p.status == "cancelled":
        await ledger.cancel(cid, f"user:{p.user}")
        return
    if p.status in ("queued", "routed"):
        return
    if p.status == "rejected":
        err = error(ErrorCode.OUT_OF_RANGE, "value outside the channel's limits")
        await ledger.acknowledge(edge, Ack(command_id=cid, status="rejected", error=err))
        return
    await ledger.acknowledge(edge, Ack(command_id=cid, status="accepted"))
    if p.status == "executed":
        await ledger.acknowledge(
            edge, Ack(command_id=cid, status="executed", executed_at=datetime.now(UTC))
        )
    elif p.status == "failed":
        err = error(ErrorCode.DEVICE_ERROR, "Modbus write failed")
        await ledger.acknowledge(edge, Ack(command_id=cid, status="failed", error=err))


async def connect(ledger: Ledger, edge_ids: Sequence[str], offline: int) -> None:
    """Mark the online edges present (commands to them are routed at admission)."""
    for edge in edge_ids[: len(edge_ids) - offline]:
        await ledger.connect_edge(edge, GATEWAY_OWNER)


async def generate(
    ledger: Ledger,
    indexes: range,
    *,
    prefix: str = "cmd_",
    edge_ids: Sequence[str] = tuple(edges(8)),
    offline: int = 2,
    concurrency: int = 500,
) -> list[Planned]:
    """Run commands `indexes` through the ledger, `concurrency` at a time."""
    plans = [plan(i, prefix, edge_ids, offline) for i in indexes]
    for start in range(0, len(plans), concurrency):
        await connect(ledger, edge_ids, offline)  # keeps presence from lapsing
        await asyncio.gather(*(_drive(ledger, p) for p in plans[start : start + concurrency]))
    return plans
