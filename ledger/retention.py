"""Retention without silent loss: trim the ledger's streams only below what is safe.

A partition log (and the audit stream) is trimmed below the oldest of: what every
consumer group has acknowledged, what the projector has stored in PostgreSQL, and the
retention window kept for replay. An edge's delivery stream is trimmed below its
group's oldest pending entry and last-delivered id, so a queued or unacknowledged
command is never trimmed. Always `XTRIM MINID`, never MAXLEN (which deletes
delivered-but-unacknowledged entries without a word).

Entries that disappear anyway (trimmed by hand, a MAXLEN somewhere, a deleted key) are
found by the sweep: their commands get the `lost` verdict and a `command.lost` log line.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from config.ledger import RetentionConfig
from ledger.records import TrimResult
from ledger.store import Ledger

log = logging.getLogger("ledger.retention")


@dataclass(slots=True)
class RetentionReport:
    trimmed: dict[str, TrimResult] = field(default_factory=dict)  # stream -> result
    lost: list[str] = field(default_factory=list)  # commands given `lost` by the sweep

    @property
    def entries_trimmed(self) -> int:
        return sum(r.trimmed for r in self.trimmed.values())


class Retention:
    def __init__(self, ledger: Ledger, config: RetentionConfig, *, actor: str) -> None:
        self.ledger = ledger
        self.config = config
        self.actor = actor

    async def partition(self, partition: int, stored: Mapping[str, str]) -> RetentionReport:
        """Sweep vanished entries, then trim the partition's log and edge streams.

        `stored` maps a stream to the last entry id the projector committed; a log
        without a stored position is not trimmed at all.
        """
        keys = self.ledger.keys
        report = RetentionReport()
        report.lost = await self.ledger.sweep_vanished(partition, actor=self.actor)
        stream = keys.log(partition)
        report.trimmed[stream] = await self.ledger.trim(
            stream,
            keep_from=stored.get(stream, "0-0"),
            retain_ms=self.config.log_retain_s * 1000,
        )
        for edge_id in await self.ledger.edges_with_streams(partition):
            stream = keys.edge_stream(edge_id)
            report.trimmed[stream] = await self.ledger.trim(
                stream,
                keep_from="+",
                retain_ms=self.config.edge_retain_s * 1000,
                edge_id=edge_id,
                partition=partition,
            )
        _log(report)
        return report

    async def audit(self, stored: Mapping[str, str]) -> TrimResult:
        """Trim the audit stream of refused inputs below what the projector stored."""
        stream = self.ledger.keys.audit()
        result = await self.ledger.trim(
            stream,
            keep_from=stored.get(stream, "0-0"),
            retain_ms=self.config.log_retain_s * 1000,
        )
        _log(RetentionReport(trimmed={stream: result}))
        return result


def _log(report: RetentionReport) -> None:
    for stream, result in report.trimmed.items():
        if result.trimmed or result.skipped:
            log.info(
                "retention.trimmed stream=%s entries=%d floor=%s skipped=%d",
                stream,
                result.trimmed,
                result.floor,
                result.skipped,
            )
