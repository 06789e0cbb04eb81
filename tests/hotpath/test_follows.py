"""The follow index: bounded per session, dropped at the terminal status and on close."""

from __future__ import annotations

from typing import Any

from gateway.follows import Follows
from gateway.sessions import DashboardSession


def session() -> DashboardSession:
    nothing: Any = None  # the index never touches the socket, the user or the outbox
    return DashboardSession(ws=nothing, user=nothing, outbox=nothing)


def test_follows_are_bounded_settled_and_forgotten() -> None:
    follows = Follows(limit=3)
    a, b = session(), session()
    for cid in ("c1", "c2", "c3", "c4"):
        follows.follow(a, cid)
    follows.follow(b, "c4")
    assert list(a.following) == ["c2", "c3", "c4"]  # the oldest went first
    assert follows.of("c1") == set()
    assert follows.of("c4") == {a, b}
    follows.settled("c4")
    assert follows.of("c4") == set() and "c4" not in a.following and not b.following
    follows.forget(a)
    assert len(follows) == 0 and not a.following
