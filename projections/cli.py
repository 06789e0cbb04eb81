"""`dispatch projector`: run the projector workers."""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

from dispatch.settings import Settings
from ledger.connection import connect
from ledger.store import Ledger
from projections.worker import Projector

log = logging.getLogger("projections.cli")


async def _run(settings: Settings) -> None:
    redis = connect(settings.redis_url, cluster=settings.redis_cluster)
    ledger = Ledger(redis, settings.ledger(), url=settings.redis_url)
    await ledger.start()
    try:
        await Projector(ledger, settings.database_url, retention=settings.retention()).run()
    finally:
        await ledger.close()
        await redis.aclose()


def cmd_projector(args: argparse.Namespace) -> int:
    settings = Settings.from_env().with_overrides(
        redis_url=args.redis_url, database_url=args.database_url
    )
    asyncio.run(_run(settings))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "projector",
        help="run the projector workers (audit tables, timeout verdicts)",
        description="Project the ledger into PostgreSQL audit tables and reach the "
        "timeout/expiry verdicts. Run several for scale: they share the partitions.",
    )
    p.add_argument("--redis-url", help="default: DISPATCH_REDIS_URL or redis://127.0.0.1:6379/0")
    p.add_argument(
        "--database-url", help="default: DISPATCH_DATABASE_URL or postgresql://127.0.0.1:5432/test"
    )
    p.set_defaults(func=cmd_projector)
