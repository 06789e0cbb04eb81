"""The optional `traceparent` is carried to the edge but is no part of a command's identity."""

from __future__ import annotations

import msgspec
import pytest

from ledger.store import body_digest
from schemas.commands import Command

RAW = (
    b'{"command_id":"cmd_1","command_type":"setpoint","target":{"edge_id":"e1",'
    b'"device_id":"bms_main","channel":"SetActivePower"},"value":50000,"unit":"W",'
    b'"expiry_sec":300,"source":"u","timestamp":"2026-02-15T14:30:00Z"'
)
DECODE = msgspec.json.Decoder(Command)
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_digest_ignores_the_trace_context_and_matches_the_one_before_it_existed() -> None:
    plain = DECODE.decode(RAW + b"}")
    traced = DECODE.decode(RAW + b',"traceparent":"' + TRACEPARENT.encode() + b'"}')
    assert traced.traceparent == TRACEPARENT
    # Computed by the code before `traceparent` existed: resends across an upgrade match.
    assert body_digest(plain) == "6e6729d5277863b107fe3d7f34dc4cbc"
    assert body_digest(traced) == body_digest(plain)


@pytest.mark.parametrize("bad", ["00-xyz", TRACEPARENT + "\n", TRACEPARENT.upper(), ""])
def test_a_malformed_traceparent_is_an_invalid_command(bad: str) -> None:
    with pytest.raises(msgspec.ValidationError, match="traceparent"):
        DECODE.decode(RAW + b',"traceparent":' + msgspec.json.encode(bad) + b"}")
