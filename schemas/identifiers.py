"""The identifier alphabets, and the one checker every boundary uses.

Identifiers end up inside Redis keys, log lines, SQL and file names, so each must match
its whole pattern: `re.fullmatch`, never `match`/`search` with `$` (which also matches
before a final newline, so `"cmd_1\\n"` would pass). The msgspec patterns end in
`(?![\\s\\S])` ("no character follows") instead of `$` for the same reason; that form
means the same in Python and in the ECMAScript of JSON Schema.
"""

from __future__ import annotations

import re
from typing import Final

_END: Final = r"(?![\s\S])"  # end of string, unlike `$` which tolerates a final "\n"

EDGE_ID: Final = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
COMMAND_ID: Final = r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}"
NAME: Final = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"  # device, channel, controller, mode
USER_ID: Final = r"[A-Za-z0-9][A-Za-z0-9_.@+:-]{0,127}"
# Key parts in Redis (command ids, edge ids, gateway ids) share the widest safe alphabet.
KEY_PART: Final = COMMAND_ID

_COMPILED: Final = {
    pattern: re.compile(pattern) for pattern in (EDGE_ID, COMMAND_ID, NAME, USER_ID)
}


def schema_pattern(pattern: str) -> str:
    """The pattern as msgspec/JSON Schema want it: anchored at both ends."""
    return f"^{pattern}{_END}"


def is_valid(pattern: str, value: object) -> bool:
    """True if `value` is a string that matches `pattern` from its first to its last char."""
    if not isinstance(value, str):
        return False
    compiled = _COMPILED.get(pattern) or re.compile(pattern)
    return compiled.fullmatch(value) is not None


def is_edge_id(value: object) -> bool:
    return is_valid(EDGE_ID, value)


def is_command_id(value: object) -> bool:
    return is_valid(COMMAND_ID, value)


def is_name(value: object) -> bool:
    return is_valid(NAME, value)


def is_user_id(value: object) -> bool:
    return is_valid(USER_ID, value)
