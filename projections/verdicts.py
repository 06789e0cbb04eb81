"""The verdict loop: `timed_out` and `expired` verdicts reached from the ledger's indexes.

Every projector process runs it for every partition, without leases: the verdict
script is atomic and checks the command's status itself, so concurrent loops never give
a command two verdicts, and a killed projector costs no delay while its partition
leases run out. One tick is one pipelined round trip for all partitions.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from ledger.store import Ledger

log = logging.getLogger("projections.verdicts")


@dataclass(frozen=True, slots=True)
class VerdictConfig:
    interval_s: float = 0.1  # verdicts land at most this much after their deadline
    limit: int = 500  # commands examined per partition and script call


class VerdictLoop:
    def __init__(self, ledger: Ledger, actor: str, config: VerdictConfig | None = None) -> None:
        self.ledger = ledger
        self.actor = actor
        self.config = config or VerdictConfig()
        self.reached = 0

    async def tick(self) -> int:
        """Reach every due verdict of every partition once; returns how many."""
        partitions = list(self.ledger.keys.all_partitions())
        results = await asyncio.gather(
            *(
                self.ledger.reach_verdicts(p, actor=self.actor, limit=self.config.limit)
                for p in partitions
            ),
            return_exceptions=True,
        )
        reached = 0
        for p, result in zip(partitions, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("projector.verdicts.failed partition=%d error=%s", p, result)
            else:
                reached += result
        self.reached += reached
        return reached

    async def run(self) -> None:
        log.info("projector.verdicts.started actor=%s", self.actor)
        while True:
            await self.tick()
            await asyncio.sleep(self.config.interval_s)
