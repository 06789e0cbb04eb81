"""Prometheus metrics of the gateway (served at GET /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway.loop_histogram import LoopHistogram

REGISTRY = CollectorRegistry(auto_describe=True)

EDGES = Gauge("dispatch_edges_connected", "Edges connected to this gateway", registry=REGISTRY)
DASHBOARDS = Gauge(
    "dispatch_dashboards_connected", "Dashboards connected to this gateway", registry=REGISTRY
)
COMMANDS = Counter(
    "dispatch_commands_total",
    "Commands received, by outcome (admitted, exists, rejected)",
    ["outcome"],
    registry=REGISTRY,
)
REJECTIONS = Counter(
    "dispatch_rejections_total", "Refused inputs by error code", ["code"], registry=REGISTRY
)
EVENTS = Counter(
    "dispatch_events_total",
    "Lifecycle events seen on the ledger, by status",
    ["status"],
    registry=REGISTRY,
)
DELIVERIES = Counter(
    "dispatch_deliveries_total", "Commands handed to edge connections", registry=REGISTRY
)
ACKS = Counter(
    "dispatch_acks_total",
    "Edge acknowledgments by status and result",
    ["status", "result"],
    registry=REGISTRY,
)
SUBMIT_SECONDS = Histogram(
    "dispatch_submit_seconds",
    "Time from receiving a command to its admission in the ledger",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
    registry=REGISTRY,
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
FINALS = Counter(
    "dispatch_command_finals_total",
    "Commands reaching their first final status, by status, type and priority",
    ["status", "command_type", "priority"],
    registry=REGISTRY,
)
ERRORS = Counter(
    "dispatch_command_errors_total",
    "Lifecycle events carrying an error, by status and error code (unknown codes: other)",
    ["status", "code"],
    registry=REGISTRY,
)
VERDICT_LAG = Histogram(
    "dispatch_verdict_lag_seconds",
    "Verdict time minus its due time (ack deadline or expiry), by verdict",
    ["verdict"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
    registry=REGISTRY,
)
VERDICTS_OVERDUE = Gauge(
    "dispatch_verdicts_overdue_seconds",
    "Age of the oldest ack deadline or expiry that is due and still has no verdict",
    ["verdict"],
    registry=REGISTRY,
)
QUEUED = Gauge(
    "dispatch_queued_commands", "Commands queued for offline edges (fleet-wide)", registry=REGISTRY
)
QUEUED_BY_EDGE = Gauge(
    "dispatch_queued_commands_by_edge",
    "Undelivered entries of the edges with the longest queues (DISPATCH_METRICS_TOP_EDGES)",
    ["edge_id"],
    registry=REGISTRY,
)
EDGES_ONLINE = Gauge(
    "dispatch_edges_online", "Enrolled edges with a live presence (fleet-wide)", registry=REGISTRY
)
EDGES_OFFLINE_QUEUED = Gauge(
    "dispatch_edges_offline_with_queued",
    "Offline edges that have undelivered commands waiting (fleet-wide)",
    registry=REGISTRY,
)
PROJECTOR_LAG_ENTRIES = Gauge(
    "dispatch_projector_lag_entries",
    "Lifecycle log entries not yet stored by the projector, per partition",
    ["partition"],
    registry=REGISTRY,
)
PROJECTOR_LAG_SECONDS = Gauge(
    "dispatch_projector_lag_seconds",
    "Age of the oldest lifecycle log entry not yet stored by the projector, per partition",
    ["partition"],
    registry=REGISTRY,
)
QUARANTINED = Gauge(
    "dispatch_quarantined_events",
    "Events the projector set aside as unprocessable (-1: not known)",
    registry=REGISTRY,
)
REDIS_UP = Gauge("dispatch_redis_up", "1 when Redis answered the last probe", registry=REGISTRY)
POSTGRES_UP = Gauge(
    "dispatch_postgres_up", "1 when PostgreSQL answered the last probe", registry=REGISTRY
)
CLOCK_OFFSET_MAX = Gauge(
    "dispatch_ack_clock_offset_max_seconds",
    "Largest |edge clock - gateway clock| among edges connected here (from their acks)",
    registry=REGISTRY,
)
CLOCK_OFFSET = Gauge(
    "dispatch_ack_clock_offset_seconds",
    "Edge clock minus gateway clock from the edge's latest ack (DISPATCH_METRICS_TOP_EDGES > 0)",
    ["edge_id"],
    registry=REGISTRY,
)
OBSERVER_ERRORS = Counter(
    "dispatch_observer_errors_total",
    "Failed probes of the metrics observer, by probe",
    ["probe"],
    registry=REGISTRY,
)
