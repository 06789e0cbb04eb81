"""Who follows which command: the sender is answered directly, whatever its view grants.

A dashboard session follows every command it sent and every command it subscribed to
(`subscribe` frame). The hub forwards each status of such a command to its followers
from the same tail that feeds the viewers, so a view refreshed between admission and
fan-out cannot silence the sender. Memory is bounded: an entry goes at the command's
terminal status or when the session closes, and a session follows at most `limit`
commands (the oldest is dropped first).
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet

from gateway.sessions import DashboardSession

_NOBODY: frozenset[DashboardSession] = frozenset()


class Follows:
    def __init__(self, limit: int = 10_000) -> None:
        self.limit = limit
        self._by_command: dict[str, set[DashboardSession]] = {}

    def __len__(self) -> int:
        return len(self._by_command)

    def follow(self, dash: DashboardSession, command_id: str) -> None:
        """From now on `dash` receives every status of `command_id`."""
        if command_id in dash.following:
            return
        if len(dash.following) >= self.limit:
            oldest = next(iter(dash.following))
            self.unfollow(dash, oldest)
        dash.following[command_id] = None
        self._by_command.setdefault(command_id, set()).add(dash)

    def unfollow(self, dash: DashboardSession, command_id: str) -> None:
        dash.following.pop(command_id, None)
        followers = self._by_command.get(command_id)
        if followers is not None:
            followers.discard(dash)
            if not followers:
                del self._by_command[command_id]

    def of(self, command_id: str) -> AbstractSet[DashboardSession]:
        return self._by_command.get(command_id, _NOBODY)

    def settled(self, command_id: str) -> None:
        """The command reached a terminal status: nobody needs to follow it any more."""
        for dash in self._by_command.pop(command_id, _NOBODY):
            dash.following.pop(command_id, None)

    def forget(self, dash: DashboardSession) -> None:
        """The session closed."""
        for command_id in list(dash.following):
            self.unfollow(dash, command_id)
