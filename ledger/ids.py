"""Event ids: time-ordered, unique across processes without coordination."""

from __future__ import annotations

import itertools
import os
import time

# 32 random bits per process plus a counter: unique without a system call per id.
_PROCESS = os.urandom(4).hex()
_COUNTER = itertools.count()


def new_event_id() -> str:
    """48-bit ms timestamp, process tag, 24-bit counter, hex: sorts by creation time."""
    return f"{time.time_ns() // 1_000_000:012x}{_PROCESS}{next(_COUNTER) & 0xFFFFFF:06x}"
