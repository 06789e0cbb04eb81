"""`dispatch projector` (run or rebuild the audit tables) and `dispatch audit` (query them)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TextIO

import msgspec
from psycopg import AsyncConnection, sql
from redis.exceptions import ConnectionError as RedisConnectionError

from config.settings import Settings
from ledger.connection import connect
from ledger.errors import LedgerError
from ledger.keys import Keys
from ledger.store import Ledger
from ledger.tasks import run_together
from projections import ledger_gaps, queries, rebuild, reconcile, reconcile_loop, stats, verify
from projections.schema import Roles, SchemaError, storage_of
from projections.worker import Database, Projector, ProjectorConfig

MAX_LANES = 16  # writers per projector process (each holds a PostgreSQL connection)

_encode = msgspec.json.Encoder().encode


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env().with_overrides(
        redis_url=getattr(args, "redis_url", None), database_url=getattr(args, "database_url", None)
    )


def roles_of(settings: Settings) -> Roles:
    return Roles.for_prefix(settings.db_role_prefix or settings.namespace)


def database_of(settings: Settings) -> Database:
    return Database(
        settings.database_url, roles_of(settings), writer_url=settings.projector_database_url
    )


def _fail(message: str) -> int:
    print(f"dispatch: {message}", file=sys.stderr)
    return 1


def _run(coro: Coroutine[Any, Any, int]) -> int:
    try:
        return asyncio.run(coro)
    except (SchemaError, LedgerError, queries.QueryError, LookupError) as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"{exc}; check DISPATCH_DATABASE_URL and DISPATCH_REDIS_URL")


# -- dispatch projector -------------------------------------------------------------------
async def _projector(settings: Settings, args: argparse.Namespace) -> int:
    redis = connect(settings.redis_url, cluster=settings.redis_cluster)
    ledger = Ledger(redis, settings.ledger(), url=settings.redis_url)
    await ledger.start()
    try:
        if args.rebuild:
            return await _rebuild(ledger, settings, args)
        config = ProjectorConfig(
            batch=args.batch,
            lanes=args.lanes,
            retention_days=settings.audit_retention_days,
            metrics_port=settings.projector_metrics_port,
        )
        projector = Projector(
            ledger,
            settings.database_url,
            config,
            writer_url=settings.projector_database_url,
            roles=roles_of(settings),
            retention=settings.retention(),
        )
        if args.migrate:
            kind = await projector.migrate()
            print(f"audit schema {settings.namespace!r} is up to date (storage: {kind})")
            return 0
        # Reconciliation runs beside the projector, on the logs it holds (docs/audit.md).
        checks = reconcile_loop.ReconcileLoop(
            reconcile.Reconciler(
                redis, ledger.keys, settings.namespace, retain_log_s=settings.retain_log_s
            ),
            lambda: projector.database.connect_writer(
                f"dispatch-reconcile:{settings.namespace}:{projector.owner}"
            ),
            lambda: (
                reconcile_loop.held_streams(ledger.keys, projector.leases.held)
                if projector.storage
                else []
            ),
            interval_s=settings.reconcile_interval_s,
        )
        await run_together(projector.run(), checks.run())
        return 0
    finally:
        await ledger.close()
        await redis.aclose()


async def _rebuild(ledger: Ledger, settings: Settings, args: argparse.Namespace) -> int:
    database = database_of(settings)
    report = await rebuild.rebuild(
        ledger, database, batch=args.batch, retention_days=settings.audit_retention_days
    )
    print(
        f"rebuilt {report.events} events from {report.streams} streams into schema "
        f"{report.schema!r} in {report.seconds:.1f} s"
    )
    conn = await AsyncConnection.connect(settings.database_url, autocommit=True)
    try:
        live = settings.namespace
        try:
            comparison = await rebuild.compare(conn, live, report.schema)
        except Exception as exc:  # no live tables yet
            print(f"no live tables to compare with ({type(exc).__name__})")
            comparison = None
        if comparison is not None:
            for table, count in comparison.rows.items():
                print(
                    f"  {table}: {count} rows rebuilt, {comparison.only_live[table]} only in the "
                    f"live table, {comparison.only_rebuilt[table]} only in the rebuilt one"
                )
            print(
                "identical to the live tables"
                if comparison.equal
                else "differs from the live tables"
            )
        lost = comparison.missing_events if comparison is not None else 0
        if args.swap and lost and not args.force:
            print(
                f"not swapped: the live tables hold {lost} events the retained log no longer "
                "has (trimmed by retention); swapping would drop them from the audit history. "
                "Add --force to swap anyway.",
                file=sys.stderr,
            )
            return 1
        if args.swap:
            previous = await rebuild.swap(conn, live, report.schema)
            note = f"; the previous tables are in schema {previous!r}" if previous else ""
            print(f"swapped the rebuilt tables in as schema {live!r}{note}")
    finally:
        await conn.close()
    return 0


def cmd_projector(args: argparse.Namespace) -> int:
    if args.swap and not args.rebuild:
        return _fail("--swap only applies with --rebuild")
    if args.migrate and args.rebuild:
        return _fail("give --migrate or --rebuild, not both")
    if args.batch < 1:
        return _fail(f"--batch {args.batch}: give at least 1 event per transaction")
    if not 1 <= args.lanes <= MAX_LANES:
        return _fail(f"--lanes {args.lanes}: give 1 to {MAX_LANES} writers per process")
    return _run(_projector(_settings(args), args))


# -- dispatch audit -------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def _reader(settings: Settings) -> AsyncIterator[AsyncConnection]:
    conn = await AsyncConnection.connect(
        settings.database_url, autocommit=True, application_name="dispatch-audit"
    )
    try:
        with contextlib.suppress(Exception):
            # Read-only when the connecting user may act as the reader role.
            await conn.execute(
                sql.SQL("SET ROLE {}").format(sql.Identifier(roles_of(settings).reader))
            )
        yield conn
    finally:
        await conn.close()


def _params(args: argparse.Namespace, names: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            out[name] = str(value)
    return out


COMMAND_FILTERS = (
    "edge_id",
    "source",
    "user",
    "status",
    "command_type",
    "since",
    "until",
    "limit",
    "cursor",
)
REFUSAL_FILTERS = ("edge_id", "user", "code", "since", "until", "limit", "cursor")

LIST_COLUMNS = (
    ("issued_at", 24),
    ("command_id", 20),
    ("edge_id", 18),
    ("command_type", 12),
    ("channel", 16),
    ("value", 10),
    ("actor", 16),
    ("status", 10),
    ("error_code", 14),
    ("total_ms", 8),
)
REFUSAL_LIST_COLUMNS = (
    ("at", 24),
    ("edge_id", 18),
    ("command_id", 20),
    ("actor", 30),
    ("error_code", 16),
    ("error_message", 50),
)


def _cell(value: Any, width: int) -> str:
    text = "" if value is None else str(value)
    return (text if len(text) <= width else text[: width - 1] + "…").ljust(width)


def _table(rows: list[dict[str, Any]], columns: tuple[tuple[str, int], ...], out: TextIO) -> None:
    print(" ".join(_cell(name, width) for name, width in columns).rstrip(), file=out)
    for row in rows:
        print(" ".join(_cell(row.get(name), width) for name, width in columns).rstrip(), file=out)


async def _audit_list(settings: Settings, args: argparse.Namespace) -> int:
    refusals = args.audit_command == "refusals"
    if refusals:
        rq = queries.RefusalQuery.from_params(_params(args, REFUSAL_FILTERS))
    else:
        cq = queries.AuditQuery.from_params(_params(args, COMMAND_FILTERS))
    async with _reader(settings) as conn:
        if refusals:
            page = await queries.list_refusals(conn, settings.namespace, rq, None)
        else:
            page = await queries.list_commands(conn, settings.namespace, cq, None)
    if args.json:
        key = "rejections" if refusals else "commands"
        sys.stdout.write(
            _encode(
                {key: page.rows, "count": len(page.rows), "next_cursor": page.next_cursor}
            ).decode()
            + "\n"
        )
        return 0
    _table(page.rows, REFUSAL_LIST_COLUMNS if refusals else LIST_COLUMNS, sys.stdout)
    print(f"({len(page.rows)} rows)")
    if page.next_cursor:
        print(f"more: add --cursor {page.next_cursor}")
    return 0


async def _audit_show(settings: Settings, args: argparse.Namespace) -> int:
    async with _reader(settings) as conn:
        row, events = await queries.show_command(conn, settings.namespace, args.command_id)
    if row is None and not events:
        return _fail(
            f"no command {args.command_id!r} in the audit tables of {settings.namespace!r}"
        )
    if args.json:
        sys.stdout.write(_encode({"command": row, "events": events}).decode() + "\n")
        return 0
    for key, value in (row or {}).items():
        print(f"{key:>16}: {'' if value is None else value}")
    print()
    _table(
        events,
        (("seq", 6), ("at", 24), ("status", 10), ("actor", 24), ("error_code", 14), ("hash", 16)),
        sys.stdout,
    )
    return 0


async def _audit_export(settings: Settings, args: argparse.Namespace) -> int:
    query = (
        queries.RefusalQuery.from_params(_params(args, REFUSAL_FILTERS), export=True)
        if args.refusals
        else queries.AuditQuery.from_params(_params(args, COMMAND_FILTERS), export=True)
    )
    out: TextIO = open(args.output, "w", newline="") if args.output else sys.stdout  # noqa: SIM115, ASYNC230
    count = 0
    try:
        async with _reader(settings) as conn:
            rows = queries.export_rows(conn, settings.namespace, query, None)

            async def counted() -> AsyncIterator[dict[str, Any]]:
                nonlocal count
                async for row in rows:
                    count += 1
                    yield row

            async for chunk in queries.encode_export(
                counted(), queries.export_columns(query), args.format
            ):
                out.write(chunk.decode())
    finally:
        if out is not sys.stdout:
            out.close()
    if args.output:
        print(f"exported {count} rows to {args.output}", file=sys.stderr)
    return 0


async def _audit_verify(settings: Settings, args: argparse.Namespace) -> int:
    async with _reader(settings) as conn, conn.transaction():
        # One snapshot: chain heads, links and gaps as of the same moment, whatever a
        # running projector commits meanwhile.
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        result = await verify.verify(
            conn, settings.namespace, chain=args.edge, commands=args.commands
        )
        gaps = await verify.quarantine_gaps(conn, settings.namespace)
        lost = await ledger_gaps.recorded(conn, settings.namespace)
    scope = f"edge {args.edge}" if args.edge else f"schema {settings.namespace}"
    checked = f"{result.events} events in {result.chains} chains"
    if args.commands:
        checked += f" and {result.commands} command rows"
    if result.ok:
        print(f"audit chain intact: {checked} of {scope} verified")
    else:
        print(f"audit chain BROKEN: {len(result.breaks)} chain(s) of {scope} fail ({checked} read)")
        for b in result.breaks:
            print(f"  first broken link: {b.line()}")
    if gaps:
        print(
            f"audit GAPS: {len(gaps)} log entries quarantined by the projector are not in "
            "the chains (their raw bytes are in the `quarantine` table):"
        )
        for gap in gaps:
            print(f"  quarantined: {gap.line()}")
    if lost:
        print(
            f"audit LEDGER GAPS: {len(lost)} run(s) of links are stored here but were lost by "
            "the ledger (Redis) after they were projected; the chains are whole, the audit is "
            "the only record of these events (`dispatch audit reconcile` names the commands):"
        )
        for run in lost:
            print(f"  ledger lost: {run.line()}")
    if not result.ok or ((gaps or lost) and args.fail_on_gaps):
        return 1
    return 0


async def _audit_reconcile(settings: Settings, args: argparse.Namespace) -> int:
    redis = connect(settings.redis_url, cluster=settings.redis_cluster)
    try:
        checker = reconcile.Reconciler(
            redis,
            Keys(settings.namespace, settings.partitions),
            settings.namespace,
            retain_log_s=settings.retain_log_s,
        )
        async with _reader(settings) as conn:
            if await storage_of(conn, settings.namespace) is None:
                return _fail(f"schema {settings.namespace!r} has no audit tables to reconcile")
            result = await checker.check(conn, full=True)
    except RedisConnectionError as exc:
        return _fail(f"cannot read the ledger ({exc}); check DISPATCH_REDIS_URL or --redis-url")
    finally:
        await redis.aclose()
    print("\n".join(reconcile.report(result, settings.namespace)))
    return 1 if result.gaps or result.skipped else 0


async def _audit_stats(settings: Settings, args: argparse.Namespace) -> int:
    query = stats.StatsQuery.from_params(_params(args, ("bucket", "edge_id", "since", "until")))
    async with _reader(settings) as conn:
        buckets = await stats.stats(conn, settings.namespace, query, None)
    if args.json:
        sys.stdout.write(_encode({"bucket": query.bucket, "buckets": buckets}).decode() + "\n")
        return 0
    for b in buckets:
        counts = " ".join(f"{status}={n}" for status, n in sorted(b["statuses"].items()))
        print(f"{b['bucket']}  total={b['total']} final={b['final']}  {counts}")
    print(f"({len(buckets)} {query.bucket} buckets)")
    return 0


AUDIT_COMMANDS: dict[str, Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, int]]] = {
    "list": _audit_list,
    "refusals": _audit_list,
    "show": _audit_show,
    "export": _audit_export,
    "verify": _audit_verify,
    "stats": _audit_stats,
    "reconcile": _audit_reconcile,
}


def cmd_audit(args: argparse.Namespace) -> int:
    return _run(AUDIT_COMMANDS[args.audit_command](_settings(args), args))


def _database_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--database-url", help="default: DISPATCH_DATABASE_URL or postgresql://127.0.0.1:5432/test"
    )


def _command_filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--edge", dest="edge_id", metavar="EDGE", help="one edge")
    p.add_argument("--source", help="the command's `source` (as the sender claimed it)")
    p.add_argument("--user", help="the authenticated user who sent it")
    p.add_argument("--status", help="current status (e.g. executed, rejected, timed_out)")
    p.add_argument("--type", dest="command_type", metavar="TYPE", help="command type")
    p.add_argument("--since", metavar="TIME", help="issued at or after (ISO 8601 with zone)")
    p.add_argument("--until", metavar="TIME", help="issued before (ISO 8601 with zone)")


def _refusal_filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--edge", dest="edge_id", metavar="EDGE", help="the edge the input named")
    p.add_argument("--user", help="the authenticated user who sent it")
    p.add_argument("--code", help="error code (e.g. forbidden, malformed_json)")
    p.add_argument("--since", metavar="TIME", help="refused at or after (ISO 8601 with zone)")
    p.add_argument("--until", metavar="TIME", help="refused before (ISO 8601 with zone)")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "projector",
        help="run the projector workers (audit tables, timeout verdicts)",
        description="Project the ledger into PostgreSQL audit tables and reach the "
        "timeout/expiry verdicts. Run several for scale: they share the partitions. "
        "Migrations are applied at start with DISPATCH_DATABASE_URL; rows are written as "
        "the <prefix>_projector role (see docs/audit.md).",
    )
    p.add_argument("--redis-url", help="default: DISPATCH_REDIS_URL or redis://127.0.0.1:6379/0")
    _database_flag(p)
    p.add_argument(
        "--batch",
        type=int,
        default=2000,
        help="most events per stream per transaction (2000); a backlog fills batches, a quiet log does not wait for them",
    )
    p.add_argument(
        "--lanes",
        type=int,
        default=ProjectorConfig().lanes,
        help="writers per process, each with its own PostgreSQL connection and a share of "
        f"the held partitions ({ProjectorConfig().lanes}): one process overlaps its work "
        "with PostgreSQL's",
    )
    p.add_argument(
        "--migrate",
        action="store_true",
        help="apply the schema migrations (creating the roles) and exit",
    )
    p.add_argument(
        "--rebuild",
        action="store_true",
        help="project the whole retained log into fresh tables (<namespace>_rebuild), "
        "compare them with the live ones and exit",
    )
    p.add_argument(
        "--swap",
        action="store_true",
        help="with --rebuild: replace the live tables with the rebuilt ones "
        "(the old ones stay in <namespace>_old_<time>)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="with --swap: swap even when the live tables hold events the log no longer has",
    )
    p.set_defaults(func=cmd_projector)

    a = sub.add_parser(
        "audit",
        help="query the audit history (list, show, export, refusals, verify, stats)",
        description="Read the projected audit tables in PostgreSQL (DISPATCH_DATABASE_URL, "
        "schema = DISPATCH_NAMESPACE).",
    )
    asub = a.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    lst = asub.add_parser("list", help="commands, newest first, one page")
    _command_filters(lst)
    lst.add_argument("--limit", type=int, default=50, help="rows per page (1-1000, 50)")
    lst.add_argument("--cursor", help="continue after a previous page")
    lst.add_argument("--json", action="store_true", help="print the page as JSON")
    ref = asub.add_parser("refusals", help="inputs the gateway refused before admission")
    _refusal_filters(ref)
    ref.add_argument("--limit", type=int, default=50, help="rows per page (1-1000, 50)")
    ref.add_argument("--cursor", help="continue after a previous page")
    ref.add_argument("--json", action="store_true", help="print the page as JSON")
    show = asub.add_parser("show", help="one command with every recorded event")
    show.add_argument("command_id")
    show.add_argument("--json", action="store_true", help="print as JSON")
    exp = asub.add_parser("export", help="every matching command (or refusal) as CSV or JSON")
    _command_filters(exp)
    exp.add_argument("--code", help="with --refusals: error code")
    exp.add_argument("--refusals", action="store_true", help="export gateway refusals instead")
    exp.add_argument(
        "--format", choices=queries.FORMATS, default="csv", help="csv (default) or json"
    )
    exp.add_argument("--limit", type=int, help="at most this many rows (default: all)")
    exp.add_argument("--output", "-o", metavar="FILE", help="write here instead of stdout")
    ver = asub.add_parser(
        "verify",
        help="recompute the hash chains; exit 1 naming the first broken link",
    )
    ver.add_argument("--edge", metavar="EDGE", help="only this edge's chain")
    ver.add_argument(
        "--commands",
        action="store_true",
        help="also re-derive the commands rows from the verified events",
    )
    ver.add_argument(
        "--fail-on-gaps",
        action="store_true",
        help="exit 1 when quarantined log entries or ledger losses leave gaps (they are always listed)",
    )
    rec = asub.add_parser(
        "reconcile",
        help="compare the ledger's logs with the audit tables; exit 1 when the ledger lost "
        "events the audit holds (truncated AOF, failover), naming the commands",
    )
    rec.add_argument("--redis-url", help="default: DISPATCH_REDIS_URL or redis://127.0.0.1:6379/0")
    sts = asub.add_parser("stats", help="commands per hour or day by status")
    sts.add_argument("--bucket", choices=list(stats.BUCKETS), default="hour", help="hour|day")
    sts.add_argument("--edge", dest="edge_id", metavar="EDGE", help="one edge")
    sts.add_argument("--since", metavar="TIME", help="issued at or after (ISO 8601 with zone)")
    sts.add_argument("--until", metavar="TIME", help="issued before (ISO 8601 with zone)")
    sts.add_argument("--json", action="store_true", help="print as JSON")
    for parser in (lst, ref, show, exp, ver, rec, sts):
        _database_flag(parser)
    a.set_defaults(func=cmd_audit)
