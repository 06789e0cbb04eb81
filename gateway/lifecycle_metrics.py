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
from typing import Any

from config.tracing import enabled as tracing_enabled
from config.tracing import trace_id
from gateway import metrics
from ledger import lifecycle
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

TRANSITION_LOGGER = "dispatch.transition"
log = logging.getLogger(TRANSITION_LOGGER)

FINAL = lifecycle.TERMINAL  # every status a command ends in, verdicts included
KNOWN_CODES = frozenset(code.value for code in ErrorCode)


STEPS = ("issued_routed", "routed_delivered", "delivered_executed", "issued_final")


class _Series:
    """The labelled children of one (command type, priority): resolved once, not per event."""

    __slots__ = ("finals", "steps")

    def __init__(self, command_type: str, priority: str) -> None:
        self.steps = [metrics.STEP_SECONDS.labels(s, command_type, priority) for s in STEPS]
        self.finals = {
            status: metrics.FINALS.labels(status.value, command_type, priority) for status in FINAL
        }


@dataclass(slots=True)
class _Command:
    series: _Series
    issued_at: int
    traceparent: str | None  # the gateway's admission span, when tracing was on

    @property
    def trace_id(self) -> str:
        return trace_id(self.traceparent)

    routed_at: int = 0
    delivered_at: int = 0
    routed_seen: bool = False


class LifecycleMetrics:
    """Turns one gateway's view of the ledger into step histograms, counters and logs."""

    def __init__(self, ack_timeout_ms: int, *, max_commands: int = 100_000) -> None:
        self.ack_timeout_ms = ack_timeout_ms
        self.max_commands = max_commands
        self._open: OrderedDict[str, _Command] = OrderedDict()
        self._series: dict[tuple[str, str], _Series] = {}
        self._errors: dict[tuple[str, str], Any] = {}

    def __len__(self) -> int:
        return len(self._open)

    def observe(self, event: Event) -> None:
        """Account one lifecycle event; never raises (the hub must go on broadcasting)."""
        try:
            self._observe(event)
        except Exception:
            metrics.OBSERVER_ERRORS.labels("lifecycle").inc()
            log.exception("gateway.metrics.failed event_id=%s", event.event_id)

    def _observe(self, event: Event) -> None:
        # Gateway-stage refusals are no commands: dispatch_rejections_total counts them.
        kind = type(event)
        if kind is Rejected and event.stage == "gateway":  # type: ignore[attr-defined]
            return
        status = status_of(event)
        record = self._track(event) if kind is Issued else self._open.get(event.command_id)
        err = getattr(event, "error", None)
        if err is not None:
            self._error(status, err.code)
        if record is not None:
            at = event.at
            if kind is Routed:
                if not record.routed_seen:
                    record.routed_seen = True
                    record.series.steps[0].observe(_seconds(at - record.issued_at))
                record.routed_at = at
            elif kind is Delivered and not record.delivered_at:
                record.delivered_at = at
                if record.routed_at:
                    record.series.steps[1].observe(_seconds(at - record.routed_at))
            elif kind is Executed and record.delivered_at:
                record.series.steps[2].observe(_seconds(at - record.delivered_at))
        if kind is TimedOut or kind is Expired:
            self._verdict_lag(event)
        if log.isEnabledFor(logging.INFO):
            self._log(event, status, record)
        if record is not None and status in FINAL:
            del self._open[event.command_id]
            record.series.steps[3].observe(_seconds(event.at - record.issued_at))
            record.series.finals[status].inc()

    def _track(self, event: Event) -> _Command:
        assert isinstance(event, Issued)
        cmd = event.command
        key = (cmd.command_type.value, cmd.priority)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series(*key)
        record = _Command(series=series, issued_at=event.at, traceparent=cmd.traceparent)
        self._open[event.command_id] = record
        if len(self._open) > self.max_commands:
            self._open.popitem(last=False)
        return record

    def traceparent(self, command_id: str) -> str | None:
        """The trace context of a command still in flight (None if unknown or untraced)."""
        record = self._open.get(command_id)
        return record.traceparent if record is not None else None

    def _error(self, status: Status, code: str) -> None:
        key = (status.value, code if code in KNOWN_CODES else "other")
        child = self._errors.get(key)
        if child is None:
            child = self._errors[key] = metrics.ERRORS.labels(*key)
        child.inc()

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
        trace = record.trace_id if record is not None else ""
        log.info(
            "command.transition command_id=%s edge_id=%s status=%s elapsed_ms=%s "
            "error=%s trace_id=%s event_id=%s",
            event.command_id,
            event.edge_id,
            status.value,
            event.at - record.issued_at if record is not None else "",
            err.code if err is not None else "",
            trace,
            event.event_id,
        )


def _seconds(elapsed_ms: int) -> float:
    return elapsed_ms / 1000 if elapsed_ms > 0 else 0.0


def traceparent_of(lifecycle: LifecycleMetrics | None, command_id: str) -> str | None:
    """The command's trace context for spans of this gateway (None: tracing off/unknown)."""
    if lifecycle is None or not tracing_enabled():
        return None
    return lifecycle.traceparent(command_id)


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
