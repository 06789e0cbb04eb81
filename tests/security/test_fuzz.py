"""Random frames at `/ws/dashboard` of a real gateway: it answers each, stays up, and the
ledger stays readable; only frames that happen to be valid commands reach the edge."""

from __future__ import annotations

import json
import uuid
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.client import ClientConnection

from ledger.records import EVENT_DECODER

from .conftest import EDGE, Site, recv_json
from support import command, wait_until

KNOWN_CODES = {
    "malformed_json",
    "invalid_command",
    "too_large",
    "forbidden",
    "unknown_edge",
    "duplicate",
    "expired",
    "clock_skew",
}
FIELDS = [
    "command_id",
    "command_type",
    "target",
    "value",
    "unit",
    "expiry_sec",
    "source",
    "timestamp",
    "priority",
    "duration_sec",
    "extra",
]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=24)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=16,
)


def mutate(field: str, value: Any, drop: bool, target_field: str | None) -> str:
    body = command(f"fz_{uuid.uuid4().hex[:10]}", edge_id=EDGE)
    if target_field is not None:
        body["target"] = {**body["target"], target_field: value}
    elif drop:
        body.pop(field, None)
    else:
        body[field] = value
    return json.dumps(body)


mutated_commands = st.builds(
    mutate,
    st.sampled_from(FIELDS),
    json_values,
    st.booleans(),
    st.none() | st.sampled_from(["edge_id", "device_id", "channel", "extra"]),
)
no_surrogates = st.characters(exclude_categories=("Cs",))
frames = st.one_of(
    st.text(alphabet=no_surrogates, max_size=300),
    st.binary(max_size=300),
    json_values.map(json.dumps),
    mutated_commands,
    mutated_commands.map(lambda s: s[: len(s) // 2]),  # cut short
    st.sampled_from(["NaN", "[1e999]", '{"value": -Infinity}', "\ufeff{}", "[" * 5000]),
)


class Fuzzer:
    def __init__(self, site: Site) -> None:
        self.site = site
        self.dash: ClientConnection = site.dashboard()
        self.answers = 0
        self.admitted: set[str] = set()

    def throw(self, frame: str | bytes) -> None:
        """Send the frame, then a probe; everything before the probe's answer is about it."""
        self.dash.send(frame)
        probe = f"probe_{uuid.uuid4().hex[:10]}"
        self.dash.send(json.dumps({"command_id": probe}))
        while True:
            msg = recv_json(self.dash)
            if msg.get("command_id") == probe:
                assert msg["status"] == "rejected" and msg["error"]["code"] == "invalid_command"
                return
            if msg["status"] == "rejected" and msg.get("command_id") not in self.admitted:
                assert msg["error"]["code"] in KNOWN_CODES, msg
                assert msg["error"]["message"]
                self.answers += 1
            elif msg["status"] == "issued":
                self.admitted.add(msg["command_id"])


def test_random_frames_never_break_the_gateway(site: Site) -> None:
    fuzzer = Fuzzer(site)

    @settings(
        max_examples=200,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(frames)
    def throw(frame: str | bytes) -> None:
        fuzzer.throw(frame)

    throw()
    assert fuzzer.answers > 100  # most random frames are refused, each with an answer
    # The gateway still serves valid commands correctly on the same connection.
    body = command(edge_id=EDGE)
    fuzzer.dash.send(json.dumps(body))
    wait_until(
        lambda: body["command_id"] in site.edge.ids(), 10, what="a valid command after fuzzing"
    )
    fuzzer.dash.close()
    # Only commands that were admitted reached the edge, and the ledger reads back whole.
    reached = {i for i in site.edge.ids() if i.startswith("fz_")}
    assert reached <= fuzzer.admitted
    for _, fields in site.redis.xrange(site.keys.log(site.keys.partition(EDGE))):
        EVENT_DECODER.decode(fields[b"e"])
    for _, fields in site.redis.xrange(site.keys.audit()):
        assert msgspec.json.decode(fields[b"e"])["status"] == "rejected"
