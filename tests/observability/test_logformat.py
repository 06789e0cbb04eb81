"""DISPATCH_LOG_FORMAT=json: one parseable object per line with the line's fields."""

from __future__ import annotations

import json
import logging

import pytest

from config import logformat, tracing
from config.settings import Settings, SettingsError


def record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    rec = logging.makeLogRecord({"name": "gateway.edges", "levelname": "INFO", "msg": message})
    rec.args = args
    rec.__dict__.update(extra)
    return rec


def test_json_lines_carry_message_pairs_and_extra_fields() -> None:
    line = logformat.JsonFormatter().format(
        record(
            "command.transition command_id=%s status=%s reason=%r",
            "cmd_1",
            "executed",
            "two words",
            trace_id="ab" * 16,
        )
    )
    parsed = json.loads(line)
    assert parsed["event"] == "command.transition"
    assert parsed["command_id"] == "cmd_1" and parsed["status"] == "executed"
    assert parsed["reason"] == "two words"
    assert parsed["trace_id"] == "ab" * 16
    assert parsed["logger"] == "gateway.edges" and parsed["level"] == "INFO"


def test_unknown_format_falls_back_to_text_and_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    assert logformat.log_format({"DISPATCH_LOG_FORMAT": "xml"}) == "text"
    assert "DISPATCH_LOG_FORMAT='xml'" in capsys.readouterr().err
    assert logformat.log_format({"DISPATCH_LOG_FORMAT": "JSON"}) == "json"


def test_bad_observability_settings_are_refused_with_the_variable_named() -> None:
    with pytest.raises(SettingsError, match="DISPATCH_METRICS_TOP_EDGES"):
        Settings(jwt_secret="x" * 40, metrics_top_edges=5000)
    with pytest.raises(SettingsError, match="DISPATCH_METRICS_INTERVAL_S"):
        Settings(jwt_secret="x" * 40, metrics_interval_s=0)
    with pytest.raises(tracing.TracingError, match="OTEL_TRACES_EXPORTER"):
        tracing.configure("x", {"OTEL_TRACES_EXPORTER": "zipkin"})
    assert not tracing.configure("x", {})  # off by default
    assert not tracing.enabled()


@pytest.mark.parametrize("created", [1_795_000_000.0, 1_795_000_000.999, 1_795_000_001.0005])
def test_text_lines_are_what_the_standard_formatter_writes(created: float) -> None:
    ours, standard = logformat.TextFormatter(), logging.Formatter(logformat.TEXT_FORMAT)
    for at in (created - 1, created, created + 0.4, created):  # across second boundaries
        rec = record("command.transition command_id=%s", "cmd_1")
        rec.created, rec.msecs = at, int((at - int(at)) * 1000)
        assert ours.format(rec) == standard.format(rec)
