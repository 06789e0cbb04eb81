"""Statuses passed on from replies ahead of the tail: once each, in each command's log order.

A model of the hub: scripts (this gateway's, whose replies carry their events, and
other processes', which only the tail sees) append events of a few commands to two
partition logs; the tail reaches each log's entries in order, and replies arrive in
any order, early or late. Whatever the interleaving, every session must get each
status exactly once and each command's statuses in log order.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.direct import DirectAnswers
from ledger.records import Appended
from schemas.errors import ErrorCode, error
from schemas.events import Delivered, Event, TimedOut


@dataclass(frozen=True)
class Script:
    command: int
    own: bool  # appended by this gateway: its reply reaches the direct path
    events: tuple[str, ...]  # entry ids
    terminal: tuple[bool, ...]


def _event(command: int, terminal: bool) -> Event:
    head = {"event_id": "e", "command_id": f"c{command}", "edge_id": "x", "actor": "a"}
    if terminal:
        return TimedOut(error=error(ErrorCode.TIMEOUT, "no ack"), **head)
    return Delivered(**head)


scripts_strategy = st.lists(
    st.tuples(
        st.integers(0, 3),  # command (commands 0, 2 in log:0; 1, 3 in log:1)
        st.booleans(),
        st.lists(st.booleans(), min_size=1, max_size=3),  # its events' terminal flags
    ),
    min_size=1,
    max_size=10,
)


@settings(max_examples=400, deadline=None)
@given(scripts_strategy, st.sampled_from([1, 2, 3, 100_000]), st.data())
def test_every_status_passes_once_in_its_commands_log_order(
    drawn: list[tuple[int, bool, list[bool]]], limit: int, data: st.DataObject
) -> None:
    def stream(command: int) -> str:
        return f"log:{command % 2}"

    # Entry ids are unique per stream only: both logs use the same ones.
    scripts: list[Script] = []
    written = {"log:0": 0, "log:1": 0}
    for command, own, terminal in drawn:
        written[stream(command)] += 1
        entries = tuple(f"{written[stream(command)]}-{i}" for i in range(len(terminal)))
        scripts.append(Script(command, own, entries, tuple(terminal)))

    direct = DirectAnswers(limit)
    last_entry: dict[int, str] = {}  # what the command's `last` field holds in Redis
    logs: dict[str, list[tuple[int, str, bool]]] = {"log:0": [], "log:1": []}
    reached = {"log:0": 0, "log:1": 0}
    replies: list[Appended] = []
    passed: dict[int, list[str]] = {}
    accounted: list[tuple[str, str]] = []  # the bookkeeping, once per event: reply or tail
    appended = 0

    def append_next() -> None:
        nonlocal appended
        script = scripts[appended]
        appended += 1
        log = stream(script.command)
        after = last_entry.get(script.command, "")
        for entry, terminal in zip(script.events, script.terminal, strict=True):
            logs[log].append((script.command, entry, terminal))
        last_entry[script.command] = script.events[-1]
        if script.own:
            events = tuple(
                (e, _event(script.command, t))
                for e, t in zip(script.events, script.terminal, strict=True)
            )
            replies.append(Appended(log, f"c{script.command}", after, events))

    def reach(log: str) -> None:
        command, entry, terminal = logs[log][reached[log]]
        reached[log] += 1
        if direct.passed(log, entry):  # passed on from its reply: not even decoded
            return
        accounted.append((log, entry))
        if not direct.reached(log, f"c{command}", entry, terminal=terminal):
            passed.setdefault(command, []).append(entry)

    def answer(reply: Appended) -> None:
        if direct.take(reply):
            command = int(reply.command_id[1:])
            passed.setdefault(command, []).extend(e for e, _ in reply.events)
            accounted.extend((reply.stream, e) for e, _ in reply.events)

    while True:
        moves: list[str] = []
        if appended < len(scripts):
            moves.append("append")
        moves += [log for log in logs if reached[log] < len(logs[log])]
        if replies:
            moves.append("reply")
        if not moves:
            break
        move = data.draw(st.sampled_from(moves))
        if move == "append":
            append_next()
        elif move == "reply":
            answer(replies.pop(data.draw(st.integers(0, len(replies) - 1))))
        else:
            reach(move)

    for command in {s.command for s in scripts}:
        expected = [e for s in scripts if s.command == command for e in s.events]
        assert passed.get(command, []) == expected
    every = [(log, entry) for log in logs for _, entry, _ in logs[log]]
    assert sorted(accounted) == sorted(every)
    # Memory: a command whose last status is terminal is forgotten, whichever path
    # brought that status (the limit may have made it forget more).
    unfinished = {
        s.command
        for s in scripts
        if not [t for x in scripts if x.command == s.command for t in x.terminal][-1]
    }
    assert len(direct) <= len(unfinished)
    if limit > len(scripts):
        assert len(direct) == len(unfinished)
