"""One checker, six invariants (issue 12), read from the outside after a scenario drains.

Sources: the ledger (every partition's lifecycle log in Redis), the audit tables in
PostgreSQL (and `dispatch audit verify --commands`), the recording Modbus device's
write record, and the frames the test clients sent and received.

- I1 at most one device write per command;
- I2 exactly one terminal verdict per accepted command (a late ack is a recorded
  discrepancy after a verdict, never a second verdict);
- I3 no device write after the command's expiry (plus the allowed skew);
- I4 every ledger event is in PostgreSQL exactly once, every command row matches the
  ledger, and `dispatch audit verify --commands` passes;
- I5 no command vanishes silently: every frame sent on a connection that stayed open got
  an answer, every accepted command ends in a verdict (`lost` only with its alarm line),
  and a device write is never hidden behind a `timed_out`/`lost`;
- I6 per device channel, applied setpoints keep the order they were issued in.

A device write is attributed to its command by value: the scenarios give every
setpoint a value no other command in the namespace has.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import redis
from faults_clients import FrameLog
from psycopg import sql

from config.settings import Settings
from edge.recording_device import read_record
from ledger.keys import Keys
from ledger.lifecycle import RANK
from schemas.events import Status

VERDICTS = {"timed_out", "lost", "expired", "cancelled"}
RESULTS = {"executed", "failed", "rejected"}
TERMINAL = VERDICTS | RESULTS
SETPOINT_ADDRESS = 0  # SetActivePower, holding 0-1


@dataclass
class LedgerView:
    """Every command's events, in log order, and the log position of its `issued`."""

    events: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    issued_at_pos: dict[str, tuple[int, int]] = field(default_factory=dict)
    event_ids: Counter[str] = field(default_factory=Counter)

    def status(self, command_id: str) -> str:
        best = max(self.events[command_id], key=lambda e: RANK[Status(e["status"])])
        return str(best["status"])

    def command(self, command_id: str) -> dict[str, Any]:
        for event in self.events[command_id]:
            if event["status"] == "issued":
                body: dict[str, Any] = event["command"]
                return body
        return {}

    def accepted(self, command_id: str) -> bool:
        return any(e["status"] == "authorized" for e in self.events[command_id])


def read_ledger(redis_url: str, keys: Keys) -> LedgerView:
    client = redis.Redis.from_url(redis_url)
    view = LedgerView()
    try:
        for partition in keys.all_partitions():
            for pos, (_entry, fields) in enumerate(client.xrange(keys.log(partition))):
                event = json.loads(fields[b"e"])
                cid = event["command_id"]
                view.events.setdefault(cid, []).append(event)
                view.event_ids[event["event_id"]] += 1
                if event["status"] == "issued":
                    view.issued_at_pos[cid] = (partition, pos)
    finally:
        client.close()
    return view


def read_audit(database_url: str, schema: str, keys: Keys) -> tuple[Counter[str], dict[str, str]]:
    """(event_id -> rows, command_id -> status) from the audit tables."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        try:
            rows = conn.execute(
                sql.SQL("SELECT event_id FROM {}.events WHERE stream <> %s").format(
                    sql.Identifier(schema)
                ),
                (keys.audit(),),
            ).fetchall()
            commands = conn.execute(
                sql.SQL("SELECT command_id, status FROM {}.commands").format(sql.Identifier(schema))
            ).fetchall()
        except psycopg.errors.UndefinedTable:
            return Counter(), {}
    return Counter(r[0] for r in rows), {c: s for c, s in commands}


def audit_verify(env: dict[str, str]) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "dispatch.cli", "audit", "verify", "--commands"],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.returncode, (done.stdout + done.stderr)[-2000:]


def _ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)


@dataclass
class Report:
    violations: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(self.violations.values())

    def add(self, invariant: str, message: str) -> None:
        self.violations[invariant].append(message)

    def __str__(self) -> str:
        lines = [f"invariants: {'OK' if self.ok else 'VIOLATED'}  {self.figures}"]
        for name in ("I1", "I2", "I3", "I4", "I5", "I6"):
            found = self.violations.get(name, [])
            lines.append(f"  {name}: {'ok' if not found else f'{len(found)} violation(s)'}")
            lines.extend(f"    - {m}" for m in found[:10])
        return "\n".join(lines)


@dataclass
class Checker:
    """Reads every source for one namespace. `device_records` names the recording
    device of each (edge, device) whose SetActivePower writes are counted."""

    env: dict[str, str]
    device_records: dict[tuple[str, str], Path] = field(default_factory=dict)
    frames: list[FrameLog] = field(default_factory=list)
    skew_ms: int = 0
    alarm_text: Callable[[], str] = lambda: ""
    check_audit: bool = True

    @property
    def settings(self) -> Settings:
        return Settings.from_env(self.env)

    @property
    def keys(self) -> Keys:
        s = self.settings
        return Keys(s.namespace, s.partitions)

    def ledger(self) -> LedgerView:
        return read_ledger(self.env["DISPATCH_REDIS_URL"], self.keys)

    # -- drain ------------------------------------------------------------------------
    def settled(self) -> tuple[bool, str]:
        """Whether every accepted command is terminal, every device write is answered
        by an ack, and the audit holds every event; else what is still open."""
        view = self.ledger()
        open_ = [c for c in view.events if view.status(c) not in TERMINAL]
        if open_:
            return False, f"{len(open_)} command(s) not terminal, e.g. {open_[:3]}"
        written = self._written(view)
        hidden = [c for c in written if view.status(c) not in RESULTS]
        if hidden:
            return False, f"device writes without an ack yet: {hidden[:3]}"
        if self.check_audit:
            stored, _ = read_audit(
                self.env["DISPATCH_DATABASE_URL"], self.settings.namespace, self.keys
            )
            missing = set(view.event_ids) - set(stored)
            if missing:
                return False, f"{len(missing)} event(s) not in PostgreSQL yet"
        return True, ""

    def drain(self, timeout_s: float = 30) -> float:
        """Wait until settled (or the timeout); returns the seconds it took."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if self.settled()[0]:
                break
            time.sleep(0.2)
        return time.monotonic() - start

    # -- check ------------------------------------------------------------------------
    def _writes(self) -> list[tuple[tuple[str, str], dict[str, Any]]]:
        found = []
        for target, path in self.device_records.items():
            for write in read_record(path):
                if write["address"] == SETPOINT_ADDRESS:
                    found.append((target, dict(write)))
        return found

    def _by_value(self, view: LedgerView) -> dict[tuple[str, str, int], str]:
        index: dict[tuple[str, str, int], str] = {}
        for cid in view.events:
            body = view.command(cid)
            if not body or body.get("command_type") != "setpoint":
                continue
            target = body["target"]
            if target["channel"] != "SetActivePower":
                continue
            index[(target["edge_id"], target["device_id"], int(body["value"]))] = cid
        return index

    def _written(self, view: LedgerView) -> Counter[str]:
        index = self._by_value(view)
        written: Counter[str] = Counter()
        for (edge, device), write in self._writes():
            cid = index.get((edge, device, int(write["active_power_w"])))
            if cid is not None:
                written[cid] += 1
        return written

    def check(self, final: bool = True) -> Report:
        """All six invariants after a drain (`final`), or, mid-run, only the safety half:
        I1, I3, I6, and I2's "never a second verdict" (liveness waits for the drain)."""
        report = Report()
        # The device first: a write always follows its command's admission, so a write
        # read here always finds its command in the ledger read just after.
        writes = self._writes()
        view = self.ledger()
        report.figures["commands"] = len(view.events)
        index = self._by_value(view)
        report.figures["device_writes"] = len(writes)
        written: Counter[str] = Counter()
        order: dict[tuple[str, str], list[str]] = defaultdict(list)
        for (edge, device), write in writes:
            value = int(write["active_power_w"])
            cid = index.get((edge, device, value))
            if cid is None:
                if value != 0:
                    report.add("I1", f"write of {value} W to {edge}/{device} matches no command")
                continue
            written[cid] += 1
            if written[cid] == 1:
                order[(edge, device)].append(cid)
            expires = _ms(view.command(cid)["expires_at"])
            if write["t_ms"] > expires + self.skew_ms:
                late = write["t_ms"] - expires
                report.add("I3", f"{cid} written {late} ms after its expiry")
        # I1
        for cid, count in written.items():
            if count > 1:
                report.add("I1", f"{cid} written to the device {count} times")
        # I2 and I5 (ledger side)
        alarms = None
        for cid, events in view.events.items():
            statuses = [e["status"] for e in events]
            verdicts = [e for e in events if e["status"] in VERDICTS]
            results = [e for e in events if e["status"] in RESULTS and not e.get("late")]
            late = [e for e in events if e["status"] in RESULTS and e.get("late")]
            if not view.accepted(cid):
                if statuses.count("rejected") != 1 and (final or statuses.count("rejected") > 1):
                    report.add("I2", f"{cid} refused at admission: {statuses}")
                continue
            if len(verdicts) + len(results) > 1 or (final and not verdicts and not results):
                report.add("I2", f"{cid} has {len(verdicts) + len(results)} verdicts: {statuses}")
            if len(late) > 1 or (late and not verdicts):
                report.add("I2", f"{cid} late acks out of place: {statuses}")
            if final and not verdicts and not results:
                report.add("I5", f"{cid} accepted but never settled: {statuses}")
            if "lost" in statuses:
                alarms = self.alarm_text() if alarms is None else alarms
                if f"command.lost command_id={cid}" not in alarms:
                    report.add("I5", f"{cid} is lost without its alarm line")
            if final and written[cid] and view.status(cid) != "executed":
                report.add("I5", f"{cid} was written to the device but ends {view.status(cid)}")
        # I5 (client side)
        answered = sent = 0
        for log in self.frames:
            for problem in log.unanswered() if final else []:
                report.add("I5", problem)
            sent += len(log.sent)
            answered += len(log.answered)
        report.figures["frames_sent"] = sent
        report.figures["frames_answered"] = answered
        # I6
        for target, cids in order.items():
            positions = [view.issued_at_pos[c] for c in cids]
            for before, after, a, b in zip(positions, positions[1:], cids, cids[1:], strict=False):
                if after < before:
                    report.add("I6", f"{target}: {b} applied after the later-issued {a}")
        # I4
        if self.check_audit and final:
            self._check_audit(view, report)
        report.figures["executed"] = sum(1 for c in view.events if view.status(c) == "executed")
        statuses = Counter(view.status(c) for c in view.events)
        report.figures["statuses"] = dict(statuses)
        return report

    def _check_audit(self, view: LedgerView, report: Report) -> None:
        stored, rows = read_audit(
            self.env["DISPATCH_DATABASE_URL"], self.settings.namespace, self.keys
        )
        for event_id, count in view.event_ids.items():
            if count != 1:
                report.add("I4", f"event {event_id} appears {count} times in the ledger")
            if stored.get(event_id, 0) != 1:
                report.add("I4", f"event {event_id} stored {stored.get(event_id, 0)} times")
        for event_id in set(stored) - set(view.event_ids):
            report.add("I4", f"event {event_id} in PostgreSQL but not in the ledger")
        for cid in view.events:
            if rows.get(cid) != view.status(cid):
                report.add("I4", f"{cid}: audit row {rows.get(cid)!r}, ledger {view.status(cid)!r}")
        rc, output = audit_verify(self.env)
        if rc != 0:
            report.add("I4", f"dispatch audit verify --commands exited {rc}: {output}")


def unanswered(frames: Iterable[FrameLog]) -> list[str]:
    return [p for log in frames for p in log.unanswered()]
