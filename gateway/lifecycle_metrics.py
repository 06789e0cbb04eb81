"""Step histograms, final-status counters and transition log lines from lifecycle events.

The hub hands every event of its ledger tail to `LifecycleMetrics.observe`. Durations
come from the events' own Redis timestamps, never from when this process saw them, so
every gateway computes the same numbers (aggregate across gateways with `max`). A
command is remembered from `issued` to its first final status; the memory is bounded
(the oldest commands are forgotten first, and their later steps go uncounted).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

from dispatch.tracing import trace_id
from gateway import metrics
from schemas.errors import ErrorCode
from schemas.events import (
    Delivered,
    Event,
    Executed,
    Expired,
    Issued,
    Rejected,
    Routed,
    Status,
    TimedOut,
    status_of,
)

log = logging.getLogger("dispatch.transition")

FINAL = frozenset(
    {
        Status.EXECUTED,
        Status.FAILED,
        Status.REJECTED,
        Status.TIMED_OUT,
        Status.EXPIRED,
        Status.CANCELLED,
        Status.LOST,
    }
)
KNOWN_CODES = frozenset(code.value for code in ErrorCode)
UNKNOWN = "unknown"


@dataclass(slots=True)
class _Command:
    command_type: str
    priority: str
    issued_at: int
    trace_id: str
    routed_at: int = 0
    delivered_at: int = 0
    routed_seen: bool = False


class LifecycleMetrics:
    """Turns one gateway's view of the ledger into step histograms, counters and logs."""

    def __init__(self, ack_timeout_ms: int, *, max_commands: int = 100_000) -> None:
        self.ack_timeout_ms = ack_timeout_ms
        self.max_commands = max_commands
        self._open: OrderedDict[str, _Command] = OrderedDict()

    def __len__(self) -> int:
        return len(self._open)

    def observe(self, event: Event) -> None:
        """Account one lifecycle event (gateway-stage refusals are counted elsewhere)."""
        if isinstance(event, Rejected) and event.stage == "gateway":
            return
        status = status_of(event)
        record = self._track(event)
        err = getattr(event, "error", None)
        if err is not None:
            code = err.code if err.code in KNOWN_CODES else "other"
            metrics.ERRORS.labels(status.value, code).inc()
        if isinstance(event, Routed) and record is not None:
            if not record.routed_seen:
                record.routed_seen = True
                self._step("issued_routed", record, event.at - record.issued_at)
            record.routed_at = event.at
        elif isinstance(event, Delivered) and record is not None and not record.delivered_at:
            record.delivered_at = event.at
            if record.routed_at:
                self._step("routed_delivered", record, event.at - record.routed_at)
        elif isinstance(event, Executed) and record is not None and record.delivered_at:
            self._step("delivered_executed", record, event.at - record.delivered_at)
        self._verdict_lag(event)
        if log.isEnabledFor(logging.INFO):
            self._log(event, status, record)
        if status in FINAL and record is not None:
            del self._open[event.command_id]
            self._step("issued_final", record, event.at - record.issued_at)
            metrics.FINALS.labels(status.value, record.command_type, record.priority).inc()

    def _track(self, event: Event) -> _Command | None:
        if isinstance(event, Issued):
            cmd = event.command
            record = _Command(
                command_type=cmd.command_type.value,
                priority=cmd.priority,
                issued_at=event.at,
                trace_id=trace_id(cmd.traceparent),
            )
            self._open[event.command_id] = record
            if len(self._open) > self.max_commands:
                self._open.popitem(last=False)
            return record
        return self._open.get(event.command_id)

    @staticmethod
    def _step(step: str, record: _Command, elapsed_ms: int) -> None:
        metrics.STEP_SECONDS.labels(step, record.command_type, record.priority).observe(
            max(elapsed_ms, 0) / 1000
        )

    def _verdict_lag(self, event: Event) -> None:
        if isinstance(event, TimedOut) and event.routed_at:
            due = event.routed_at + self.ack_timeout_ms
            metrics.VERDICT_LAG.labels("timed_out").observe(max(event.at - due, 0) / 1000)
        elif isinstance(event, Expired) and event.expires_at:
            metrics.VERDICT_LAG.labels("expired").observe(
                max(event.at - event.expires_at, 0) / 1000
            )

    @staticmethod
    def _log(event: Event, status: Status, record: _Command | None) -> None:
        err = getattr(event, "error", None)
        log.info(
            "command.transition command_id=%s edge_id=%s status=%s elapsed_ms=%s "
            "error=%s trace_id=%s event_id=%s",
            event.command_id,
            event.edge_id,
            status.value,
            event.at - record.issued_at if record is not None else "",
            err.code if err is not None else "",
            record.trace_id if record is not None else "",
            event.event_id,
            extra={
                "command_id": event.command_id,
                "edge_id": event.edge_id,
                "status": status.value,
                "elapsed_ms": event.at - record.issued_at if record is not None else None,
                "error_code": err.code if err is not None else None,
                "trace_id": record.trace_id if record is not None and record.trace_id else None,
                "event_id": event.event_id,
            },
        )


class ClockOffsets:
    """The latest clock offset each edge reported in an ack (edge minus gateway, ms)."""

    def __init__(self) -> None:
        self.latest_ms: dict[str, int] = {}

    def note(self, edge_id: str, offset_ms: int | None) -> None:
        if offset_ms is not None:
            self.latest_ms[edge_id] = offset_ms

    def keep_only(self, edge_ids: set[str]) -> None:
        for edge_id in [e for e in self.latest_ms if e not in edge_ids]:
            del self.latest_ms[edge_id]


# One per process: acknowledgments note offsets, the observer publishes them.
CLOCK_OFFSETS = ClockOffsets()
