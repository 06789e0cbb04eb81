"""Event ids: time-ordered, unique across processes without coordination."""

from __future__ import annotations

import os
import time


def new_event_id() -> str:
    """48-bit ms timestamp + 64 random bits, hex: sorts by creation time."""
    return f"{time.time_ns() // 1_000_000:012x}{os.urandom(8).hex()}"
