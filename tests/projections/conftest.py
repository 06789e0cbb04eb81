"""Projection tests: the ledger waits an hour for acknowledgments.

Load-generated commands left `routed`/`delivered` must keep their status while a test
projects and counts them; a 10 s ack timeout would let the projector's verdict loop turn
them into `timed_out` halfway through.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from redis.asyncio import Redis

from dispatch.settings import Settings
from ledger.store import Ledger


@pytest.fixture
async def ledger(settings: Settings) -> AsyncIterator[Ledger]:
    client = Redis.from_url(settings.redis_url)
    led = Ledger(
        client, replace(settings.ledger(), ack_timeout_ms=3_600_000), url=settings.redis_url
    )
    await led.start()
    yield led
    await led.close()
    await client.aclose()
