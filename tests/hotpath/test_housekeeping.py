"""The gateway's housekeeping: edge presence kept alive in slices, credentials ended on time.

Presence against a real gateway and Redis; the credential clock (`gateway.expiries`) as a
pure structure, checked against the scan it replaced.
"""

from __future__ import annotations

import asyncio
import time

import redis
import websockets
from hypothesis import given
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed

from config.settings import Settings
from gateway.expiries import Expiries
from ledger.keys import Keys

from support import Processes, edge_token

EDGES = [f"edge_keep_{i}" for i in range(3)]
TTL_MS = 3000  # refreshed every second (a third of it)


def test_connected_edges_stay_present_and_a_lost_presence_closes_the_session(
    processes: Processes,
) -> None:
    processes.env["DISPATCH_PRESENCE_TTL_MS"] = str(TTL_MS)
    processes.dispatch("token", "token", "--edge", *EDGES).popen.wait(20)
    gw = processes.gateway()
    s = Settings.from_env(processes.env)
    keys = Keys(s.namespace, s.partitions)
    client = redis.Redis.from_url(s.redis_url, decode_responses=True)

    async def scenario() -> None:
        sockets = [
            await websockets.connect(
                f"{gw.ws}/ws/edge/{edge_id}",
                additional_headers={"Authorization": f"Bearer {edge_token(edge_id)}"},
            )
            for edge_id in EDGES
        ]
        try:
            # Each presence is extended again and again: after three TTLs it still holds
            # the owner it was taken with, and its TTL was renewed (it is above what is left
            # of the first one).
            owners = {e: await _wait_owner(client, keys.presence(e)) for e in EDGES}
            await asyncio.sleep(3 * TTL_MS / 1000)
            for edge_id in EDGES:
                assert client.get(keys.presence(edge_id)) == owners[edge_id]
                assert client.pttl(keys.presence(edge_id)) > TTL_MS / 3
            # Another owner takes one edge's presence: its session here is closed as
            # replaced at the next refresh, the others stay.
            taken = EDGES[0]
            client.set(keys.presence(taken), "gw-elsewhere|s1", px=TTL_MS)
            try:
                await asyncio.wait_for(sockets[0].recv(), 5)
                raise AssertionError("the replaced session got a frame instead of a close")
            except ConnectionClosed as closed:
                assert closed.rcvd is not None and closed.rcvd.code == 4001
            for ws, edge_id in zip(sockets[1:], EDGES[1:], strict=True):
                assert ws.close_code is None, edge_id
                assert client.get(keys.presence(edge_id)) == owners[edge_id]
        finally:
            for ws in sockets:
                await ws.close()

    try:
        asyncio.run(scenario())
    finally:
        client.close()


async def _wait_owner(client: redis.Redis, key: str) -> str:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        owner = client.get(key)
        if owner:
            return str(owner)
        await asyncio.sleep(0.05)
    raise AssertionError(f"{key} was never taken")


class _Session:
    def __init__(self, name: int) -> None:
        self.name = name
        self.open = True


@given(
    st.lists(st.tuples(st.integers(0, 100), st.booleans()), min_size=0, max_size=3000),
    st.integers(0, 101),
)
def test_expiries_yield_exactly_the_open_sessions_whose_time_has_passed(
    added: list[tuple[int, bool]], now: int
) -> None:
    sessions = [_Session(i) for i in range(len(added))]
    clock: Expiries[_Session] = Expiries(lambda s: s.open)
    for session, (ends_at, closes) in zip(sessions, added, strict=True):
        clock.add(ends_at, session)
        session.open = not closes  # closed after it was added, as sessions do
    due = list(clock.due(now))
    # What the scan over every session found, in the order the credentials ended.
    expected = sorted(
        (s for s, (ends_at, _) in zip(sessions, added, strict=True) if s.open and now > ends_at),
        key=lambda s: (added[s.name][0], s.name),
    )
    assert [s.name for s in due] == [s.name for s in expected]
    assert list(clock.due(now)) == []  # each session is ended once
    later = [
        s for s, (ends_at, _) in zip(sessions, added, strict=True) if s.open and ends_at >= now
    ]
    assert sorted(s.name for s in clock.due(102)) == sorted(s.name for s in later)
