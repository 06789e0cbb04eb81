"""`dispatch replay`: flags, exit status (0 same, 1 some differ, 2 cannot run), output."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from config.settings import Settings, SettingsError
from dispatch.replay.run import ReplayOptions, replay
from dispatch.replay.window import ReplayError
from ledger.errors import LedgerError
from ledger.keys import check_id


def _time(raw: str) -> datetime:
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{raw!r} is not an ISO 8601 time (e.g. 2026-02-15T14:30:00Z)"
        ) from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{raw!r} needs a timezone (e.g. a trailing Z)")
    return value


N = TypeVar("N", int, float)


def _number(
    flag: str, kind: Callable[[str], N], rule: str, ok: Callable[[N], bool]
) -> Callable[[str], N]:
    """An argparse type: a number (`kind` int: a whole one) for which `ok` holds; a refusal
    names the flag and the `rule`."""
    noun = "a whole number" if kind is int else "a number"

    def parse(raw: str) -> N:
        try:
            value = kind(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} {raw!r} is not {noun}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{flag} must be {rule}, got {raw}")
        return value

    return parse


def _config(path: Path | None) -> bytes | None:
    if path is None:
        return None
    from edge.capabilities import decode_config  # noqa: PLC0415
    from edge.errors import ConfigError  # noqa: PLC0415

    try:
        raw = path.read_bytes()
        decode_config(raw)
    except OSError as exc:
        raise ReplayError(f"cannot read --config {path}: {exc.strerror}") from None
    except ConfigError as exc:
        raise ReplayError(f"--config {path} is not a usable capability config: {exc}") from None
    return raw


def cmd_replay(args: argparse.Namespace) -> int:
    """Read the commands issued to EDGE between --from and --to and their lifecycles from
    the ledger (or the audit tables), re-run them in a sandbox (namespace replay-*, private
    gateway, simulated devices, a real edge agent) that never touches live streams, in the
    recorded happens-before order with the recorded spacing divided by --speed and the
    recorded connectivity, and compare outcomes per command. Exit 0 when all are equal, 1
    when some differ, 2 when the replay cannot run. See docs/replay.md."""
    if args.end <= args.start:
        print("dispatch replay: --to must be later than --from", file=sys.stderr)
        return 2
    try:
        settings = Settings.from_env()
        options = ReplayOptions(
            edge_id=check_id(args.edge),
            start=args.start,
            end=args.end,
            speed=args.speed,
            settle_s=args.settle_s,
            modbus=tuple(args.modbus or ()),
            cycle_period_ms=args.cycle_period_ms,
            config=_config(args.config),
            keep_sandbox=args.keep_sandbox,
        )
        report = asyncio.run(replay(settings, options))
    except (ReplayError, LedgerError, SettingsError, ValueError) as exc:
        print(f"dispatch replay: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.json()))
    else:
        print("\n".join(report.lines()))
    return 1 if report.different else 0


def register(sub: Any) -> None:
    summary = "re-run a recorded window of an edge's commands against a sandboxed edge"
    p = sub.add_parser("replay", help=summary, description=cmd_replay.__doc__)
    p.add_argument(
        "--edge", required=True, metavar="EDGE", help="the edge whose commands to replay"
    )
    p.add_argument(
        "--from",
        dest="start",
        required=True,
        type=_time,
        metavar="TIME",
        help="ISO 8601, with zone",
    )
    p.add_argument(
        "--to", dest="end", required=True, type=_time, metavar="TIME", help="ISO 8601, with zone"
    )
    p.add_argument(
        "--speed",
        type=_number("--speed", float, "above 0 and at most 1000", lambda v: 0 < v <= 1000),
        default=1.0,
        help="replay N times faster than recorded (1)",
    )
    p.add_argument(
        "--settle-s",
        type=float,
        default=None,
        help="how long to wait for final outcomes after the last action (ack timeout + 10 s)",
    )
    p.add_argument(
        "--modbus",
        action="append",
        metavar="DEVICE=HOST:PORT",
        help="what-if: use these devices instead of starting `dispatch simulate-device`",
    )
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="what-if: run the sandbox edge with this capability config instead of the live one",
    )
    p.add_argument(
        "--cycle-ms",
        "--cycle-period-ms",
        dest="cycle_period_ms",
        type=_number("--cycle-ms", int, "10 to 60000 ms", lambda v: 10 <= v <= 60_000),
        metavar="N",
        default=None,
        help="what-if: the sandbox edge's Core Cycle period (the agent's default)",
    )
    p.add_argument("--keep-sandbox", action="store_true", help="leave the sandbox keys and logs")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    p.set_defaults(func=cmd_replay)
