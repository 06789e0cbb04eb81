"""`dispatch`: one console script; each package registers its own subcommands."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dispatch import demo, logformat, replay, tokens, tracing
from dispatch.settings import SettingsError
from edge import cli as edge_cli
from gateway import cli as gateway_cli
from projections import cli as projections_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dispatch",
        description="Command Dispatch: the EMS control channel (gateway, edge agent, projector, tools).",
        epilog="Settings come from flags and DISPATCH_* environment variables; see README.md.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    gateway_cli.register(sub)
    edge_cli.register(sub)
    projections_cli.register(sub)
    tokens.register(sub)
    demo.register(sub)
    replay.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logformat.configure(verbose=args.verbose)
    try:
        if args.command in tracing.TRACED_COMMANDS:
            tracing.configure(f"dispatch-{args.command}")
        return int(args.func(args) or 0)
    except (SettingsError, tracing.TracingError) as exc:
        print(f"dispatch: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
