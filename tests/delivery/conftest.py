"""Fixtures of the delivery-guarantee tests: a ledger whose script clock tests can shift."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from delivery_clock import Clock
from redis.asyncio import Redis

from config.settings import Settings
from ledger.store import Ledger


@pytest.fixture
async def clocked(settings: Settings) -> AsyncIterator[tuple[Ledger, Clock]]:
    client = Redis.from_url(settings.redis_url)
    led = Ledger(client, settings.ledger(), url=settings.redis_url)
    await led.start()
    yield led, Clock(led)
    await led.close()
    await client.aclose()
