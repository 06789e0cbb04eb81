"""The durable local record: command log, exactly-once state, ack outbox, overrides.

One SQLite database in WAL mode with `synchronous=FULL`. Writes run on a dedicated
writer thread (the fsyncs never block the event loop) with group commit: the writes
queued while a commit is on disk share the next one, each in its own savepoint so one
failing write fails alone. Every write method is awaited until its commit is on disk.
Reads use a second connection on the caller's thread (WAL readers do not wait for the
writer). A command id is recorded once (primary key); its state only moves forward:
accepted -> executing -> executed|failed, or rejected. `executing` is durable before the
device is touched, so a crash in between is visible at restart.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import IO, Any, TypeVar

import msgspec

from edge.errors import StateDirBusy
from schemas.commands import Ack

JOURNAL_FILE = "journal.sqlite3"
LOCK_FILE = "agent.lock"
FINAL = ("executed", "failed", "rejected")
T = TypeVar("T")
log = logging.getLogger("edge.journal")

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
    sent_at    REAL,
    recorded   TEXT  -- NULL: not confirmed; 'recorded' | 'refused' (the gateway's notice)
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


CommitObserver = Callable[[float, int], None]  # (seconds in a durable COMMIT, its writes)
# (write, its future, durable): a batch of only non-durable writes (bookkeeping whose loss
# in a power cut costs at most a resent ack) commits without an fsync.
_Write = tuple[Callable[[sqlite3.Connection], Any], "concurrent.futures.Future[Any]", bool]


class _Writer(threading.Thread):
    """The one thread that writes the journal: group commit of whatever is queued."""

    def __init__(self, db: sqlite3.Connection, on_commit: CommitObserver | None) -> None:
        super().__init__(name="journal-writer", daemon=True)
        self.db = db
        self.on_commit = on_commit
        self.pending: queue.SimpleQueue[_Write | None] = queue.SimpleQueue()
        self._full = True  # the connection's PRAGMA synchronous is FULL

    def run(self) -> None:
        stopping = False
        while not stopping:
            first = self.pending.get()
            if first is None:
                break
            batch = [first]
            while True:  # everything ready now shares this commit
                try:
                    item = self.pending.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            self._commit(batch)
        self.db.close()

    def _commit(self, batch: list[_Write]) -> None:
        # A caller cancelled before its turn: its write never happens (as if it crashed
        # first). Once running, a write cannot be cancelled, so its result always lands.
        batch = [item for item in batch if item[1].set_running_or_notify_cancel()]
        if not batch:
            return
        db = self.db
        durable = any(item[2] for item in batch)
        outcomes: list[tuple[concurrent.futures.Future[Any], Any, BaseException | None]] = []
        try:
            if durable != self._full:
                # WAL + NORMAL: the commit reaches the log but is fsynced only by the next
                # FULL commit; still atomic and consistent after a crash.
                db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
                self._full = durable
            db.execute("BEGIN IMMEDIATE")
            for write, future, _ in batch:
                db.execute("SAVEPOINT one_write")
                try:
                    result = write(db)
                except Exception as exc:  # this write fails alone; the others commit
                    db.execute("ROLLBACK TO one_write")
                    db.execute("RELEASE one_write")
                    outcomes.append((future, None, exc))
                    continue
                db.execute("RELEASE one_write")
                outcomes.append((future, result, None))
            started = time.perf_counter()
            db.execute("COMMIT")
            if durable and self.on_commit is not None:
                self.on_commit(time.perf_counter() - started, len(batch))
        except Exception as exc:  # the commit itself failed: nothing of the batch is durable
            log.exception("edge.journal.commit_failed writes=%d", len(batch))
            if db.in_transaction:
                db.execute("ROLLBACK")
            outcomes = [(future, None, exc) for _, future, _ in batch]
        for future, result, error in outcomes:
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)


class Journal:
    def __init__(self, path: Path, *, on_commit: CommitObserver | None = None) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        writer.execute("PRAGMA journal_mode=WAL")
        writer.execute("PRAGMA synchronous=FULL")
        writer.execute("PRAGMA busy_timeout=5000")
        writer.executescript(_SCHEMA)
        columns = {row[1] for row in writer.execute("PRAGMA table_info(outbox)")}
        if "recorded" not in columns:  # a journal from before ack notices
            writer.execute("ALTER TABLE outbox ADD COLUMN recorded TEXT")
        writer.execute(
            "CREATE INDEX IF NOT EXISTS outbox_unrecorded ON outbox (created_at)"
            " WHERE recorded IS NULL"
        )
        writer.execute(
            "CREATE INDEX IF NOT EXISTS outbox_recorded ON outbox (seq) WHERE recorded IS NOT NULL"
        )
        # Reads on the caller's thread; a second connection so they never see a
        # half-built group commit.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA busy_timeout=5000")
        self._writer = _Writer(writer, on_commit)
        self._writer.start()

    @classmethod
    def open_readonly(cls, path: Path) -> sqlite3.Connection:
        """A read-only connection for `dispatch edge log` (works while the agent runs)."""
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        db.execute("PRAGMA busy_timeout=5000")
        return db

    def close(self) -> None:
        """Finish the queued writes, stop the writer, close both connections."""
        if self._writer.is_alive():
            self._writer.pending.put(None)
            self._writer.join()
        self._db.close()

    async def _write(self, write: Callable[[sqlite3.Connection], T], *, durable: bool = True) -> T:
        """Run `write` inside the next group commit; returns once it is committed (on disk
        when `durable`)."""
        if not self._writer.is_alive():
            raise RuntimeError("Expected an open journal, but it is closed")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._writer.pending.put((write, future, durable))
        return await asyncio.wrap_future(future)

    # -- commands ----------------------------------------------------------------------------
    def lookup(self, command_id: str) -> Stored | None:
        row = self._db.execute(
            "SELECT command_id, state, body, plan, prior, ack FROM commands WHERE command_id = ?",
            (command_id,),
        ).fetchone()
        return None if row is None else _stored(row)

    async def record(
        self,
        meta: CommandMeta,
        body: bytes,
        ack: Ack,
        *,
        plan: bytes | None = None,
        detail: str = "",
    ) -> None:
        """A newly received command: accepted (with its plan) or rejected, and its ack."""
        state = CommandState.ACCEPTED if ack.status == "accepted" else CommandState.REJECTED

        def write(db: sqlite3.Connection) -> None:
            now = time.time()
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

        # No fsync of its own: the durable `executing` write, always before a device is
        # touched, carries it to disk. A power cut before that loses only a command that
        # was never executed (the gateway then times it out; a redelivery runs it once);
        # a process crash loses nothing (WAL).
        await self._write(write, durable=False)

    async def resend(self, command_id: str, delivery: int) -> Stored | None:
        """A redelivered command: log it and queue its latest ack again."""

        def write(db: sqlite3.Connection) -> Stored | None:
            now = time.time()
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

        if self.lookup(command_id) is None:  # the common case needs no write at all
            return None
        return await self._write(write)

    async def start(self, command_id: str, *, prior: float | None = None) -> None:
        """Durably mark a command as executing, before the device is touched."""

        def write(db: sqlite3.Connection) -> None:
            now = time.time()
            db.execute(
                "UPDATE commands SET state = ?, prior = ?, updated_at = ? WHERE command_id = ?",
                (CommandState.EXECUTING.value, prior, now, command_id),
            )
            detail = "" if prior is None else f"prior={prior:g}"
            _event(db, now, command_id, "executing", code=None, detail=detail)

        await self._write(write)

    async def finish(
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

        def write(db: sqlite3.Connection) -> None:
            now = time.time()
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

        await self._write(write)

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

    async def settle_override(self, command_id: str, state: str, detail: str) -> None:
        """An override ended: `reverted`, `replaced` or `failed` (no longer retried)."""

        def write(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE overrides SET state = ?, detail = ? WHERE command_id = ?",
                (state, detail, command_id),
            )
            _event(db, time.time(), command_id, f"override_{state}", code=None, detail=detail)

        await self._write(write)

    async def note(self, command_id: str, event: str, detail: str, code: str | None = None) -> None:
        """A free-form line in the local command log."""

        def write(db: sqlite3.Connection) -> None:
            _event(db, time.time(), command_id, event, code=code, detail=detail)

        await self._write(write)

    # -- controllers -------------------------------------------------------------------------
    def controllers(self) -> dict[str, ControllerState]:
        rows = self._db.execute("SELECT name, mode, running FROM controllers").fetchall()
        return {r[0]: ControllerState(r[0], r[1], bool(r[2])) for r in rows}

    # -- outbox ------------------------------------------------------------------------------
    def unsent(self, limit: int = 100) -> list[OutboxEntry]:
        rows = self._db.execute(
            "SELECT seq, command_id, status, ack FROM outbox WHERE sent_at IS NULL"
            " AND recorded IS NULL ORDER BY seq LIMIT ?",
            (limit,),
        ).fetchall()
        return [OutboxEntry(*r) for r in rows]

    async def mark_sent(self, seqs: list[int]) -> None:
        if not seqs:
            return

        def write(db: sqlite3.Connection) -> None:
            now = time.time()
            db.executemany("UPDATE outbox SET sent_at = ? WHERE seq = ?", [(now, s) for s in seqs])

        # Not worth an fsync: lost in a power cut, the ack is merely sent again.
        await self._write(write, durable=False)

    async def resend_since(self, since: float, *, unrecorded_since: float | None = None) -> int:
        """Queue again the final acks that may have been lost.

        Those sent at or after `since` (a gateway that never confirms acks), and, with
        `unrecorded_since`, every final ack created since then that the gateway has not
        confirmed recorded or refused.
        """

        def write(db: sqlite3.Connection) -> int:
            cur = db.execute(
                "UPDATE outbox SET sent_at = NULL WHERE sent_at IS NOT NULL AND recorded IS NULL"
                " AND status IN ('executed', 'failed', 'rejected')"
                " AND (sent_at >= ? OR created_at >= ?)",
                (since, since if unrecorded_since is None else unrecorded_since),
            )
            return cur.rowcount

        return await self._write(write)

    async def mark_recorded(self, command_id: str, status: str | None, outcome: str) -> int:
        """The gateway's notice about an ack: `recorded` or `refused`; never resent after."""

        def write(db: sqlite3.Connection) -> int:
            cur = db.execute(
                "UPDATE outbox SET recorded = ? WHERE command_id = ? AND recorded IS NULL"
                " AND (? IS NULL OR status = ?)",
                (outcome, command_id, status, status),
            )
            return cur.rowcount

        return await self._write(write, durable=False)  # lost: the ack is merely resent

    async def requeue(self, command_id: str, status: str | None) -> int:
        """Send an ack again (the gateway could not record it now)."""

        def write(db: sqlite3.Connection) -> int:
            cur = db.execute(
                "UPDATE outbox SET sent_at = NULL WHERE seq = (SELECT max(seq) FROM outbox"
                " WHERE command_id = ? AND recorded IS NULL AND (? IS NULL OR status = ?))"
                " AND sent_at IS NOT NULL",
                (command_id, status, status),
            )
            return cur.rowcount

        return await self._write(write)

    def confirms_acks(self) -> bool:
        """Has the gateway ever confirmed an ack (it sends ack_recorded notices)?"""
        row = self._db.execute("SELECT 1 FROM outbox WHERE recorded IS NOT NULL LIMIT 1")
        return row.fetchone() is not None

    def unsent_count(self) -> int:
        row = self._db.execute(
            "SELECT count(*) FROM outbox WHERE sent_at IS NULL AND recorded IS NULL"
        ).fetchone()
        return int(row[0])

    def awaiting_count(self, since: float) -> int:
        """Final acks created since `since` that the gateway has not confirmed yet."""
        row = self._db.execute(
            "SELECT count(DISTINCT command_id) FROM outbox WHERE recorded IS NULL"
            " AND status IN ('executed', 'failed', 'rejected') AND created_at >= ?",
            (since,),
        ).fetchone()
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
