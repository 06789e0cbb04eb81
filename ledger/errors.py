"""The ledger's exceptions: Redis errors are translated here, in one place."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from redis import exceptions as redis_errors


class LedgerError(Exception):
    """Base of everything the ledger raises."""


class LedgerUnavailable(LedgerError):
    """Redis cannot be reached or answered with an error we cannot act on."""


@asynccontextmanager
async def translated(action: str, url: str = "") -> AsyncIterator[None]:
    """Turn redis-py errors into `LedgerUnavailable` with a message that says what to do."""
    try:
        yield
    except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
        where = f" at {url}" if url else ""
        raise LedgerUnavailable(
            f"{action}: Redis{where} did not answer ({exc}); start Redis or set DISPATCH_REDIS_URL"
        ) from exc
