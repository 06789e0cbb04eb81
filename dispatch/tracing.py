"""OpenTelemetry tracing of one command across the gateway and the edge agent.

Off unless `OTEL_TRACES_EXPORTER` names an exporter (`console`, `file`, `otlp`); the
standard `OTEL_*` variables apply (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
`OTEL_TRACES_SAMPLER`, `OTEL_SDK_DISABLED`, the OTLP exporter's own). `file` writes one
JSON object per span to `DISPATCH_TRACES_FILE` (default `dispatch-traces.jsonl`).

Processes are linked by the W3C `traceparent` the command carries: a dashboard may send
one; the gateway's admission span becomes the parent of everything after it, and the
gateway stores that span's `traceparent` in the command the edge receives. When off,
every helper here costs one boolean test.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, TextIO

import msgspec

log = logging.getLogger("dispatch.tracing")
TRACES_FILE_DEFAULT = "dispatch-traces.jsonl"
EXPORTERS = ("none", "console", "file", "otlp")
TRACED_COMMANDS = frozenset({"gateway", "edge", "projector"})  # the long-running processes

_tracer: Any = None  # opentelemetry.trace.Tracer once configured
_provider: Any = None
_NOOP: AbstractContextManager[str | None] = contextlib.nullcontext(None)


class TracingError(ValueError):
    """The OTEL_* configuration cannot be honoured; the message says what to change."""


class _Traced(msgspec.Struct):
    traceparent: str | None = None


_TRACED = msgspec.json.Decoder(_Traced)


def enabled() -> bool:
    return _tracer is not None


def configure(service: str, env: Mapping[str, str] | None = None) -> bool:
    """Set up tracing for this process from OTEL_* variables; True when it is on."""
    global _tracer, _provider  # noqa: PLW0603 (one provider per process)
    env = os.environ if env is None else env
    exporter_name = env.get("OTEL_TRACES_EXPORTER", "none").strip().lower() or "none"
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true" or exporter_name == "none":
        return False
    if exporter_name not in EXPORTERS:
        raise TracingError(
            f"OTEL_TRACES_EXPORTER={exporter_name!r} is not supported; use one of {', '.join(EXPORTERS)}"
        )
    from opentelemetry import trace  # noqa: PLC0415 (only when tracing is on)
    from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import (  # noqa: PLC0415
        BatchSpanProcessor,
        SimpleSpanProcessor,
    )

    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME") or service})
    provider = TracerProvider(resource=resource)
    if exporter_name == "otlp":
        provider.add_span_processor(BatchSpanProcessor(_otlp_exporter()))
    else:
        # Console and file exporters write as each span ends: nothing lost at exit.
        provider.add_span_processor(SimpleSpanProcessor(_local_exporter(exporter_name, env)))
    atexit.register(provider.shutdown)
    _provider = provider
    _tracer = trace.get_tracer("dispatch", tracer_provider=provider)
    log.info("tracing.enabled exporter=%s service=%s", exporter_name, service)
    return True


def _local_exporter(name: str, env: Mapping[str, str]) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter  # noqa: PLC0415

        return ConsoleSpanExporter(out=sys.stdout)
    return JsonLinesExporter(env.get("DISPATCH_TRACES_FILE") or TRACES_FILE_DEFAULT)


def _otlp_exporter() -> Any:
    try:
        module = importlib.import_module("opentelemetry.exporter.otlp.proto.http.trace_exporter")
    except ImportError:
        raise TracingError(
            "OTEL_TRACES_EXPORTER=otlp needs the OTLP exporter: "
            "pip install opentelemetry-exporter-otlp-proto-http (or use console/file)"
        ) from None
    return module.OTLPSpanExporter()


def shutdown() -> None:
    """Flush and stop this process's tracing (tests configure several times)."""
    global _tracer, _provider  # noqa: PLW0603
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None


class JsonLinesExporter:
    """Span exporter writing one JSON object per span (append mode, shared by processes)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._out: TextIO | None = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def export(self, spans: Sequence[Any]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult  # noqa: PLC0415

        lines = "".join(json.dumps(_span_record(s), separators=(",", ":")) + "\n" for s in spans)
        with self._lock:
            if self._out is None:
                return SpanExportResult.FAILURE
            self._out.write(lines)  # one write per batch: lines of processes do not mix
            self._out.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            if self._out is not None:
                self._out.close()
                self._out = None

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


def _span_record(span: Any) -> dict[str, Any]:
    ctx = span.get_span_context()
    parent = span.parent
    return {
        "name": span.name,
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_span_id": f"{parent.span_id:016x}" if parent is not None else None,
        "service": span.resource.attributes.get("service.name"),
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "attributes": dict(span.attributes or {}),
    }


# -- helpers used on the command's path --------------------------------------------------------
def _parent(traceparent: str | None) -> Any:
    from opentelemetry.trace.propagation.tracecontext import (  # noqa: PLC0415
        TraceContextTextMapPropagator,
    )

    if not traceparent:
        return None
    return TraceContextTextMapPropagator().extract({"traceparent": traceparent})


def _traceparent_of(span: Any) -> str | None:
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def span(
    name: str, traceparent: str | None, **attributes: str | int | float | bool
) -> AbstractContextManager[str | None]:
    """A span named `name`, child of `traceparent`; yields its own traceparent (None: off)."""
    if _tracer is None:
        return _NOOP
    return _span(name, traceparent, attributes)


@contextlib.contextmanager
def _span(
    name: str, traceparent: str | None, attributes: dict[str, str | int | float | bool]
) -> Iterator[str | None]:
    with _tracer.start_as_current_span(
        name, context=_parent(traceparent), attributes=attributes
    ) as current:
        yield _traceparent_of(current)


def record(
    name: str,
    traceparent: str | None,
    *,
    start_ns: int,
    end_ns: int | None = None,
    **attributes: str | int | float | bool,
) -> None:
    """A span that already happened (e.g. the time a command waited in a queue)."""
    if _tracer is None:
        return
    done = _tracer.start_span(
        name, context=_parent(traceparent), attributes=attributes, start_time=start_ns
    )
    done.end(end_time=end_ns or time.time_ns())


def traceparent_in(body: bytes) -> str | None:
    """The `traceparent` of an encoded command (None when absent or tracing is off)."""
    if _tracer is None:
        return None
    try:
        return _TRACED.decode(body).traceparent
    except msgspec.DecodeError:
        return None


def trace_id(traceparent: str | None) -> str:
    """The trace id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`), or ''."""
    if not traceparent:
        return ""
    parts = traceparent.split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else ""
