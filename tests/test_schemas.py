"""Wire types: the committed AsyncAPI document matches them; examples decode."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from schemas import asyncapi
from schemas.commands import Ack, Command, EdgeCommand
from schemas.events import AnyEvent

ROOT = Path(__file__).resolve().parent.parent

SPEC_COMMAND = b"""{
  "command_id": "cmd_12345", "command_type": "setpoint",
  "target": {"edge_id": "site1_edge_prod", "device_id": "bms_main", "channel": "SetActivePower"},
  "value": 50000, "unit": "W", "expiry_sec": 300, "source": "user_456",
  "timestamp": "2026-02-15T14:30:00Z"}"""
SPEC_ACK = b"""{"command_id": "cmd_12345", "status": "executed",
  "executed_at": "2026-02-15T14:30:01.050Z", "error": null}"""


def test_committed_asyncapi_document_is_current() -> None:
    committed = (ROOT / "docs" / "asyncapi.json").read_text()
    assert committed == asyncapi.render(), "run: python -m schemas.asyncapi > docs/asyncapi.json"


def test_asyncapi_document_references_resolve() -> None:
    doc = asyncapi.document()
    text = json.dumps(doc)
    for ref in {r.split('"')[0] for r in text.split('"$ref": "')[1:]}:
        node = doc
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
        assert node, ref


def test_the_specification_examples_decode() -> None:
    cmd = msgspec.json.decode(SPEC_COMMAND, type=Command)
    assert cmd.priority == "normal" and cmd.value == 50000
    ack = msgspec.json.decode(SPEC_ACK, type=Ack)
    assert ack.status == "executed" and ack.error is None


@pytest.mark.parametrize(
    ("patch", "fragment"),
    [
        ({"command_type": "reboot"}, "command_type"),
        ({"value": "high"}, "number"),
        ({"command_type": "config_override"}, "duration_sec"),
        ({"command_type": "scheduler_control", "value": "pause"}, "start"),
        ({"target": {"edge_id": "bad edge", "device_id": "d", "channel": "c"}}, "edge_id"),
        ({"timestamp": "2026-02-15T14:30:00"}, "timezone"),
        ({"extra": 1}, "extra"),
        ({"priority": "urgent"}, "priority"),
        ({"expiry_sec": 0}, "expiry_sec"),
    ],
)
def test_invalid_commands_name_their_problem(patch: dict[str, object], fragment: str) -> None:
    body = {**json.loads(SPEC_COMMAND), **patch}
    with pytest.raises(msgspec.ValidationError, match=fragment):
        msgspec.json.decode(json.dumps(body), type=Command)


def test_stored_events_tolerate_fields_from_newer_versions() -> None:
    raw = b'{"status":"routed","at":1,"event_id":"e","command_id":"c","edge_id":"x","actor":"a","gateway":"g","added_later":true}'
    event = msgspec.json.decode(raw, type=AnyEvent)
    assert event.gateway == "g"  # type: ignore[union-attr]


def test_edge_commands_always_carry_the_specification_fields_and_priority() -> None:
    cmd = msgspec.json.decode(SPEC_COMMAND, type=Command)
    body = msgspec.json.decode(
        msgspec.json.encode(
            EdgeCommand(
                command_id=cmd.command_id,
                command_type=cmd.command_type,
                target=cmd.target,
                value=cmd.value,
                unit=None,
                expiry_sec=300,
                source=cmd.source,
                timestamp=cmd.timestamp,
                priority="normal",
                expires_at=cmd.timestamp,
            )
        )
    )
    for field in (
        "command_id",
        "command_type",
        "target",
        "value",
        "unit",
        "expiry_sec",
        "source",
        "timestamp",
        "priority",
    ):
        assert field in body
