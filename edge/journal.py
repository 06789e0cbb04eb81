"""The durable local record: command log, exactly-once state, ack outbox, overrides.

One SQLite database in WAL mode with `synchronous=FULL`: every method is one transaction
that is on disk when it returns. A command id is recorded once (primary key); its state
only moves forward: accepted -> executing -> executed|failed, or rejected. `executing`
is written before the device is touched, so a crash in between is visible at restart.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import IO

import msgspec

from edge.errors import StateDirBusy
from schemas.commands import Ack

JOURNAL_FILE = "journal.sqlite3"
LOCK_FILE = "agent.lock"
FINAL = ("executed", "failed", "rejected")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS commands (
    command_id   TEXT PRIMARY KEY,
    received_at  REAL NOT NULL,
    command_type TEXT NOT NULL,
    priority     TEXT NOT NULL,
    source       TEXT NOT NULL,
    body         BLOB NOT NULL,
    state        TEXT NOT NULL,
    plan         BLOB,
    prior        REAL,
    ack          BLOB NOT NULL,
    updated_at   REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    at         REAL NOT NULL,
    command_id TEXT NOT NULL,
    event      TEXT NOT NULL,
    code       TEXT,
    detail     TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS events_by_command ON events (command_id, seq);
CREATE TABLE IF NOT EXISTS outbox (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    command_id TEXT NOT NULL,
    status     TEXT NOT NULL,
    ack        BLOB NOT NULL,
    created_at REAL NOT NULL,
    sent_at    REAL
);
CREATE INDEX IF NOT EXISTS outbox_unsent ON outbox (seq) WHERE sent_at IS NULL;
CREATE INDEX IF NOT EXISTS outbox_sent_at ON outbox (sent_at);
CREATE TABLE IF NOT EXISTS overrides (
    command_id    TEXT PRIMARY KEY,
    device_id     TEXT NOT NULL,
    channel       TEXT NOT NULL,
    restore_value REAL NOT NULL,
    revert_at     REAL NOT NULL,
    state         TEXT NOT NULL,
    detail        TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS controllers (
    name       TEXT PRIMARY KEY,
    mode       TEXT NOT NULL,
    running    INTEGER NOT NULL,
    command_id TEXT NOT NULL,
    updated_at REAL NOT NULL
);
"""

_encode = msgspec.json.Encoder().encode
_ack_decoder = msgspec.json.Decoder(Ack)


class CommandState(StrEnum):
    ACCEPTED = "accepted"
    EXECUTING = "executing"
    EXECUTED = "executed"
    FAILED = "failed"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class Stored:
    """What the journal knows about a command id."""

    command_id: str
    state: CommandState
    body: bytes
    plan: bytes | None
    prior: float | None
    ack: Ack


@dataclass(frozen=True, slots=True)
class CommandMeta:
    command_id: str
    command_type: str
    priority: str
    source: str


@dataclass(frozen=True, slots=True)
class Override:
    command_id: str
    device_id: str
    channel: str
    restore_value: float
    revert_at: float  # Unix time, s


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    seq: int
    command_id: str
    status: str
    ack: bytes


@dataclass(frozen=True, slots=True)
class LogEntry:
    seq: int
    at: float
    command_id: str
    event: str
    code: str | None
    detail: str


@dataclass(frozen=True, slots=True)
class ControllerState:
    name: str
    mode: str
    running: bool


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)

    @classmethod
    def open_readonly(cls, path: Path) -> sqlite3.Connection:
        """A read-only connection for `dispatch edge log` (works while the agent runs)."""
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        db.execute("PRAGMA busy_timeout=5000")
        return db

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- commands ----------------------------------------------------------------------------
    def lookup(self, command_id: str) -> Stored | None:
        row = self._db.execute(
            "SELECT command_id, state, body, plan, prior, ack FROM commands WHERE command_id = ?",
            (command_id,),
        ).fetchone()
        return None if row is None else _stored(row)

    def record(
        self,
        meta: CommandMeta,
        body: bytes,
        ack: Ack,
        *,
        plan: bytes | None = None,
        detail: str = "",
    ) -> None:
        """A newly received command: accepted (with its plan) or rejected, and its ack."""
        now = time.time()
        state = CommandState.ACCEPTED if ack.status == "accepted" else CommandState.REJECTED
        with self._tx() as db:
            db.execute(
                "INSERT INTO commands (command_id, received_at, command_type, priority, source,"
                " body, state, plan, ack, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    meta.command_id,
                    now,
                    meta.command_type,
                    meta.priority,
                    meta.source,
                    body,
                    state.value,
                    plan,
                    _encode(ack),
                    now,
                ),
            )
            _event(db, now, meta.command_id, "received", code=None, detail=detail)
            _event(db, now, meta.command_id, state.value, code=_code(ack), detail=_message(ack))
            _outbox(db, now, ack)

    def resend(self, command_id: str, delivery: int) -> Stored | None:
        """A redelivered command: log it and queue its latest ack again."""
        now = time.time()
        with self._tx() as db:
            row = db.execute(
                "SELECT command_id, state, body, plan, prior, ack FROM commands"
                " WHERE command_id = ?",
                (command_id,),
            ).fetchone()
            if row is None:
                return None
            stored = _stored(row)
            _event(db, now, command_id, "duplicate", code=None, detail=f"delivery={delivery}")
            _outbox(db, now, stored.ack)
            return stored

    def start(self, command_id: str, *, prior: float | None = None) -> None:
        """Durably mark a command as executing, before the device is touched."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                "UPDATE commands SET state = ?, prior = ?, updated_at = ? WHERE command_id = ?",
                (CommandState.EXECUTING.value, prior, now, command_id),
            )
            detail = "" if prior is None else f"prior={prior:g}"
            _event(db, now, command_id, "executing", code=None, detail=detail)

    def finish(
        self,
        ack: Ack,
        *,
        override: Override | None = None,
        controller: ControllerState | None = None,
        cancel_override_of: tuple[str, str] | None = None,
        detail: str = "",
    ) -> None:
        """The final outcome, its ack, and what it changes, in one transaction."""
        assert ack.status in ("executed", "failed")
        now = time.time()
        with self._tx() as db:
            db.execute(
                "UPDATE commands SET state = ?, ack = ?, updated_at = ? WHERE command_id = ?",
                (ack.status, _encode(ack), now, ack.command_id),
            )
            _event(
                db, now, ack.command_id, ack.status, code=_code(ack), detail=detail or _message(ack)
            )
            _outbox(db, now, ack)
            if cancel_override_of is not None:
                device_id, channel = cancel_override_of
                db.execute(
                    "UPDATE overrides SET state = 'cancelled', detail = ? WHERE state = 'pending'"
                    " AND device_id = ? AND channel = ?",
                    (f"superseded by {ack.command_id}", device_id, channel),
                )
            if override is not None:
                db.execute(
                    "INSERT OR REPLACE INTO overrides (command_id, device_id, channel,"
                    " restore_value, revert_at, state) VALUES (?,?,?,?,?,'pending')",
                    (
                        override.command_id,
                        override.device_id,
                        override.channel,
                        override.restore_value,
                        override.revert_at,
                    ),
                )
            if controller is not None:
                db.execute(
                    "INSERT OR REPLACE INTO controllers (name, mode, running, command_id,"
                    " updated_at) VALUES (?,?,?,?,?)",
                    (
                        controller.name,
                        controller.mode,
                        int(controller.running),
                        ack.command_id,
                        now,
                    ),
                )

    def unfinished(self) -> list[Stored]:
        """Commands accepted or executing when the agent last stopped (in arrival order)."""
        rows = self._db.execute(
            "SELECT command_id, state, body, plan, prior, ack FROM commands"
            " WHERE state IN ('accepted', 'executing') ORDER BY received_at",
        ).fetchall()
        return [_stored(r) for r in rows]

    def events_of(self, command_id: str, event: str) -> list[float]:
        """When a command's log has `event` (Unix times, oldest first)."""
        rows = self._db.execute(
            "SELECT at FROM events WHERE command_id = ? AND event = ? ORDER BY seq",
            (command_id, event),
        ).fetchall()
        return [float(r[0]) for r in rows]

    # -- overrides ---------------------------------------------------------------------------
    def pending_overrides(self) -> list[Override]:
        rows = self._db.execute(
            "SELECT command_id, device_id, channel, restore_value, revert_at FROM overrides"
            " WHERE state = 'pending' ORDER BY revert_at",
        ).fetchall()
        return [Override(*r) for r in rows]

    def pending_override_of(self, device_id: str, channel: str) -> Override | None:
        row = self._db.execute(
            "SELECT command_id, device_id, channel, restore_value, revert_at FROM overrides"
            " WHERE state = 'pending' AND device_id = ? AND channel = ?",
            (device_id, channel),
        ).fetchone()
        return None if row is None else Override(*row)

    def settle_override(self, command_id: str, state: str, detail: str) -> None:
        """An override ended: `reverted`, `replaced` or `failed` (no longer retried)."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                "UPDATE overrides SET state = ?, detail = ? WHERE command_id = ?",
                (state, detail, command_id),
            )
            _event(db, now, command_id, f"override_{state}", code=None, detail=detail)

    def note(self, command_id: str, event: str, detail: str, code: str | None = None) -> None:
        """A free-form line in the local command log."""
        with self._tx() as db:
            _event(db, time.time(), command_id, event, code=code, detail=detail)

    # -- controllers -------------------------------------------------------------------------
    def controllers(self) -> dict[str, ControllerState]:
        rows = self._db.execute("SELECT name, mode, running FROM controllers").fetchall()
        return {r[0]: ControllerState(r[0], r[1], bool(r[2])) for r in rows}

    # -- outbox ------------------------------------------------------------------------------
    def unsent(self, limit: int = 100) -> list[OutboxEntry]:
        rows = self._db.execute(
            "SELECT seq, command_id, status, ack FROM outbox WHERE sent_at IS NULL"
            " ORDER BY seq LIMIT ?",
            (limit,),
        ).fetchall()
        return [OutboxEntry(*r) for r in rows]

    def mark_sent(self, seqs: list[int]) -> None:
        if not seqs:
            return
        now = time.time()
        with self._tx() as db:
            db.executemany("UPDATE outbox SET sent_at = ? WHERE seq = ?", [(now, s) for s in seqs])

    def resend_since(self, since: float) -> int:
        """Queue again the final acks sent at or after `since` (they may have been lost)."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE outbox SET sent_at = NULL WHERE sent_at >= ?"
                " AND status IN ('executed', 'failed', 'rejected')",
                (since,),
            )
            return cur.rowcount

    def unsent_count(self) -> int:
        row = self._db.execute("SELECT count(*) FROM outbox WHERE sent_at IS NULL").fetchone()
        return int(row[0])


def read_log(
    db: sqlite3.Connection, *, limit: int, command_id: str | None = None
) -> list[LogEntry]:
    """The newest `limit` log lines (oldest first), optionally of one command."""
    where, params = ("WHERE command_id = ?", [command_id]) if command_id else ("", [])
    rows = db.execute(
        f"SELECT seq, at, command_id, event, code, detail FROM events {where}"
        " ORDER BY seq DESC LIMIT ?",
        (*params, limit),
    ).fetchall()
    return [LogEntry(*r) for r in reversed(rows)]


def _stored(row: tuple[str, str, bytes, bytes | None, float | None, bytes]) -> Stored:
    return Stored(
        command_id=row[0],
        state=CommandState(row[1]),
        body=bytes(row[2]),
        plan=None if row[3] is None else bytes(row[3]),
        prior=row[4],
        ack=_ack_decoder.decode(row[5]),
    )


def _event(
    db: sqlite3.Connection, at: float, command_id: str, event: str, *, code: str | None, detail: str
) -> None:
    db.execute(
        "INSERT INTO events (at, command_id, event, code, detail) VALUES (?,?,?,?,?)",
        (at, command_id, event, code, detail),
    )


def _outbox(db: sqlite3.Connection, at: float, ack: Ack) -> None:
    db.execute(
        "INSERT INTO outbox (command_id, status, ack, created_at) VALUES (?,?,?,?)",
        (ack.command_id, ack.status, _encode(ack), at),
    )


def _code(ack: Ack) -> str | None:
    return None if ack.error is None else ack.error.code


def _message(ack: Ack) -> str:
    return "" if ack.error is None else ack.error.message


class StateLock:
    """An exclusive lock on the state directory: one agent per journal."""

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / LOCK_FILE
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise StateDirBusy(
                f"state directory {self.path.parent} is in use by {holder}; "
                "stop that agent or give this one its own --state-dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None
