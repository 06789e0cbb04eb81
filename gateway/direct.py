"""Statuses passed on from a script's reply, before the log tail brings them.

The hub's tail reads every event a round trip or more after the script that appended
it answered. For the events this gateway appended itself (an admission, an edge's
ack) it already holds everything a status frame needs when the reply arrives, so it
sends them then, and the tail skips them when it gets there.

Each session must still see each status once, in log order, whichever process
appended it (verdicts come from the timeout worker, acks from another gateway). So a
reply is passed on only when
  * the tail has not reached its first entry yet (else the tail has sent it), and
  * this gateway has passed on every earlier status of the command: the scripts
    return the command's log entry before theirs (`Appended.after`), and it must be
    the last one passed on here.
Otherwise the reply is left to the tail, which sends everything in log order. Memory
is bounded: past `limit` commands or entries this leaves everything to the tail,
which is only slower.

The tail asks `passed` first, with nothing but the entry's place: an entry passed on
already is not even decoded (the reply path did its bookkeeping too).
"""

from __future__ import annotations

from ledger.lifecycle import TERMINAL
from ledger.records import Appended
from schemas.events import status_of


def _position(entry: str) -> tuple[int, int]:
    """A stream entry id as a comparable (ms, seq) pair."""
    ms, _, seq = entry.partition("-")
    return int(ms), int(seq or 0)


class DirectAnswers:
    def __init__(self, limit: int = 100_000) -> None:
        self.limit = limit
        self._last: dict[str, str] = {}  # command id -> newest entry passed on
        # Entries passed on that the tail has not reached (ids are unique per stream
        # only) -> their command and whether its status is terminal.
        self._ahead: dict[tuple[str, str], tuple[str, bool]] = {}
        self._tail_at: dict[str, tuple[int, int]] = {}  # stream -> last entry reached

    def __len__(self) -> int:
        return len(self._last)

    def take(self, appended: Appended) -> bool:
        """May `appended` be passed on now? If so it counts as passed on."""
        entries = [entry for entry, _ in appended.events]
        reached = self._tail_at.get(appended.stream)
        if reached is not None and _position(entries[0]) <= reached:
            return False  # the tail got there first: it sends them
        if self._last.get(appended.command_id, "") != appended.after:
            return False  # an earlier status is still on its way through the tail
        if len(self._ahead) >= self.limit:
            return False
        for entry, event in appended.events:
            terminal = status_of(event) in TERMINAL
            self._ahead[(appended.stream, entry)] = (appended.command_id, terminal)
        self._last[appended.command_id] = entries[-1]
        return True

    def passed(self, stream: str, entry: str) -> bool:
        """The tail reached `entry` of `stream`: True (and done with it) if it was passed
        on from a reply; False: decode it and ask `reached`."""
        known = self._ahead.pop((stream, entry), None)
        if known is None:
            return False
        self._tail_at[stream] = _position(entry)
        command_id, terminal = known
        if terminal and self._last.get(command_id) == entry:
            del self._last[command_id]  # nothing more is expected (a late ack: the tail)
        return True

    def reached(self, stream: str, command_id: str, entry: str, *, terminal: bool) -> bool:
        """The tail reached `entry` of `stream`: True if it was passed on already."""
        self._tail_at[stream] = _position(entry)
        ahead = self._ahead.pop((stream, entry), None) is not None
        if not ahead:
            if len(self._last) < self.limit:
                self._last[command_id] = entry
            else:
                self._last.clear()  # forget: those commands' later statuses go by the tail
        if terminal and self._last.get(command_id) == entry:
            del self._last[command_id]  # nothing more is expected (a late ack: the tail)
        return ahead
