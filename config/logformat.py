"""Log set-up for every process: plain text for people, JSON lines for log shippers.

`DISPATCH_LOG_FORMAT=json` writes one JSON object per line with `ts`, `level`, `logger`,
`message`, `event` (the dotted first word), the message's own `key=value` pairs as
string fields (`command_id`, `edge_id`, `status`, `elapsed_ms`, `trace_id`, ...; empty
ones left out), fields a line passes in `extra`, and `exc` for a traceback. Anything else (the default, `text`) keeps the plain format.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
FORMATS = ("text", "json")
# `key=value` pairs of the project's log lines (values without spaces, or quoted).
_PAIR = re.compile(r"(?:^|\s)([a-z_][a-z0-9_]*)=('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|\S*)")
# Attributes every LogRecord has: whatever else is on a record came from `extra`.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class TextFormatter(logging.Formatter):
    """`TEXT_FORMAT` as `logging.Formatter` writes it, with the time's text made once a
    second: a gateway writes a line per lifecycle event, and `strftime` for each was a
    sixth of a line's cost."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self._second = -1
        self._text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._text = time.strftime(self.default_time_format, self.converter(record.created))
        return f"{self._text},{int(record.msecs):03d}"  # default_msec_format, "%s,%03d"


class JsonFormatter(logging.Formatter):
    """One JSON object per record; fields from `extra` and from `key=value` pairs."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        event = message.split(" ", 1)[0]
        if "." in event and "=" not in event:
            line["event"] = event
        for key, raw in _PAIR.findall(message):
            if raw:  # `trace_id=` with nothing after it: the field is absent
                line.setdefault(key, _unquote(raw))
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_") and value is not None:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, separators=(",", ":"))


def _unquote(raw: str) -> str:
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        return raw[1:-1]
    return raw


def log_format(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    chosen = (env.get("DISPATCH_LOG_FORMAT") or "text").strip().lower()
    if chosen not in FORMATS:
        print(
            f"dispatch: DISPATCH_LOG_FORMAT={chosen!r} is not one of {', '.join(FORMATS)}; "
            "logging as text",
            file=sys.stderr,
        )
        return "text"
    return chosen


def configure(*, verbose: bool = False, env: Mapping[str, str] | None = None) -> None:
    """Log to stderr at INFO (DEBUG when verbose) in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format(env) == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    # No format here shows threads, processes or the calling line: skip looking them up
    # for every record (the logging HOWTO's "Optimization").
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
