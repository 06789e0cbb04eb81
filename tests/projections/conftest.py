"""Projection tests run twice: on native partitions (the machine's PostgreSQL) and on a
private TimescaleDB cluster started once per session (tests/timescale.py).

The ledger waits an hour for acknowledgments: load-generated commands left
`routed`/`delivered` must keep their status while a test projects and counts them; a 10 s
ack timeout would let the projector's verdict loop turn them into `timed_out` halfway
through.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import replace

import pytest
import timescale
from projection_support import NATIVE, TIMESCALE, StorageServer, drop_schemas
from redis.asyncio import Redis

from dispatch.settings import Settings
from ledger.store import Ledger

from support import DATABASE_URL

# Modules that are not about the audit storage run once, on the machine's PostgreSQL.
SINGLE_STORAGE = {"test_replay", "test_projection_load"}  # the 10,000-command load: once
# Slow tests of what does not depend on the storage (process kills, the CLI's printing):
# the storage-specific paths they cross are covered by the cheaper doubled tests.
SINGLE_STORAGE_TESTS = {
    "test_projector_killed_mid_batch_resumes_without_gap_or_duplicate",
    "test_audit_command_line",
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "storage" in metafunc.fixturenames:
        # Tests that use the TimescaleDB server by name run once, beside the native one.
        single = (
            metafunc.module.__name__.rsplit(".", 1)[-1] in SINGLE_STORAGE
            or metafunc.function.__name__ in SINGLE_STORAGE_TESTS
            or "timescale_server" in metafunc.fixturenames
        )
        names = [NATIVE] if single else [NATIVE, TIMESCALE]
        metafunc.parametrize("storage", names, indirect=True)


@pytest.fixture(scope="session")
def timescale_clusters() -> Iterator[timescale.Clusters]:
    reason = timescale.unavailable_reason()
    if reason is not None:
        pytest.skip(f"TimescaleDB storage not tested: {reason}")
    with timescale.clusters() as made:
        yield made


@pytest.fixture(scope="session")
def timescale_server(timescale_clusters: timescale.Clusters) -> str:
    """The session's TimescaleDB cluster (preloaded, Apache edition): its database URL."""
    return timescale_clusters.start().url


@pytest.fixture
def storage(request: pytest.FixtureRequest) -> StorageServer:
    if request.param == TIMESCALE:
        return StorageServer(TIMESCALE, request.getfixturevalue("timescale_server"))
    return StorageServer(NATIVE, DATABASE_URL)


@pytest.fixture
def env(env: dict[str, str], storage: StorageServer, namespace: str) -> Iterator[dict[str, str]]:
    yield {**env, "DISPATCH_DATABASE_URL": storage.url}
    if storage.url != DATABASE_URL:
        drop_schemas(storage.url, namespace)


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
