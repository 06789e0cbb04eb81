"""The pure command lifecycle: legal steps only, terminal stays terminal, order-free fold."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger import lifecycle
from ledger.lifecycle import ALLOWED, RANK, TERMINAL, IllegalTransition, fold, replay
from schemas.errors import ErrorObject
from schemas.events import EVENT_TYPES, Event, Status

STATUSES = list(Status)
ERR = ErrorObject(code="x", message="y")


def make_event(status: Status, at: int, n: int) -> Event:
    cls = EVENT_TYPES[status]
    fields: dict[str, object] = {
        "event_id": f"e{n:04d}",
        "command_id": "c1",
        "edge_id": "edge1",
        "actor": "t",
        "at": at,
    }
    if status is Status.ISSUED:
        return cls(**fields, command=None, digest="d")  # type: ignore[call-arg]
    if status is Status.AUTHORIZED:
        fields["grant"] = "g"
    elif status is Status.QUEUED:
        fields["expires_at"] = at + 1000
    elif status is Status.ROUTED:
        fields["gateway"] = "gw"
        fields["delivery"] = n
    elif status in (
        Status.FAILED,
        Status.REJECTED,
        Status.TIMED_OUT,
        Status.EXPIRED,
        Status.CANCELLED,
        Status.LOST,
    ):
        fields["error"] = ERR
    return cls(**fields)  # type: ignore[arg-type]


@st.composite
def legal_walks(draw: st.DrawFn) -> list[Status]:
    """A sequence of statuses each legally following the previous one."""
    walk: list[Status] = []
    current: Status | None = None
    for _ in range(draw(st.integers(1, 12))):
        options = sorted(ALLOWED[current], key=lambda s: s.value)
        if not options:
            break
        current = draw(st.sampled_from(options))
        walk.append(current)
    return walk


@given(st.sampled_from([None, *STATUSES]), st.sampled_from(STATUSES))
def test_transition_refuses_exactly_the_illegal_steps(current: Status | None, to: Status) -> None:
    if to in ALLOWED[current]:
        assert lifecycle.transition(current, to) is to
    else:
        with pytest.raises(IllegalTransition, match=to.value):
            lifecycle.transition(current, to)


def test_every_legal_step_raises_the_rank_or_redelivers() -> None:
    for current, targets in ALLOWED.items():
        for to in targets:
            if current is None:
                continue
            assert RANK[to] > RANK[current] or (current is to is Status.ROUTED), (current, to)


def test_allowed_from_is_the_inverse_of_allowed() -> None:
    for to in Status:
        for current in lifecycle.allowed_from(to):
            assert to in ALLOWED[current]


@given(legal_walks())
def test_terminal_states_stay_terminal(walk: list[Status]) -> None:
    reached = False
    for status in walk:
        if reached:
            assert status in TERMINAL, walk
        reached = reached or status in TERMINAL
    for status in lifecycle.FINAL:
        assert not ALLOWED[status]


@settings(max_examples=300)
@given(legal_walks(), st.randoms(use_true_random=False), st.integers(0, 5))
def test_any_event_order_converges(walk: list[Status], rnd, duplicates: int) -> None:  # type: ignore[no-untyped-def]
    events = [make_event(s, 1000 + i, i) for i, s in enumerate(walk)]
    in_order = replay(events)
    assert in_order is not None
    assert in_order.status is walk[-1]  # the fold agrees with the compare-and-set path
    shuffled = events + [rnd.choice(events) for _ in range(duplicates)]
    rnd.shuffle(shuffled)
    other = replay(shuffled)
    assert other == in_order


def test_late_ack_after_timeout_is_executed_and_late() -> None:
    walk = [Status.ISSUED, Status.AUTHORIZED, Status.ROUTED, Status.TIMED_OUT, Status.EXECUTED]
    state = replay(make_event(s, 10 * i, i) for i, s in enumerate(walk))
    assert state is not None and state.status is Status.EXECUTED and state.late
    assert lifecycle.is_late(Status.TIMED_OUT, Status.EXECUTED)
    assert not lifecycle.is_late(Status.DELIVERED, Status.EXECUTED)


def test_fold_keeps_the_earliest_event_per_status() -> None:
    first = make_event(Status.ROUTED, 5, 1)
    again = make_event(Status.ROUTED, 9, 2)
    state = fold(fold(lifecycle.CommandState(command_id="c1", edge_id="edge1"), again), first)
    assert state.at(Status.ROUTED) == 5
    assert state.deliveries == 2
