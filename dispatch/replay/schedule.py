"""The schedule: what the replay does, in which order, and what each step waits for (pure).

The recorded timeline (every event of the window's commands, in log order) is walked
once. The things that came from outside the cloud become actions: a command submitted,
a cancellation, the edge going offline or coming back, a withheld acknowledgment
finally arriving. Everything else (routing, queueing, supersession, expiry, execution,
verdicts) is what the sandbox must produce by itself.

Each action carries gates: the status every earlier command had reached when the action
happened (B was issued after A was executed, or while A was still queued, ...). The
replay performs an action only once the sandbox has reached the same point for each of
them, and otherwise keeps the recorded spacing divided by the speed. Connectivity is
read from routing: a command admitted as `queued` means the edge was offline, a
`routed` one (or a backlog delivery) that it was online.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import Any

import msgspec

from dispatch.replay.window import Window, iso
from ledger import lifecycle
from ledger.lifecycle import CommandState
from schemas.commands import EdgeCommand
from schemas.events import Cancelled, Event, Issued, Queued, Routed, Status, status_of

S = Status
# Ack statuses on the wire (what an edge sends) for each lifecycle status they map to.
WIRE = {S.DELIVERED: "accepted", S.EXECUTED: "executed", S.FAILED: "failed", S.REJECTED: "rejected"}
ACKED = frozenset(WIRE)


class Kind(StrEnum):
    SUBMIT = "submit"
    CANCEL = "cancel"
    OFFLINE = "offline"  # cut the edge's link; it stays away until ONLINE
    ONLINE = "online"
    RELEASE = "release"  # pass on the acknowledgments held back for one command


@dataclass(frozen=True, slots=True)
class Gate:
    """The sandbox must have brought `command_id` to `status` (or past it) first."""

    command_id: str
    status: Status

    def text(self) -> str:
        return f"{self.command_id} {self.status.value}"


@dataclass(frozen=True, slots=True)
class Action:
    kind: Kind
    at_ms: int  # when it happened in the recording
    command_id: str = ""
    gates: tuple[Gate, ...] = ()

    def text(self) -> str:
        return f"{self.kind.value} {self.command_id}".strip()


@dataclass(frozen=True, slots=True)
class Plan:
    actions: list[Action]
    # command_id -> wire ack statuses the relay holds back until that command's RELEASE
    # (forever when there is none: the edge never answered in the recording).
    holds: dict[str, frozenset[str]]


def reached(state: CommandState | None, gate: Gate) -> bool:
    """Whether a command's replayed state is at or past the gate's status."""
    if state is None or state.status is None:
        return False
    if gate.status in state.firsts or state.status in lifecycle.FINAL:
        return True
    return lifecycle.RANK[state.status] >= lifecycle.RANK[gate.status]


def plan(window: Window) -> Plan:
    """The actions of a recorded window, each gated on what preceded it."""
    holds = _holds(window.timeline)
    admitted_offline = _admitted_offline(window.timeline)
    states: dict[str, CommandState] = {}
    actions: list[Action] = []
    online = True
    released: set[str] = set()

    for event in window.timeline:
        cid = event.command_id
        state = states.get(cid)
        others = _gates(states, skip=cid)
        if isinstance(event, Issued):
            offline = admitted_offline.get(cid, False)
            if offline == online:  # the link changed before this command arrived
                kind = Kind.OFFLINE if offline else Kind.ONLINE
                actions.append(Action(kind, event.at, "", others))
                online = not offline
            actions.append(Action(Kind.SUBMIT, event.at, cid, others))
        elif not online and _shows_online(event, state):
            actions.append(Action(Kind.ONLINE, event.at, "", _gates(states)))
            online = True
        elif isinstance(event, Cancelled) and state is not None and state.status is not None:
            actions.append(Action(Kind.CANCEL, event.at, cid, (*others, Gate(cid, state.status))))
        elif (
            cid in holds
            and cid not in released
            and from_edge(event)
            and state is not None
            and state.status in lifecycle.VERDICTS
        ):
            released.add(cid)
            actions.append(Action(Kind.RELEASE, event.at, cid, (*others, Gate(cid, state.status))))
        if state is None:
            state = CommandState(command_id=cid, edge_id=event.edge_id)
        states[cid] = lifecycle.fold(state, event)
    return Plan(actions, holds)


def _gates(states: dict[str, CommandState], skip: str = "") -> tuple[Gate, ...]:
    """Where every command (but `skip`) stood at this point of the recording."""
    return tuple(
        Gate(cid, s.status) for cid, s in states.items() if cid != skip and s.status is not None
    )


def _shows_online(event: Event, state: CommandState | None) -> bool:
    """A backlog delivery, a redelivery or anything from the edge: it is connected."""
    if isinstance(event, Routed):
        return event.delivery > 1 or (state is not None and state.status is S.QUEUED)
    return from_edge(event) and not getattr(event, "late", False)


def from_edge(event: Event) -> bool:
    """An acknowledgment the edge sent (the cloud's own failures, e.g. superseded, are not)."""
    return status_of(event) in ACKED and event.actor == f"edge:{event.edge_id}"


def _admitted_offline(timeline: Sequence[Event]) -> dict[str, bool]:
    """command_id -> whether its admission found the edge offline (queued, not routed)."""
    out: dict[str, bool] = {}
    for event in timeline:
        if event.command_id not in out and isinstance(event, Queued | Routed):
            out[event.command_id] = isinstance(event, Queued)
    return out


def _holds(timeline: Sequence[Event]) -> dict[str, frozenset[str]]:
    """Commands whose edge went silent: no ack before the verdict (timed_out or lost)."""
    seen: dict[str, set[Status]] = {}
    holds: dict[str, frozenset[str]] = {}
    for event in timeline:
        status = status_of(event)
        before = seen.setdefault(event.command_id, set())
        if status in lifecycle.VERDICTS and event.command_id not in holds:
            wire = {WIRE[s] for s in ACKED if s is not S.DELIVERED}
            if S.DELIVERED not in before:
                wire.add(WIRE[S.DELIVERED])
            holds[event.command_id] = frozenset(wire)
        before.add(status)
    return holds


def body(command: EdgeCommand, issued_ms: int, submit_ms: int) -> dict[str, Any]:
    """The command as submitted again, exactly as old on arrival as it was recorded.

    Its timestamp moves by as much as its submission did, so `issued - timestamp` and
    hence its expiry behave as recorded.
    """
    shift = timedelta(milliseconds=submit_ms - issued_ms)
    out: dict[str, Any] = {
        "command_id": command.command_id,
        "command_type": command.command_type.value,
        "target": msgspec.to_builtins(command.target),
        "value": command.value,
        "unit": command.unit,
        "expiry_sec": command.expiry_sec,
        "source": command.source,
        "timestamp": iso(command.timestamp + shift),
        "priority": command.priority,
    }
    if command.duration_sec is not None:
        out["duration_sec"] = command.duration_sec
    return out
