"""The ledger's Lua scripts, each prefixed with the shared prelude and loaded by SHA."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    source: str
    sha: str


def _load(name: str) -> Script:
    lua = resources.files("ledger") / "lua"
    source = (lua / "common.lua").read_text() + "\n" + (lua / f"{name}.lua").read_text()
    return Script(name, source, hashlib.sha1(source.encode()).hexdigest())


# Every script of ledger/lua/ but the prelude, in the order they are loaded into Redis.
ALL = tuple(
    _load(name)
    for name in (
        "submit",
        "deliver",
        "transition",
        "verdicts",
        "presence",
        "presence_refresh",
        "ratelimit",
        "sweep",
        "trim",
    )
)
SUBMIT, DELIVER, TRANSITION, VERDICTS, PRESENCE, PRESENCE_REFRESH, RATELIMIT, SWEEP, TRIM = ALL
