"""Placeholder until the edge agent lands (replaced by the edge branch)."""

from typing import Any


def register(sub: Any) -> None:
    return None
