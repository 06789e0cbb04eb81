"""Fixtures: every test gets its own Redis namespace and PostgreSQL schema."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from redis.asyncio import Redis

from config.settings import Settings
from ledger.store import Ledger

from support import DATABASE_URL, REDIS_URL, SECRET, Processes, drop_namespace


def _check_services() -> None:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except Exception as exc:
        pytest.exit(
            f"Redis at {REDIS_URL} does not answer ({exc}); run `make test` or start Redis", 2
        )
    try:
        psycopg.connect(DATABASE_URL, connect_timeout=3).close()
    except Exception as exc:
        pytest.exit(f"PostgreSQL at {DATABASE_URL} does not answer ({exc}); run `make test`", 2)


def pytest_sessionstart(session: pytest.Session) -> None:
    _check_services()


@pytest.fixture
def namespace() -> Iterator[str]:
    ns = f"t{uuid.uuid4().hex[:10]}"
    yield ns
    drop_namespace(ns)


@pytest.fixture
def env(namespace: str, tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "DISPATCH_NAMESPACE": namespace,
        "DISPATCH_JWT_SECRET": SECRET,
        "DISPATCH_REDIS_URL": REDIS_URL,
        "DISPATCH_DATABASE_URL": DATABASE_URL,
        "DISPATCH_PARTITIONS": "4",
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "PYTHONUNBUFFERED": "1",
        # Only tests/security meets rate limits (it sets its own); nothing else is throttled.
        "DISPATCH_RATE_USER_PER_S": "100000",
        "DISPATCH_RATE_USER_BURST": "100000",
        "DISPATCH_RATE_EDGE_PER_S": "100000",
        "DISPATCH_RATE_EDGE_BURST": "100000",
        "DISPATCH_RATE_GLOBAL_PER_S": "100000",
        "DISPATCH_RATE_GLOBAL_BURST": "100000",
    }


@pytest.fixture
def settings(env: dict[str, str]) -> Settings:
    return Settings.from_env(env)


@pytest.fixture
async def ledger(settings: Settings) -> AsyncIterator[Ledger]:
    client = Redis.from_url(settings.redis_url)
    led = Ledger(client, settings.ledger(), url=settings.redis_url)
    await led.start()
    yield led
    await led.close()
    await client.aclose()


@pytest.fixture
def processes(
    env: dict[str, str], tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Processes]:
    procs = Processes(env, tmp_path)
    yield procs
    procs.stop_all()
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        for proc in procs.procs:
            print(f"----- {proc.name} log -----\n{proc.log()[-4000:]}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    report = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report
