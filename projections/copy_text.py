"""PostgreSQL COPY text format, built in Python for a whole batch at once.

The projector writes every batch with one `copy.write()` of text it formats itself:
psycopg's `write_row` costs a Python call and a per-value dump for each row, which
was the largest share of the projector's CPU. The format (PostgreSQL's COPY TEXT):
columns separated by TAB, rows ended by LF, NULL as `\\N`, and in values a backslash,
TAB, LF and CR written as `\\\\`, `\\t`, `\\n`, `\\r`. Every other character goes as is
(the connection's encoding is UTF-8). Text PostgreSQL cannot hold (NUL, lone
surrogates) is made storable first (projections/text.py).
"""

from __future__ import annotations

import functools
from datetime import date, datetime
from typing import Any

from ledger.records import to_utc
from projections.text import pg_text

NULL = "\\N"
_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def text(value: str) -> str:
    """One text value, storable and escaped for COPY (unchanged, cheaply, when clean)."""
    if value.isprintable() and "\\" not in value:
        return value  # no TAB, LF, CR, NUL or lone surrogate, no backslash
    return pg_text(value).translate(_ESCAPES)


def clean(*values: str) -> bool:
    """True when none of `values` needs escaping (one scan for a row's texts)."""
    joined = "".join(values)
    return joined.isprintable() and "\\" not in joined


def json_text(raw: bytes) -> str:
    """The ledger's JSON bytes as a COPY value: unchanged but for backslashes (JSON's own
    escapes) and the whitespace TAB/LF/CR that JSON allows between tokens."""
    value = raw.decode()
    if "\\" in value:
        value = value.replace("\\", "\\\\")
    if "\n" in value or "\r" in value or "\t" in value:
        value = value.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return value


@functools.lru_cache(maxsize=8192)
def timestamp(ms: int) -> str:
    """A ledger time (ms since the epoch, UTC) as timestamptz text."""
    return to_utc(ms).isoformat()


def value(v: Any) -> str:
    """Any value of a row (text, number, bool, time, None) as a COPY value."""
    if v is None:
        return NULL
    if isinstance(v, str):
        return text(v)
    return _plain(v)


def _plain(v: Any) -> str:
    """A value that is not text (or is text known to need no escaping)."""
    if v is None:
        return NULL
    if isinstance(v, bool):
        return "t" if v else "f"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, datetime | date):
        return v.isoformat()
    return str(v)


def row(values: tuple[Any, ...], *, clean: bool = False) -> str:
    """One row, LF-terminated; `clean`: the caller knows no text in it needs escaping."""
    if clean:
        return "\t".join([v if v.__class__ is str else _plain(v) for v in values]) + "\n"
    return "\t".join([value(v) for v in values]) + "\n"
