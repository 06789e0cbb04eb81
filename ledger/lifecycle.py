"""The command lifecycle as one pure state machine, shared by gateway, projector and replay.

Two views of the same rules:

* `ALLOWED` says which status may follow which. The ledger's Lua scripts enforce it as
  a compare-and-set (they receive `allowed_from(to)` computed here), so Redis never
  holds an illegal transition.
* `fold` folds events into a `CommandState`. Every legal transition raises the
  status' rank, so the fold can take "the highest-ranked status seen" and becomes
  commutative and idempotent: any order of the same events converges to the same
  state, which is what projections, replays and dashboards that see events late need.
"""

from __future__ import annotations

from collections.abc import Iterable

from msgspec import Struct, structs

from schemas.commands import EdgeCommand
from schemas.errors import ErrorObject
from schemas.events import Event, Issued, Routed, Status, status_of

S = Status

# Higher rank dominates. Late acknowledgments outrank verdicts so the audit never hides
# a setpoint that was applied after the cloud gave up on it.
RANK: dict[Status, int] = {
    S.ISSUED: 0,
    S.AUTHORIZED: 1,
    S.QUEUED: 2,
    S.ROUTED: 3,
    S.DELIVERED: 4,
    S.TIMED_OUT: 5,
    S.LOST: 5,
    S.EXPIRED: 6,
    S.CANCELLED: 6,
    S.REJECTED: 7,
    S.FAILED: 7,
    S.EXECUTED: 8,
}

# Results an edge reports; the only statuses that may follow a verdict.
ACK_RESULTS = frozenset({S.EXECUTED, S.FAILED, S.REJECTED})
# Verdicts the cloud reaches on its own; a later acknowledgment still lands (as late).
VERDICTS = frozenset({S.TIMED_OUT, S.LOST})
FINAL = frozenset({S.EXECUTED, S.FAILED, S.REJECTED, S.EXPIRED, S.CANCELLED})
TERMINAL = FINAL | VERDICTS
# Statuses in which the command may still be handed to the edge.
DELIVERABLE = frozenset({S.AUTHORIZED, S.QUEUED, S.ROUTED})
# Statuses in which the edge has not accepted it yet (expiry and cancellation apply).
UNDELIVERED = frozenset({S.ISSUED, S.AUTHORIZED, S.QUEUED})

ALLOWED: dict[Status | None, frozenset[Status]] = {
    None: frozenset({S.ISSUED}),
    S.ISSUED: frozenset({S.AUTHORIZED, S.REJECTED}),
    S.AUTHORIZED: frozenset({S.QUEUED, S.ROUTED, S.REJECTED, S.CANCELLED, S.EXPIRED}),
    S.QUEUED: frozenset({S.ROUTED, S.CANCELLED, S.EXPIRED, S.FAILED, S.LOST}),
    # routed -> routed is a redelivery (new delivery count, new ack deadline).
    S.ROUTED: frozenset({S.ROUTED, S.DELIVERED, S.TIMED_OUT, S.LOST} | ACK_RESULTS),
    S.DELIVERED: frozenset({S.TIMED_OUT} | ACK_RESULTS),
    S.TIMED_OUT: ACK_RESULTS,
    S.LOST: ACK_RESULTS,
    S.EXECUTED: frozenset(),
    S.FAILED: frozenset(),
    S.REJECTED: frozenset(),
    S.EXPIRED: frozenset(),
    S.CANCELLED: frozenset(),
}


class IllegalTransition(ValueError):
    """A transition the lifecycle forbids, e.g. `executed` -> `routed`."""


def can_transition(current: Status | None, to: Status) -> bool:
    return to in ALLOWED[current]


def allowed_from(to: Status) -> frozenset[Status]:
    """Statuses from which `to` is legal (what the ledger's compare-and-set accepts)."""
    return frozenset(s for s, targets in ALLOWED.items() if s is not None and to in targets)


def transition(current: Status | None, to: Status) -> Status:
    """The guarded step; raises `IllegalTransition` naming both ends."""
    if not can_transition(current, to):
        shown = current.value if current else "nothing"
        raise IllegalTransition(f"expected a status that may precede {to.value}, got {shown}")
    return to


def is_late(current: Status | None, to: Status) -> bool:
    """An acknowledgment arriving after the cloud's verdict."""
    return current in VERDICTS and to in ACK_RESULTS


class CommandState(Struct, frozen=True, kw_only=True, gc=False):
    """What the events of one command say about it, independent of their order."""

    command_id: str
    edge_id: str
    status: Status | None = None
    # Earliest event per status (ties broken by event id): a deterministic choice.
    firsts: dict[Status, Event] = {}
    deliveries: int = 0

    @property
    def command(self) -> EdgeCommand | None:
        issued = self.firsts.get(S.ISSUED)
        return issued.command if isinstance(issued, Issued) else None

    @property
    def late(self) -> bool:
        return self.status in ACK_RESULTS and any(v in self.firsts for v in VERDICTS)

    @property
    def error(self) -> ErrorObject | None:
        event = self.firsts.get(self.status) if self.status else None
        err = getattr(event, "error", None)
        return err if isinstance(err, ErrorObject) else None

    def at(self, status: Status) -> int | None:
        event = self.firsts.get(status)
        return event.at if event else None


def _earlier(a: Event, b: Event) -> bool:
    return (a.at, a.event_id) < (b.at, b.event_id)


def fold(state: CommandState, event: Event) -> CommandState:
    """Join one event into the state (commutative, idempotent)."""
    status = status_of(event)
    kept = state.firsts.get(status)
    firsts = state.firsts
    if kept is None or _earlier(event, kept):
        firsts = {**state.firsts, status: event}
    best = state.status
    # Members of a StrEnum compare as their values (and `.value` is slow on 3.11).
    if best is None or (RANK[status], status) > (RANK[best], best):
        best = status
    deliveries = state.deliveries
    if isinstance(event, Routed):
        deliveries = max(deliveries, event.delivery)
    return structs.replace(state, status=best, firsts=firsts, deliveries=deliveries)


def replay(events: Iterable[Event]) -> CommandState | None:
    """Fold a command's events from nothing; None when there are none."""
    state: CommandState | None = None
    for event in events:
        if state is None:
            state = CommandState(command_id=event.command_id, edge_id=event.edge_id)
        state = fold(state, event)
    return state
