"""Prometheus metrics of the gateway (served at GET /metrics)."""

from __future__ import annotations

import functools
from typing import Any

from prometheus_client import CollectorRegistry

from config.metrics import Declare
from gateway.loop_histogram import LoopHistogram

REGISTRY = CollectorRegistry(auto_describe=True)
declare = Declare(REGISTRY)

EDGES = declare.gauge("dispatch_edges_connected", "Edges connected to this gateway")
DASHBOARDS = declare.gauge("dispatch_dashboards_connected", "Dashboards connected to this gateway")
COMMANDS = declare.counter(
    "dispatch_commands_total",
    "Commands received, by outcome (admitted, exists, rejected)",
    "outcome",
)
REJECTIONS = declare.counter("dispatch_rejections_total", "Refused inputs by error code", "code")
EVENTS = declare.counter(
    "dispatch_events_total", "Lifecycle events seen on the ledger, by status", "status"
)
STATUS_FRAMES = declare.counter(
    "dispatch_status_frames_total",
    "Lifecycle statuses sent to dashboards, by path: `reply` (from this gateway's own "
    "script reply, ahead of the tail) or `tail` (events of other processes, or a reply "
    "whose command had an earlier status still on its way)",
    "path",
)
UNSENT = declare.counter(
    "dispatch_status_frames_failed_total",
    "Statuses this gateway could not fan out (a bug or an unreadable log entry), by path: "
    "`reply` or `tail`; its sessions did not hear them (alert DispatchStatusesUnsent)",
    "path",
)
ACCOUNTING_FAILED = declare.counter(
    "dispatch_event_accounting_failed_total",
    "Lifecycle events passed on from a script's reply whose bookkeeping then failed (a bug): "
    "metrics, transition line, the delivery a `routed` calls for, or the edge's room "
    "(alert DispatchEventAccountingFailed)",
)
TAIL_AGE = declare.gauge(
    "dispatch_ledger_tail_age_seconds",
    "Seconds since this gateway's ledger tail last read Redis (at least once a second when well)",
)
DELIVERIES = declare.counter("dispatch_deliveries_total", "Commands handed to edge connections")
ACKS = declare.counter(
    "dispatch_acks_total", "Edge acknowledgments by status and result", "status", "result"
)
SUBMIT_SECONDS = declare.histogram(
    "dispatch_submit_seconds",
    "Time from receiving a command to its admission in the ledger",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)

# -- Lifecycle steps, verdicts and fleet gauges (gateway/lifecycle_metrics.py and
# gateway/observer.py; docs/operations.md "Metrics"). Every gateway tails every partition
# and sees the same events with the same Redis timestamps, so each one holds a full copy
# of the fleet's step histograms and fleet gauges: aggregate them with `max`, never `sum`.
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# Observed on the hot path from the event loop only: the lock-free kind.
STEP_SECONDS = LoopHistogram(
    "dispatch_command_step_seconds",
    "Time between lifecycle events of one command (Redis timestamps), once per command",
    ["step", "command_type", "priority"],
    buckets=(*STEP_BUCKETS, 3600.0, 86400.0),
    registry=REGISTRY,
)
FINALS = declare.counter(
    "dispatch_command_finals_total",
    "Commands reaching their first final status, by status, type and priority",
    "status",
    "command_type",
    "priority",
)
ERRORS = declare.counter(
    "dispatch_command_errors_total",
    "Lifecycle events carrying an error, by status and error code (unknown codes: other)",
    "status",
    "code",
)
VERDICT_LAG = declare.histogram(
    "dispatch_verdict_lag_seconds",
    "Verdict time minus its due time (ack deadline or expiry), by verdict",
    "verdict",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
VERDICTS_OVERDUE = declare.gauge(
    "dispatch_verdicts_overdue_seconds",
    "Age of the oldest ack deadline or expiry that is due and still has no verdict",
    "verdict",
)
QUEUED = declare.gauge("dispatch_queued_commands", "Commands queued for offline edges (fleet-wide)")
QUEUED_BY_EDGE = declare.gauge(
    "dispatch_queued_commands_by_edge",
    "Undelivered entries of the edges with the longest queues (DISPATCH_METRICS_TOP_EDGES)",
    "edge_id",
)
EDGES_ONLINE = declare.gauge(
    "dispatch_edges_online", "Enrolled edges with a live presence (fleet-wide)"
)
EDGES_OFFLINE_QUEUED = declare.gauge(
    "dispatch_edges_offline_with_queued",
    "Offline edges that have undelivered commands waiting (fleet-wide)",
)
PROJECTOR_LAG_ENTRIES = declare.gauge(
    "dispatch_projector_lag_entries",
    "Lifecycle log entries not yet stored by the projector, per partition",
    "partition",
)
PROJECTOR_LAG_SECONDS = declare.gauge(
    "dispatch_projector_lag_seconds",
    "Age of the oldest lifecycle log entry not yet stored by the projector, per partition",
    "partition",
)
QUARANTINED = declare.gauge(
    "dispatch_quarantined_events", "Events the projector set aside as unprocessable (-1: not known)"
)
REDIS_UP = declare.gauge("dispatch_redis_up", "1 when Redis answered the last probe")
POSTGRES_UP = declare.gauge("dispatch_postgres_up", "1 when PostgreSQL answered the last probe")
CLOCK_OFFSET_MAX = declare.gauge(
    "dispatch_ack_clock_offset_max_seconds",
    "Largest |edge clock - gateway clock| among edges connected here (from their acks)",
)
CLOCK_OFFSET = declare.gauge(
    "dispatch_ack_clock_offset_seconds",
    "Edge clock minus gateway clock from the edge's latest ack (DISPATCH_METRICS_TOP_EDGES > 0)",
    "edge_id",
)
OBSERVER_ERRORS = declare.counter(
    "dispatch_observer_errors_total", "Failed probes of the metrics observer, by probe", "probe"
)


@functools.cache
def labelled(metric: Any, *values: str) -> Any:
    """`metric.labels(*values)`, resolved once per label set: `labels()` takes a lock and
    builds its key on every call, and the hot path counts several times per command.
    Only for label values from a closed set (statuses, outcomes)."""
    return metric.labels(*values)
