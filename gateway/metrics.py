"""Prometheus metrics of the gateway (served at GET /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
