"""The edge's view of the gateway's clock.

Each command frame carries `sent_at` (the gateway's clock at send). `received - sent_at`
is the clock offset plus the network latency; latency is never negative, so the minimum
over recent frames is the best estimate of the offset alone. Expiry is judged on the
frame's `remaining_ms` with the edge's monotonic clock, so a wrong wall clock can neither
expire a valid command nor keep a stale one alive; the offset corrects the `executed_at`
the edge reports, so the audit holds times on the gateway's timeline.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime, timedelta

from edge.frames import utc_now

log = logging.getLogger("edge.clock")

WallClock = Callable[[], datetime]
_WINDOW = 16  # frames the minimum is taken over: old samples age out as the clock drifts


class ClockOffset:
    """Edge clock minus gateway clock, smoothed over the last frames that carried `sent_at`."""

    def __init__(self, *, limit_s: float, wall: WallClock = utc_now) -> None:
        self.limit_s = limit_s
        self.wall = wall
        self._samples: deque[float] = deque(maxlen=_WINDOW)
        self._alarm = False

    @property
    def offset_s(self) -> float | None:
        return min(self._samples) if self._samples else None

    @property
    def offset_ms(self) -> int | None:
        offset = self.offset_s
        return None if offset is None else round(offset * 1000)

    @property
    def beyond_limit(self) -> bool:
        offset = self.offset_s
        return offset is not None and abs(offset) > self.limit_s

    def observe(self, sent_at: datetime, received: datetime) -> float:
        """Take one frame's sample; returns the smoothed offset (s). Alarms past the limit."""
        self._samples.append((received - sent_at).total_seconds())
        offset = min(self._samples)
        if abs(offset) > self.limit_s and not self._alarm:
            self._alarm = True
            log.error(
                "edge.clock.skew_alarm offset_s=%.3f limit_s=%g: this edge's clock is off by "
                "more than the limit; control commands are refused with clock_skew until it "
                "is fixed (check NTP/chrony on the edge host)",
                offset,
                self.limit_s,
            )
        elif abs(offset) <= self.limit_s and self._alarm:
            self._alarm = False
            log.warning("edge.clock.skew_cleared offset_s=%.3f limit_s=%g", offset, self.limit_s)
        return offset

    def gateway_now(self) -> datetime:
        """Now on the gateway's timeline: the edge clock corrected by the measured offset."""
        offset = self.offset_s
        now = self.wall()
        return now if offset is None else now - timedelta(seconds=offset)


def deadline(remaining_ms: int | None, received_mono: float) -> float | None:
    """The monotonic time a command expires at, from the lifetime the gateway handed over."""
    return None if remaining_ms is None else received_mono + remaining_ms / 1000


def monotonic() -> float:
    return time.monotonic()
