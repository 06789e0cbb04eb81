"""A shifted clock for the ledger scripts, and edges that share a partition."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from config.settings import Settings
from ledger.keys import partition_of
from ledger.store import Ledger
from schemas.commands import Command

from support import command

DECODE = msgspec.json.Decoder(Command)


class Clock:
    """Shifts the ledger scripts' clock (LedgerConfig.clock_offset_ms): Redis TIME cannot
    be advanced, so time-dependent rules (expiry, ack deadlines, retention) are tested by
    moving the offset instead of sleeping."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    @property
    def offset_ms(self) -> int:
        return self.ledger.config.clock_offset_ms

    def advance(self, ms: int) -> None:
        self.ledger.config = replace(self.ledger.config, clock_offset_ms=self.offset_ms + ms)

    def now(self) -> datetime:
        return datetime.now(UTC) + timedelta(milliseconds=self.offset_ms)

    def command(self, edge_id: str, **fields: Any) -> Command:
        """A command stamped with the shifted clock's `now`."""
        stamp = self.now().isoformat(timespec="milliseconds").replace("+00:00", "Z")
        body = command(edge_id=edge_id, timestamp=stamp, **fields)
        return DECODE.decode(msgspec.json.encode(body))


def same_partition_edges(settings: Settings, count: int = 2) -> list[str]:
    """Edge ids that share one partition (their streams share the inflight hash)."""
    partitions = settings.ledger().partitions
    by_partition: dict[int, list[str]] = {}
    for i in range(200):
        edge = f"edge_{i}"
        group = by_partition.setdefault(partition_of(edge, partitions), [])
        group.append(edge)
        if len(group) == count:
            return group
    raise AssertionError("no partition with enough edges")
