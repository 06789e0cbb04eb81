"""The verdict loop: `timed_out` and `expired` verdicts reached from the ledger's indexes.

It needs Redis only. Every gateway runs it (from its lifespan) and every projector too,
for every partition and without leases: the verdict script is atomic and checks the
command's status itself, so concurrent loops never give a command two verdicts, and
neither a PostgreSQL outage nor an audit bug can delay a `timed_out`. One tick is one
pipelined round trip for all partitions.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import KW_ONLY, dataclass, field

from ledger.store import Ledger

log = logging.getLogger("ledger.verdicts")


@dataclass(frozen=True, slots=True)
class VerdictConfig:
    interval_s: float = 0.1  # verdicts land at most this much after their deadline
    limit: int = 500  # commands examined per partition and script call


@dataclass(eq=False)
class VerdictLoop:
    ledger: Ledger
    actor: str
    config: VerdictConfig = field(default_factory=VerdictConfig)
    _: KW_ONLY
    process: str = "projector"  # prefix of the log lines: `<process>.verdicts.*`
    reached: int = field(default=0, init=False)

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
                log.warning("%s.verdicts.failed partition=%d error=%s", self.process, p, result)
            else:
                reached += result
        self.reached += reached
        return reached

    async def run(self) -> None:
        """Tick until cancelled; a failed tick (Redis away) is logged and retried."""
        log.info("%s.verdicts.started actor=%s", self.process, self.actor)
        while True:
            try:
                await self.tick()
            except Exception as exc:  # never let one bad tick end the verdicts
                log.warning("%s.verdicts.failed error=%s", self.process, exc)
            await asyncio.sleep(self.config.interval_s)
