"""Fixtures of the fault-injection suite: a private Redis with AOF, proxies, the checker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from faults_kit import PrivateRedis, stop_together
from faults_proxy import Proxy

from support import Processes, free_port


@pytest.fixture(autouse=True)
def _stop_together(processes: Processes) -> Iterator[None]:
    """Stop a scenario's processes together at teardown, before tests/conftest.py's
    `processes` stops them one by one (and then finds them gone)."""
    yield
    stop_together(processes.procs)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(free_port(), tmp_path / "redis")
    yield server
    server.kill()


@pytest.fixture
def proxies() -> Iterator[list[Proxy]]:
    made: list[Proxy] = []
    yield made
    for proxy in made:
        proxy.stop()
