"""`dispatch edge`, `dispatch edge log` and `dispatch simulate-device`.

`python -m edge.cli ...` runs the same subcommands without the rest of `dispatch`.
Exit codes of `dispatch edge`: 0 stopped by SIGTERM/SIGINT, 1 crashed, 2 bad settings or
config, 75 a `system restart` command asked for a new process (`--restart-mode exit`;
with the default `--restart-mode exec` the agent replaces itself with a fresh process).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from config import logformat, tracing
from edge.agent import EXIT_RESTART, EXIT_USAGE, Agent, AgentSettings
from edge.errors import EdgeError
from edge.journal import JOURNAL_FILE, Journal, read_log
from edge.simulator import BmsSimulator, BmsState

log = logging.getLogger("edge.cli")

DEFAULT_GATEWAY = "ws://127.0.0.1:8000"
DEFAULT_STATE_ROOT = Path(".local") / "edge"


def default_state_dir(edge_id: str) -> Path:
    """`./.local/edge/<edge_id>` under the working directory."""
    return DEFAULT_STATE_ROOT / edge_id


# The agent's tunables: a flag left out keeps the agent's default (in parentheses).
AGENT_TUNABLES: tuple[tuple[str, type[int] | type[float], str], ...] = (
    ("--cycle-period-ms", int, "Core Cycle period (1000)"),
    ("--queue-size", int, "Core Cycle queue bound (256)"),
    ("--clock-skew-s", float, "expiry tolerance when a gateway sends no remaining_ms (60)"),
    (
        "--max-clock-offset-s",
        float,
        "refuse control commands (clock_skew) when the clock is off more than this (30)",
    ),
    (
        "--max-override-s",
        float,
        "longest config_override accepted, unless the channel sets its own (86400)",
    ),
    ("--metrics-port", int, "serve Prometheus /metrics on 127.0.0.1:PORT (off by default)"),
    ("--ping-interval-s", float, "WebSocket ping period (10)"),
    ("--ping-timeout-s", float, "pong deadline (10)"),
    ("--backoff-max-s", float, "reconnect backoff cap (60)"),
)


def register(sub: Any) -> None:
    """Add `edge` (with `edge log`) and `simulate-device` to a subparsers object."""
    env = os.environ
    edge = sub.add_parser(
        "edge",
        help="run an edge agent (or `edge log` to read its local command log)",
        description=(
            "Run the edge agent until SIGTERM/SIGINT: one WebSocket to the gateway, commands "
            "validated against the site's capability config and executed by the Core Cycle "
            "on Modbus devices. Flags default to DISPATCH_* environment variables."
        ),
        epilog=(
            "Exit codes: 0 stopped, 1 crashed, 2 bad settings, 75 restart requested "
            "(--restart-mode exit). Default state dir: ./.local/edge/<edge_id>."
        ),
    )
    edge.add_argument("--edge-id", default=env.get("DISPATCH_EDGE_ID"), help="$DISPATCH_EDGE_ID")
    edge.add_argument(
        "--gateway",
        default=env.get("DISPATCH_GATEWAY", DEFAULT_GATEWAY),
        help=f"gateway base URL, ws:// or wss:// ($DISPATCH_GATEWAY, default {DEFAULT_GATEWAY})",
    )
    edge.add_argument(
        "--token",
        default=env.get("DISPATCH_EDGE_TOKEN"),
        help=(
            "edge credential ($DISPATCH_EDGE_TOKEN); a flag shows in the process list to every "
            "local user: prefer --token-file or the variable"
        ),
    )
    edge.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help="file holding the edge credential; wins over --token ($DISPATCH_EDGE_TOKEN_FILE)",
    )
    edge.add_argument(
        "--modbus",
        action="append",
        default=None,
        metavar="DEVICE=HOST:PORT",
        help="a device's Modbus TCP address (repeatable; $DISPATCH_EDGE_MODBUS, comma-separated)",
    )
    edge.add_argument("--state-dir", type=Path, default=None, help="$DISPATCH_STATE_DIR")
    edge.add_argument(
        "--config",
        type=Path,
        default=None,
        help="capability config JSON to start with ($DISPATCH_EDGE_CONFIG)",
    )
    for flag, kind, text in AGENT_TUNABLES:
        edge.add_argument(flag, type=kind, default=None, help=text)
    edge.add_argument(
        "--restart-mode",
        choices=("exec", "exit"),
        default=env.get("DISPATCH_EDGE_RESTART_MODE", "exec"),
        help="on `system restart`: re-exec this process (exec) or exit with code 75 (exit)",
    )
    edge.set_defaults(func=run_agent)
    actions = edge.add_subparsers(dest="edge_action", metavar="ACTION")
    show = actions.add_parser(
        "log",
        help="print the agent's local command log",
        description="Print the local command log (works while the agent runs).",
    )
    show.add_argument("--state-dir", dest="log_state_dir", type=Path, default=None)
    show.add_argument("--edge-id", dest="log_edge_id", default=None)
    show.add_argument("--limit", type=int, default=100, help="newest N lines (100)")
    show.add_argument("--command-id", default=None, help="only this command")
    show.add_argument("--json", action="store_true", help="one JSON object per line")
    show.set_defaults(func=show_log)

    sim = sub.add_parser(
        "simulate-device",
        help="serve the demo site's simulated BMS over Modbus TCP",
        description=(
            "Serve the demo BMS (unit id 1): holding 0-1 SetActivePower int32 W, holding 2 "
            "MinSoc uint16 %, input 0 Soc uint16 %. Runs until SIGTERM/SIGINT."
        ),
    )
    sim.add_argument("--port", type=int, required=True, help="TCP port (0 picks a free one)")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument(
        "--power-limit-w", type=int, default=100_000, help="refuse |SetActivePower| above this"
    )
    sim.set_defaults(func=run_simulator)


# -- dispatch edge -------------------------------------------------------------------------
def agent_settings(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> AgentSettings:
    """AgentSettings from flags, then DISPATCH_* variables, then defaults."""
    env = os.environ if env is None else env
    edge_id = args.edge_id
    if not edge_id:
        raise EdgeError("no edge id: pass --edge-id or set DISPATCH_EDGE_ID")
    state_dir = args.state_dir or _env_path(env, "DISPATCH_STATE_DIR") or default_state_dir(edge_id)
    config = args.config or _env_path(env, "DISPATCH_EDGE_CONFIG")
    token_file = getattr(args, "token_file", None) or _env_path(env, "DISPATCH_EDGE_TOKEN_FILE")
    modbus_specs = list(args.modbus or [])
    if not modbus_specs and env.get("DISPATCH_EDGE_MODBUS"):
        modbus_specs = [s for s in env["DISPATCH_EDGE_MODBUS"].split(",") if s.strip()]
    values: dict[str, Any] = {}
    for name, flag, variable, kind in (
        ("cycle_period_ms", args.cycle_period_ms, "DISPATCH_CYCLE_PERIOD_MS", int),
        ("queue_capacity", args.queue_size, "DISPATCH_EDGE_QUEUE_SIZE", int),
        ("clock_skew_s", args.clock_skew_s, "DISPATCH_CLOCK_SKEW_S", float),
        ("max_clock_offset_s", args.max_clock_offset_s, "DISPATCH_EDGE_MAX_CLOCK_OFFSET_S", float),
        ("max_override_s", args.max_override_s, "DISPATCH_EDGE_MAX_OVERRIDE_S", float),
        ("metrics_port", args.metrics_port, "DISPATCH_EDGE_METRICS_PORT", int),
        ("ping_interval_s", args.ping_interval_s, "DISPATCH_EDGE_PING_INTERVAL_S", float),
        ("ping_timeout_s", args.ping_timeout_s, "DISPATCH_EDGE_PING_TIMEOUT_S", float),
        ("backoff_max_s", args.backoff_max_s, "DISPATCH_EDGE_BACKOFF_MAX_S", float),
    ):
        value = flag if flag is not None else _env_number(env, variable, kind)
        if value is not None:
            values[name] = value
    return AgentSettings(
        edge_id=edge_id,
        gateway_url=args.gateway,
        token=_credential(token_file) if token_file else args.token or "",
        state_dir=Path(state_dir),
        config_file=None if config is None else Path(config),
        modbus=tuple(parse_modbus(spec) for spec in modbus_specs),
        **values,
    )


def _credential(path: Path) -> str:
    """The edge credential in `path` (what `dispatch token --edge EDGE` printed)."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgeError(
            f"--token-file {path}: cannot read it ({exc}); write the credential that "
            "`dispatch token --edge EDGE` prints into it, readable by this user"
        ) from exc
    if not token or len(token.split()) != 1:
        raise EdgeError(
            f"--token-file {path} holds {'nothing' if not token else 'more than one word'}; "
            "it must hold only the credential that `dispatch token --edge EDGE` prints"
        )
    return token


def parse_modbus(spec: str) -> tuple[str, str, int]:
    """`DEVICE=HOST:PORT` -> (device, host, port)."""
    device, sep, address = spec.strip().partition("=")
    host, colon, port = address.rpartition(":")
    if not sep or not colon or not device or not host or not port.isdigit():
        raise EdgeError(f"--modbus {spec!r} is not DEVICE=HOST:PORT (e.g. bms_main=127.0.0.1:5020)")
    number = int(port)
    if not 0 < number < 65536:
        raise EdgeError(f"--modbus {spec!r}: port {number} is not 1-65535")
    return device, host.strip("[]"), number


def run_agent(args: argparse.Namespace) -> int:
    try:
        settings = agent_settings(args)
        code = asyncio.run(_run_agent(settings))
    except EdgeError as exc:
        print(f"dispatch edge: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if code == EXIT_RESTART and args.restart_mode == "exec":
        log.info("edge.agent.reexec argv=%s", sys.orig_argv)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    return code


async def _run_agent(settings: AgentSettings) -> int:
    agent = Agent(settings)
    _on_signals(agent.stop)
    return await agent.run()


def _on_signals(callback: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, callback)


def _env_path(env: Mapping[str, str], name: str) -> Path | None:
    return Path(env[name]) if env.get(name) else None


def _env_number(env: Mapping[str, str], name: str, kind: type[int] | type[float]) -> float | None:
    raw = env.get(name)
    if not raw:
        return None
    try:
        return kind(raw)
    except ValueError:
        raise EdgeError(f"{name}={raw!r} is not a number") from None


# -- dispatch edge log ---------------------------------------------------------------------
def show_log(args: argparse.Namespace) -> int:
    edge_id = args.log_edge_id or args.edge_id
    state_dir = args.log_state_dir or args.state_dir or _env_path(os.environ, "DISPATCH_STATE_DIR")
    if state_dir is None:
        if not edge_id:
            print("dispatch edge log: pass --state-dir DIR or --edge-id EDGE", file=sys.stderr)
            return EXIT_USAGE
        state_dir = default_state_dir(edge_id)
    path = Path(state_dir) / JOURNAL_FILE
    if not path.exists():
        print(
            f"dispatch edge log: no command log at {path}; is --state-dir the agent's state dir?",
            file=sys.stderr,
        )
        return EXIT_USAGE
    db = Journal.open_readonly(path)
    try:
        entries = read_log(db, limit=args.limit, command_id=args.command_id)
    finally:
        db.close()
    for entry in entries:
        at = dt.datetime.fromtimestamp(entry.at, dt.UTC).isoformat(timespec="milliseconds")
        at = at.replace("+00:00", "Z")
        if args.json:
            record = {
                "seq": entry.seq,
                "at": at,
                "command_id": entry.command_id,
                "event": entry.event,
                "code": entry.code,
                "detail": entry.detail,
            }
            print(json.dumps(record))
        else:
            code = f" [{entry.code}]" if entry.code else ""
            detail = f" {entry.detail}" if entry.detail else ""
            print(f"{at} {entry.command_id} {entry.event}{code}{detail}")
    return 0


# -- dispatch simulate-device --------------------------------------------------------------
def run_simulator(args: argparse.Namespace) -> int:
    return asyncio.run(_run_simulator(args.host, args.port, args.power_limit_w))


async def _run_simulator(host: str, port: int, power_limit_w: int) -> int:
    stop = asyncio.Event()
    _on_signals(stop.set)
    simulator = BmsSimulator(host, port, state=BmsState(power_limit_w=power_limit_w))
    await simulator.serve_until(stop)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dispatch", description="Command Dispatch edge tools.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logformat.configure(verbose=args.verbose)
    try:
        if args.command in tracing.TRACED_COMMANDS:
            tracing.configure(f"dispatch-{args.command}")
    except tracing.TracingError as exc:
        print(f"dispatch: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
