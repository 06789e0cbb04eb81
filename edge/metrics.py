"""The edge agent's Prometheus metrics, served at `/metrics` with `--metrics-port`.

One registry per agent (not the process-wide default) so several agents in one process
(tests) do not collide. Label sets are bounded: device ids come from the site config.
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

from config.metrics import Declare

_WRITES = (1, 2, 4, 8, 16, 32, 64)  # journal writes sharing one commit
_FAST = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class EdgeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        declare = Declare(self.registry)
        self.queue_depth = declare.gauge(
            "dispatch_edge_queue_depth", "Commands waiting in the Core Cycle queue"
        )
        self.cycle_seconds = declare.histogram(
            "dispatch_edge_cycle_seconds", "Duration of one Core Cycle tick", buckets=_FAST
        )
        self.modbus_seconds = declare.histogram(
            "dispatch_edge_modbus_seconds",
            "Modbus request latency by device and operation (read, write)",
            "device",
            "operation",
            buckets=_FAST,
        )
        self.modbus_errors = declare.counter(
            "dispatch_edge_modbus_errors_total",
            "Modbus requests that failed, by device, operation and error code",
            "device",
            "operation",
            "code",
        )
        self.fsync_seconds = declare.histogram(
            "dispatch_edge_journal_commit_seconds",
            "Durable journal commits (COMMIT with synchronous=FULL, i.e. the fsyncs)",
            buckets=_FAST,
        )
        self.commit_writes = declare.histogram(
            "dispatch_edge_journal_commit_writes", "Journal writes per fsync", buckets=_WRITES
        )
        self.clock_offset = declare.gauge(
            "dispatch_edge_clock_offset_seconds",
            "Edge clock minus gateway clock, measured from the commands' sent_at",
        )
        self.acks_refused = declare.counter(
            "dispatch_edge_acks_refused_total", "Acks the gateway can never record (ack_refused)"
        )
        self.acks_awaiting = declare.gauge(
            "dispatch_edge_acks_awaiting_recording",
            "Acks not yet confirmed recorded by the gateway (ack_recorded)",
        )
        self.frames_rejected = declare.counter(
            "dispatch_edge_frames_rejected_total", "Unreadable frames answered `rejected`"
        )
        self.frames_unanswerable = declare.counter(
            "dispatch_edge_frames_unanswerable_total",
            "Gateway frames the edge could not read and could not name a command in",
        )
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve `/metrics` on a background thread; returns the bound port (0 picks one)."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        self._server, self._thread = server, thread
        return int(server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
