"""`dispatch replay`: re-run a window of an edge's recorded commands against a simulated edge.

The window's commands are read from the ledger (the edge's partition log, outcomes from
each command's state), or from the projected audit tables when retention has trimmed
the log past the window's start. A sandbox is started that shares nothing with the live system
but the Redis server: a fresh namespace `replay-<random>` (its own streams and keys), a
private gateway process with its own signing secret, one `dispatch simulate-device` per
Modbus device of the edge's capability config, a `dispatch edge` agent with an empty
state directory, and the timeout verdicts reached in this process. The commands are
submitted again with their original spacing (divided by `--speed`) and with timestamps
shifted by the same amount as their submission, so each command is as old on arrival as
it was then and expiry behaves the same. When every replayed command is final (or the
settle time has passed) the recorded and replayed outcomes are printed side by side.
Exit status: 0 all outcomes equal, 1 some differ, 2 the replay could not run. The
sandbox's processes and keys are removed afterwards (`--keep-sandbox` keeps them).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import psycopg
from psycopg import sql
from redis import exceptions as redis_errors

from config.settings import Settings, SettingsError
from dispatch.tokens import edge_claims, sign, user_claims
from ledger import lifecycle
from ledger.connection import AnyRedis, connect
from ledger.errors import LedgerError
from ledger.keys import Keys, check_id
from ledger.records import EVENT_DECODER, LedgerConfig, to_utc
from ledger.store import Ledger
from schemas.commands import EdgeCommand
from schemas.events import Event, Issued

log = logging.getLogger("dispatch.replay")

SANDBOX_PREFIX = "replay-"
REPLAY_USER = "replay"
LEAD_S = 1.0  # between the sandbox being ready and the first submission
POLL_S = 0.1


# Settings the sandbox shares with the live gateway so it behaves the same (limits,
# timeouts); identities, secrets, addresses and edge settings are its own.
_INHERITED = (
    "DISPATCH_REDIS_URL",
    "DISPATCH_REDIS_CLUSTER",
    "DISPATCH_RATE_",
    "DISPATCH_MAX_MESSAGE_BYTES",
    "DISPATCH_PRESENCE_TTL_MS",
    "DISPATCH_STATE_TTL_S",
)


class ReplayError(RuntimeError):
    """The replay cannot run; the message says why and what to do."""


# -- the recorded window (read-only on the live namespace) -----------------------------------
@dataclass(frozen=True, slots=True)
class Outcome:
    status: str
    error_code: str | None = None

    def text(self) -> str:
        return f"{self.status} ({self.error_code})" if self.error_code else self.status


@dataclass(frozen=True, slots=True)
class Recorded:
    command: EdgeCommand
    issued_ms: int
    entry_id: str
    outcome: Outcome


def outcome_of(events: Sequence[Event]) -> Outcome | None:
    state = lifecycle.replay(events)
    if state is None or state.status is None:
        return None
    err = state.error
    return Outcome(state.status.value, err.code if err else None)


async def read_window(ledger: Ledger, edge_id: str, start_ms: int, end_ms: int) -> list[Recorded]:
    """The edge's commands issued in [start, end] with their current recorded outcome."""
    stream = ledger.keys.log(ledger.keys.partition(edge_id))
    issued: list[tuple[str, Issued]] = []
    cursor = f"{start_ms}-0"
    while True:
        rows: Any = await ledger.redis.xrange(stream, cursor, f"{end_ms}", count=1000)
        for entry_raw, fields in rows:
            entry = entry_raw.decode()
            raw = fields.get(b"e")
            event = EVENT_DECODER.decode(raw) if raw is not None else None
            if isinstance(event, Issued) and event.edge_id == edge_id:
                issued.append((entry, event))
        if len(rows) < 1000:
            break
        cursor = "(" + rows[-1][0].decode()
    recorded: list[Recorded] = []
    missing: dict[str, tuple[str, Issued]] = {}
    for entry, event in issued:
        record = await ledger.lookup(event.command_id)
        outcome = outcome_of(record.events) if record is not None else None
        if outcome is None:
            missing[event.command_id] = (entry, event)
            continue
        recorded.append(Recorded(event.command, event.at, entry, outcome))
    if missing:
        recorded.extend(await _outcomes_from_log(ledger, stream, missing))
    return sorted(recorded, key=lambda r: (r.issued_ms, r.entry_id))


async def _outcomes_from_log(
    ledger: Ledger, stream: str, missing: dict[str, tuple[str, Issued]]
) -> list[Recorded]:
    """Fold the events of commands whose state expired from the log itself."""
    events: dict[str, list[Event]] = {cid: [ev] for cid, (_, ev) in missing.items()}
    cursor = min(entry for entry, _ in missing.values())
    while True:
        rows: Any = await ledger.redis.xrange(stream, f"({cursor}", "+", count=2000)
        for _, fields in rows:
            raw = fields.get(b"e")
            if raw is None:
                continue
            event = EVENT_DECODER.decode(raw)
            if event.command_id in events:
                events[event.command_id].append(event)
        if len(rows) < 2000:
            break
        cursor = rows[-1][0].decode()
    out = []
    for cid, (entry, issued) in missing.items():
        outcome = outcome_of(events[cid]) or Outcome("unknown")
        out.append(Recorded(issued.command, issued.at, entry, outcome))
    return out


async def log_covers(ledger: Ledger, edge_id: str, start_ms: int) -> bool:
    """Whether the edge's partition log still holds everything from `start_ms` on.

    Retention trims from the head: the window is intact when nothing was ever removed,
    or when the first entry left is no later than the window's start.
    """
    stream = ledger.keys.log(ledger.keys.partition(edge_id))
    try:
        info: Any = await ledger.redis.xinfo_stream(stream)
    except redis_errors.ResponseError:
        return False  # no such stream (never written, or deleted)
    if int(info.get("entries-added", 0)) == int(info.get("length", 0)):
        return True
    first = info.get("first-entry")
    if not first:
        return False
    entry = first[0].decode() if isinstance(first[0], bytes) else str(first[0])
    return int(entry.partition("-")[0]) <= start_ms


async def read_window_from_audit(
    settings: Settings, edge_id: str, start: datetime, end: datetime
) -> list[Recorded]:
    """The window from the projected history: `issued` payloads and command outcomes."""
    statement = sql.SQL(
        "SELECT e.payload, e.entry_id, c.status, c.error_code FROM {s}.events e"
        " JOIN {s}.commands c USING (command_id)"
        " WHERE e.chain = %s AND e.status = 'issued' AND e.at >= %s AND e.at <= %s"
        " ORDER BY e.seq"
    ).format(s=sql.Identifier(settings.namespace))
    try:
        async with await psycopg.AsyncConnection.connect(
            settings.database_url, autocommit=True
        ) as conn:
            cur = await conn.execute(statement, (edge_id, start, end))
            rows = await cur.fetchall()
    except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName):
        return []  # nothing was ever projected
    except psycopg.Error as exc:
        raise ReplayError(
            f"the ledger's log no longer reaches back to {_iso(start)} and the audit tables "
            f"cannot be read ({str(exc).strip()}); check DISPATCH_DATABASE_URL"
        ) from None
    out = []
    for payload, entry_id, status, error_code in rows:
        event = msgspec.json.decode(payload.encode(), type=Issued)
        out.append(Recorded(event.command, event.at, entry_id, Outcome(status, error_code)))
    return out


# -- the schedule (pure) -----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Planned:
    command_id: str
    offset_s: float  # after the replay's start
    body: dict[str, Any]


def schedule(recorded: Sequence[Recorded], speed: float, start_ms: int) -> list[Planned]:
    """When to submit each command, and its body with a consistently shifted timestamp.

    Command i is submitted at `start + (issued_i - issued_0) / speed`; its timestamp moves
    by exactly as much as its submission did, so `issued - timestamp` (how old it was on
    arrival) and hence its expiry are as recorded.
    """
    if not recorded:
        return []
    first = recorded[0].issued_ms
    out = []
    for r in recorded:
        offset_ms = (r.issued_ms - first) / speed
        shift = timedelta(milliseconds=start_ms + offset_ms - r.issued_ms)
        cmd = r.command
        body: dict[str, Any] = {
            "command_id": cmd.command_id,
            "command_type": cmd.command_type.value,
            "target": msgspec.to_builtins(cmd.target),
            "value": cmd.value,
            "unit": cmd.unit,
            "expiry_sec": cmd.expiry_sec,
            "source": cmd.source,
            "timestamp": _iso(cmd.timestamp + shift),
            "priority": cmd.priority,
        }
        if cmd.duration_sec is not None:
            body["duration_sec"] = cmd.duration_sec
        out.append(Planned(cmd.command_id, offset_ms / 1000, body))
    return out


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _request(cmd: EdgeCommand) -> str:
    target = f"{cmd.target.device_id}/{cmd.target.channel}"
    unit = f" {cmd.unit}" if cmd.unit else ""
    return f"{cmd.command_type.value} {target}={cmd.value}{unit}"


@dataclass
class Report:
    edge_id: str
    start: datetime
    end: datetime
    speed: float
    sandbox: str
    rows: list[tuple[Recorded, Outcome]] = field(default_factory=list)
    source: str = "ledger"  # where the recorded window was read

    @property
    def different(self) -> int:
        return sum(1 for r, o in self.rows if r.outcome != o)

    def lines(self) -> list[str]:
        head = (
            f"replay of edge {self.edge_id} from {_iso(self.start)} to {_iso(self.end)}: "
            f"{len(self.rows)} commands (recorded in the {self.source}) at speed "
            f"{self.speed:g} in sandbox {self.sandbox}"
        )
        widths = (24, 24, 40, 28, 28)
        titles = ("COMMAND", "ISSUED (RECORDED)", "REQUEST", "RECORDED", "REPLAYED")
        out = [head, " ".join(t.ljust(w) for t, w in zip(titles, widths, strict=True)) + " SAME"]
        for recorded, replayed in self.rows:
            cells = (
                recorded.command.command_id,
                _iso(to_utc(recorded.issued_ms)),
                _request(recorded.command),
                recorded.outcome.text(),
                replayed.text(),
            )
            mark = "=" if recorded.outcome == replayed else "DIFFERENT"
            out.append(
                " ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " " + mark
            )
        same = len(self.rows) - self.different
        out.append(
            f"{same} of {len(self.rows)} commands replayed with the recorded outcome"
            + (f"; {self.different} differ" if self.different else "")
        )
        return out

    def json(self) -> dict[str, Any]:
        return {
            "edge_id": self.edge_id,
            "from": _iso(self.start),
            "to": _iso(self.end),
            "speed": self.speed,
            "sandbox": self.sandbox,
            "source": self.source,
            "same": len(self.rows) - self.different,
            "different": self.different,
            "commands": [
                {
                    "command_id": r.command.command_id,
                    "issued_at": _iso(to_utc(r.issued_ms)),
                    "request": _request(r.command),
                    "recorded": {"status": r.outcome.status, "error_code": r.outcome.error_code},
                    "replayed": {"status": o.status, "error_code": o.error_code},
                    "same": r.outcome == o,
                }
                for r, o in self.rows
            ],
        }


# -- the sandbox -------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@dataclass
class Sandbox:
    """A private gateway, simulated devices and an edge agent in namespace `replay-*`."""

    live: Settings
    edge_id: str
    modbus: list[str]
    cycle_period_ms: int | None = None
    namespace: str = field(default_factory=lambda: f"{SANDBOX_PREFIX}{uuid.uuid4().hex[:10]}")
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(48))
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="dispatch-replay-")))
    procs: list[_Proc] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        check_id(self.namespace)
        if self.namespace == self.live.namespace or not self.namespace.startswith(SANDBOX_PREFIX):
            raise ReplayError("the sandbox namespace must be a fresh `replay-*` namespace")

    @property
    def keys(self) -> Keys:
        return Keys(self.namespace, self.live.partitions)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        # Nothing of the live deployment but the Redis server: own namespace, own secret,
        # no edge settings inherited from the operator's shell.
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("DISPATCH_") or k.startswith(_INHERITED)
        }
        env.update(
            DISPATCH_REDIS_URL=self.live.redis_url,
            DISPATCH_NAMESPACE=self.namespace,
            DISPATCH_JWT_SECRET=self.secret,
            DISPATCH_PARTITIONS=str(self.live.partitions),
            DISPATCH_ACK_TIMEOUT_MS=str(self.live.ack_timeout_ms),
            DISPATCH_DEFAULT_EXPIRY_S=str(self.live.default_expiry_s),
            DISPATCH_CLOCK_SKEW_S=str(self.live.clock_skew_s),
            DISPATCH_HOST="127.0.0.1",
            PYTHONUNBUFFERED="1",
        )
        return env

    def _start(self, name: str, *args: str) -> _Proc:
        path = self.workdir / f"{name}.log"
        with path.open("wb") as out:
            popen = subprocess.Popen(
                [sys.executable, "-m", "dispatch.cli", *args],
                env=self.env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        proc = _Proc(name, popen, path)
        self.procs.append(proc)
        return proc

    def check_alive(self) -> None:
        for proc in self.procs:
            if proc.popen.poll() is not None:
                raise ReplayError(
                    f"the sandbox's {proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}"
                )

    async def start(self, ledger: Ledger, live: Ledger) -> None:
        """Gateway, devices, edge agent; returns when the edge is connected."""
        stored: Any = await live.redis.get(live.keys.edge_config(self.edge_id))
        config = stored.encode() if isinstance(stored, str) else stored
        if config is not None:
            await ledger.redis.set(self.keys.edge_config(self.edge_id), config)
        await ledger.enroll_edge(self.edge_id)
        self.port = _free_port()
        gateway = self._start(
            "gateway", "gateway", "--port", str(self.port), "--gateway-id", "replay-gateway"
        )
        await self._wait(self._healthy, 30, "the sandbox gateway to answer", gateway)
        modbus = list(self.modbus) or await self._simulators(config)
        args = [
            "edge",
            "--edge-id",
            self.edge_id,
            "--gateway",
            f"ws://127.0.0.1:{self.port}",
            "--token",
            sign(edge_claims(self.edge_id, 86_400), self.secret),
            "--state-dir",
            str(self.workdir / "edge-state"),
        ]
        for spec in modbus:
            args += ["--modbus", spec]
        if self.cycle_period_ms is not None:
            args += ["--cycle-period-ms", str(self.cycle_period_ms)]
        agent = self._start("edge", *args)
        presence = self.keys.presence(self.edge_id)

        async def connected() -> bool:
            return bool(await ledger.redis.exists(presence))

        await self._await(connected, 30, "the sandbox edge agent to connect", agent)

    async def _simulators(self, stored_config: bytes | None) -> list[str]:
        from edge.capabilities import decode_config, shipped_config  # noqa: PLC0415

        raw = stored_config or shipped_config(self.edge_id)
        if raw is None:
            raise ReplayError(
                f"edge {self.edge_id!r} has no capability config in the ledger and none ships "
                "with the project; pass --modbus DEVICE=HOST:PORT for its devices"
            )
        specs = []
        for device in decode_config(raw).devices:
            port = _free_port()
            sim = self._start(f"device-{device.device_id}", "simulate-device", "--port", str(port))
            await self._wait(lambda port=port: _listening(port), 20, "a simulated device", sim)
            specs.append(f"{device.device_id}=127.0.0.1:{port}")
        return specs

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http}/healthz", timeout=1) as resp:
                return bool(resp.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    async def _wait(self, check: Any, timeout_s: float, what: str, proc: _Proc) -> None:
        async def probe() -> bool:
            return bool(await asyncio.to_thread(check))

        await self._await(probe, timeout_s, what, proc)

    async def _await(self, check: Any, timeout_s: float, what: str, proc: _Proc) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            if await check():
                return
            await asyncio.sleep(POLL_S)
        raise ReplayError(f"timed out after {timeout_s:g} s waiting for {what}:\n{proc.tail()}")

    def submit(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        token = sign(user_claims(REPLAY_USER, [self.edge_id], [], 86_400), self.secret)
        req = urllib.request.Request(
            f"{self.http}/api/commands",
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return int(resp.status), json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            return int(exc.code), json.loads(exc.read() or b"{}")

    async def stop(self, redis: AnyRedis, *, keep: bool) -> None:
        for proc in reversed(self.procs):
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                await asyncio.to_thread(proc.popen.wait, 10)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                await asyncio.to_thread(proc.popen.wait, 5)
        if keep:
            return
        batch: list[bytes] = []
        async for key in redis.scan_iter(match=f"{self.namespace}:*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                await redis.delete(*batch)
                batch.clear()
        if batch:
            await redis.delete(*batch)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


# -- the run -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ReplayOptions:
    edge_id: str
    start: datetime
    end: datetime
    speed: float = 1.0
    settle_s: float | None = None
    modbus: tuple[str, ...] = ()
    cycle_period_ms: int | None = None
    keep_sandbox: bool = False


@contextlib.asynccontextmanager
async def _ledger(redis: AnyRedis, config: LedgerConfig, url: str) -> AsyncIterator[Ledger]:
    ledger = Ledger(redis, config, url=url)
    await ledger.start()
    try:
        yield ledger
    finally:
        await ledger.close()


async def replay(live_settings: Settings, options: ReplayOptions) -> Report:
    redis = connect(live_settings.redis_url, cluster=live_settings.redis_cluster)
    try:
        async with _ledger(redis, live_settings.ledger(), live_settings.redis_url) as live:
            start_ms = int(options.start.timestamp() * 1000)
            end_ms = int(options.end.timestamp() * 1000)
            source = "ledger"
            if await log_covers(live, options.edge_id, start_ms):
                recorded = await read_window(live, options.edge_id, start_ms, end_ms)
            else:
                # Retention trimmed the log past the window: the audit tables hold it.
                source = "audit tables"
                recorded = await read_window_from_audit(
                    live_settings, options.edge_id, options.start, options.end
                )
            if not recorded:
                raise ReplayError(
                    f"no commands for edge {options.edge_id!r} were issued between "
                    f"{_iso(options.start)} and {_iso(options.end)} in namespace "
                    f"{live_settings.namespace!r} (read from the {source})"
                )
            sandbox = Sandbox(
                live_settings, options.edge_id, list(options.modbus), options.cycle_period_ms
            )
            report = Report(
                options.edge_id,
                options.start,
                options.end,
                options.speed,
                sandbox.namespace,
                source=source,
            )
            config = replace(live_settings.ledger(), namespace=sandbox.namespace)
            try:
                async with _ledger(redis, config, live_settings.redis_url) as ledger:
                    log.info(
                        "replay.sandbox.starting namespace=%s commands=%d",
                        sandbox.namespace,
                        len(recorded),
                    )
                    await sandbox.start(ledger, live)
                    outcomes = await _run(ledger, sandbox, recorded, options, live_settings)
                    report.rows = [(r, outcomes[r.command.command_id]) for r in recorded]
            finally:
                await sandbox.stop(redis, keep=options.keep_sandbox)
            return report
    finally:
        await redis.aclose()


async def _run(
    ledger: Ledger,
    sandbox: Sandbox,
    recorded: list[Recorded],
    options: ReplayOptions,
    live_settings: Settings,
) -> dict[str, Outcome]:
    start_ms = int(time.time() * 1000 + LEAD_S * 1000)
    plan = schedule(recorded, options.speed, start_ms)
    refused: dict[str, Outcome] = {}
    partition = ledger.keys.partition(options.edge_id)
    verdicts = asyncio.create_task(_verdicts(ledger, partition))
    try:
        for item in plan:
            delay = start_ms / 1000 + item.offset_s - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            sandbox.check_alive()
            status, reply = await asyncio.to_thread(sandbox.submit, item.body)
            if status >= 400:
                err = reply.get("error") or {}
                refused[item.command_id] = Outcome("rejected", err.get("code"))
            log.info(
                "replay.command.submitted command_id=%s http_status=%d", item.command_id, status
            )
        settle_s = options.settle_s
        if settle_s is None:
            settle_s = live_settings.ack_timeout_ms / 1000 + 10
        deadline = time.monotonic() + settle_s
        pending = [r.command.command_id for r in recorded if r.command.command_id not in refused]
        outcomes: dict[str, Outcome] = dict(refused)
        while True:
            for cid in pending:
                record = await ledger.lookup(cid)
                outcome = outcome_of(record.events) if record else None
                outcomes[cid] = outcome or Outcome("unknown")
            unsettled = [cid for cid in pending if outcomes[cid].status not in _TERMINAL]
            if not unsettled or time.monotonic() >= deadline:
                return outcomes
            await asyncio.sleep(POLL_S * 2)
    finally:
        verdicts.cancel()
        await asyncio.gather(verdicts, return_exceptions=True)


_TERMINAL = frozenset(s.value for s in lifecycle.TERMINAL)


async def _verdicts(ledger: Ledger, partition: int) -> None:
    """The sandbox has no projector: its ack timeouts and expiries are reached here."""
    while True:
        with contextlib.suppress(LedgerError):
            await ledger.reach_verdicts(partition, actor="replay")
        await asyncio.sleep(POLL_S)


# -- command line ---------------------------------------------------------------------------
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


def _speed(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--speed {raw!r} is not a number") from None
    if not 0 < value <= 1000:
        raise argparse.ArgumentTypeError(f"--speed must be above 0 and at most 1000, got {raw}")
    return value


def cmd_replay(args: argparse.Namespace) -> int:
    if args.end <= args.start:
        print("dispatch replay: --to must be later than --from", file=sys.stderr)
        return 2
    try:
        settings = Settings.from_env()
        report = asyncio.run(
            replay(
                settings,
                ReplayOptions(
                    edge_id=check_id(args.edge),
                    start=args.start,
                    end=args.end,
                    speed=args.speed,
                    settle_s=args.settle_s,
                    modbus=tuple(args.modbus or ()),
                    cycle_period_ms=args.cycle_period_ms,
                    keep_sandbox=args.keep_sandbox,
                ),
            )
        )
    except (ReplayError, LedgerError, SettingsError, ValueError) as exc:
        print(f"dispatch replay: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.json()))
    else:
        print("\n".join(report.lines()))
    return 1 if report.different else 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "replay",
        help="re-run a recorded window of an edge's commands against a simulated edge",
        description="Read the commands issued to EDGE between --from and --to from the "
        "ledger, re-run them with their original spacing (divided by --speed) against a "
        "sandbox (namespace replay-*, private gateway, simulated devices, edge agent) that "
        "never touches live streams, and print recorded and replayed outcomes side by side. "
        "Exit 0 when all are equal, 1 when some differ, 2 when the replay cannot run.",
    )
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
        "--speed", type=_speed, default=1.0, help="replay N times faster than recorded (1)"
    )
    p.add_argument(
        "--settle-s",
        type=float,
        default=None,
        help="how long to wait for final outcomes after the last command (ack timeout + 10 s)",
    )
    p.add_argument(
        "--modbus",
        action="append",
        metavar="DEVICE=HOST:PORT",
        help="use these devices instead of starting `dispatch simulate-device` for each",
    )
    p.add_argument("--cycle-period-ms", type=int, default=None, help="the edge's Core Cycle period")
    p.add_argument("--keep-sandbox", action="store_true", help="leave the sandbox keys and logs")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    p.set_defaults(func=cmd_replay)
