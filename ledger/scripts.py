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


SUBMIT = _load("submit")
DELIVER = _load("deliver")
TRANSITION = _load("transition")
VERDICTS = _load("verdicts")
PRESENCE = _load("presence")
PRESENCE_REFRESH = _load("presence_refresh")
RATELIMIT = _load("ratelimit")
SWEEP = _load("sweep")
TRIM = _load("trim")
ALL = (
    SUBMIT,
    DELIVER,
    TRANSITION,
    VERDICTS,
    PRESENCE,
    PRESENCE_REFRESH,
    RATELIMIT,
    SWEEP,
    TRIM,
)
