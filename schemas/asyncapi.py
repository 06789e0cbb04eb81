"""The AsyncAPI 3.0 document of the WebSocket protocol, generated from the msgspec types.

`python -m schemas.asyncapi > docs/asyncapi.json` regenerates it; a test fails when the
committed document and the types drift apart.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import msgspec

from schemas.commands import Ack, Command, EdgeCommand
from schemas.events import AnyEvent
from schemas.messages import CommandControl, EdgeNotice, StatusUpdate

REF = "#/components/schemas/{name}"

MESSAGES: dict[str, tuple[Any, str, str]] = {
    # name: (type, title, summary)
    "Command": (
        Command,
        "Command",
        "Dashboard/service -> gateway: the command object of the specification.",
    ),
    "CommandControl": (
        CommandControl,
        "Command control",
        "Dashboard -> gateway: an operation on an existing command (`cancel`).",
    ),
    "StatusUpdate": (
        StatusUpdate,
        "Status update",
        "Gateway -> dashboard: one lifecycle transition, or the answer to a refused input.",
    ),
    "EdgeCommand": (
        EdgeCommand,
        "Edge command",
        "Gateway -> edge: a command to validate and execute (`delivery` > 1 is a redelivery).",
    ),
    "Ack": (Ack, "Acknowledgment", "Edge -> gateway: accepted, executed, failed or rejected."),
    "EdgeNotice": (
        EdgeNotice,
        "Edge notice",
        "Gateway -> edge: an acknowledgment it could not apply.",
    ),
}


def document() -> dict[str, Any]:
    types = [t for t, _, _ in MESSAGES.values()] + [AnyEvent]
    _, components = msgspec.json.schema_components(types, ref_template=REF)
    messages = {
        name: {
            "name": name,
            "title": title,
            "summary": summary,
            "contentType": "application/json",
            "payload": {"$ref": REF.format(name=t.__name__)},
        }
        for name, (t, title, summary) in MESSAGES.items()
    }
    bearer = {"$ref": "#/components/securitySchemes/bearer"}
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Command Dispatch",
            "version": "1.0.0",
            "description": (
                "The EMS control channel: dashboards and cloud services send commands to edge "
                "controllers through the gateway; edges acknowledge; every lifecycle transition "
                "is an event of the ledger. See docs/protocol.md."
            ),
        },
        "servers": {
            "local": {
                "host": "127.0.0.1:8000",
                "protocol": "ws",
                "description": "`dispatch gateway` defaults",
                "security": [bearer],
            }
        },
        "channels": {
            "dashboard": {
                "address": "/ws/dashboard",
                "description": (
                    "Operators' commands in, lifecycle transitions of every command the user may "
                    "view out. Bearer user JWT in the Authorization header, or subprotocols "
                    "`dispatch.v1` + `bearer.<token>` from browsers."
                ),
                "messages": {
                    "Command": {"$ref": "#/components/messages/Command"},
                    "CommandControl": {"$ref": "#/components/messages/CommandControl"},
                    "StatusUpdate": {"$ref": "#/components/messages/StatusUpdate"},
                },
            },
            "edge": {
                "address": "/ws/edge/{edge_id}",
                "description": "One persistent link per edge. Bearer edge credential for that edge only.",
                "parameters": {
                    "edge_id": {"description": "The edge's id (letters, digits, _ . -)."}
                },
                "messages": {
                    "EdgeCommand": {"$ref": "#/components/messages/EdgeCommand"},
                    "Ack": {"$ref": "#/components/messages/Ack"},
                    "EdgeNotice": {"$ref": "#/components/messages/EdgeNotice"},
                },
            },
        },
        "operations": {
            "sendCommand": _op(
                "receive", "dashboard", ["Command", "CommandControl"], "Gateway receives commands."
            ),
            "notifyDashboard": _op(
                "send", "dashboard", ["StatusUpdate"], "Gateway sends transitions."
            ),
            "deliverCommand": _op(
                "send", "edge", ["EdgeCommand", "EdgeNotice"], "Gateway delivers commands."
            ),
            "acknowledge": _op("receive", "edge", ["Ack"], "Gateway receives acknowledgments."),
        },
        "components": {
            "schemas": components,
            "messages": messages,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
            },
        },
    }


def _op(action: str, channel: str, messages: list[str], summary: str) -> dict[str, Any]:
    return {
        "action": action,
        "channel": {"$ref": f"#/channels/{channel}"},
        "summary": summary,
        "messages": [{"$ref": f"#/channels/{channel}/messages/{m}"} for m in messages],
    }


def render() -> str:
    return json.dumps(document(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
