"""Fixtures of the replay tests: recorded live sites are closed at teardown."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from replay_kit import Site


@pytest.fixture
async def sites() -> AsyncIterator[list[Site]]:
    opened: list[Site] = []
    yield opened
    for site in opened:
        await site.close()
