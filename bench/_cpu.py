"""Where a benchmark's CPU went: seconds per role, read from /proc (Linux, local servers).

A saturated run on one machine shares its cores between the gateway, Redis, the
projector, PostgreSQL and the load generator. The CPU each of them spends per command
says what bounds the throughput: with C µs of CPU per command in all of them together,
K cores carry at most K / C commands per µs, whatever the gateway does.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import redis

_TICK_S = 1 / os.sysconf("SC_CLK_TCK")
POSTGRES = "postgres"  # every process of the local PostgreSQL cluster has this name


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds) of a live process; None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) * _TICK_S


def _named(name: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == name:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _with_descendants(roots: Iterable[int]) -> set[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            parents[int(entry.name)] = stat[0]
    pids = set(roots)
    grew = True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in pids} - pids
        pids |= more
        grew = bool(more)
    return pids


def redis_pid(url: str) -> int | None:
    """The Redis server's pid when it runs on this machine (None otherwise)."""
    client = redis.Redis.from_url(url)
    try:
        pid = int(client.info("server")["process_id"])
    finally:
        client.close()
    try:
        local = Path(f"/proc/{pid}/comm").read_text().strip().startswith("redis")
    except OSError:
        return None
    return pid if local else None


@dataclass(frozen=True)
class Roles:
    """The processes of each role: root pids (their children count too), single
    processes (this one: its children are the other roles), or all processes of a name
    (PostgreSQL's backends and background workers)."""

    roots: Mapping[str, list[int]]
    alone: Mapping[str, int]
    named: Mapping[str, str]

    def snapshot(self) -> dict[str, float]:
        seconds: dict[str, float] = {}
        for role, roots in self.roots.items():
            pids = _with_descendants(roots)
            seconds[role] = _sum(pids)
        for role, pid in self.alone.items():
            seconds[role] = _sum([pid])
        for role, name in self.named.items():
            seconds[role] = _sum(_named(name))
        return seconds


def _sum(pids: Iterable[int]) -> float:
    return sum(s[1] for p in pids if (s := _stat(p)) is not None)


def spent(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """CPU seconds per role between two snapshots."""
    return {role: max(after[role] - before.get(role, 0.0), 0.0) for role in after}


def per_command(seconds: Mapping[str, float], commands: int, wall_s: float) -> str:
    """`gateway 640 µs, Redis 180 µs, ...; all 1510 µs = 1.9 cores busy`."""
    parts = [f"{role} {seconds[role] / commands * 1e6:.0f} µs" for role in seconds]
    total = sum(seconds.values())
    return (
        ", ".join(parts)
        + f"; all {total / commands * 1e6:.0f} µs = {total / wall_s:.2f} cores busy"
    )
