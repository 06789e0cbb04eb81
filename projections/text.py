"""Text PostgreSQL cannot hold, made storable: NUL and lone surrogates become escapes.

A `text` column refuses NUL (0x00) and UTF-8 cannot carry a lone surrogate. Such a
character is stored in the audit's derived columns as its JSON escape (`\\u0000`,
`\\udXXX`, six ASCII characters); the event's `payload` keeps the ledger's bytes
exactly, where the same escapes are JSON's own, so the original is never lost.
"""

from __future__ import annotations

import re
from typing import Any

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def pg_text(value: str) -> str:
    """`value` with NUL and lone surrogates escaped (unchanged, cheaply, when clean)."""
    if value.isascii() and "\x00" not in value:
        return value
    return _UNSTORABLE.sub(_escape, value)


def pg_value(value: Any) -> Any:
    """`pg_text` applied to every string inside a JSON-like value."""
    if isinstance(value, str):
        return pg_text(value)
    if isinstance(value, dict):
        return {pg_text(k): pg_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [pg_value(v) for v in value]
    return value
