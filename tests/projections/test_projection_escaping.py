"""The documented escapes: text PostgreSQL cannot hold, and CSV cells a spreadsheet runs."""

from __future__ import annotations

import pytest

from projections.queries import csv_cell, csv_line
from projections.text import pg_text, pg_value


@pytest.mark.parametrize(
    ("text", "stored"),
    [
        ("plain", "plain"),
        ("a\x00b", "a\\u0000b"),
        ("\ud800x\udfff", "\\ud800x\\udfff"),
        ("žluťoučký\x00", "žluťoučký\\u0000"),
        ("\x01\x1b\u2028", "\x01\x1b\u2028"),  # PostgreSQL holds these: unchanged
    ],
)
def test_text_postgresql_cannot_hold_is_escaped_not_dropped(text: str, stored: str) -> None:
    assert pg_text(text) == stored
    assert pg_text(stored) == stored  # idempotent: stored text is already storable
    assert pg_value({"k\x00": ["x\x00", 1, None]}) == {"k\\u0000": ["x\\u0000", 1, None]}


@pytest.mark.parametrize("start", ["=", "+", "-", "@", "\t", "\r"])
def test_csv_cells_starting_a_formula_get_a_quote(start: str) -> None:
    assert csv_cell(f"{start}1+2") == f"'{start}1+2"


def test_csv_keeps_numbers_and_plain_text() -> None:
    assert csv_cell(-5000) == -5000
    assert csv_cell(None) == ""
    assert csv_cell("a=b") == "a=b"
    assert csv_line(["=x", -1, "a\x00"]) == "'=x,-1,a\\u0000\r\n"
