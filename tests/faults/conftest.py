"""Fixtures of the fault-injection suite: a private Redis with AOF, proxies, the checker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from faults_kit import PrivateRedis, stop_together
from faults_proxy import Proxy

from support import Processes, free_port


@pytest.fixture
def processes(
    env: dict[str, str], tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Processes]:
    """tests/conftest.py's fixture, stopping the processes together at teardown."""
    procs = Processes(env, tmp_path)
    yield procs
    stop_together(procs.procs)
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        for proc in procs.procs:
            print(f"----- {proc.name} log -----\n{proc.log()[-4000:]}")


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
