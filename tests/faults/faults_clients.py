"""Test clients that remember every frame they sent and every answer they got (for I5).

A dashboard on a real WebSocket (websockets' threading client, so scenarios stay
synchronous next to real processes) and an HTTP sender. A frame is "answered" when a
frame naming its command id came back; a frame whose connection ended first is
"cut" (its outcome is unknown to the client, not silence on a live connection).
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from support import DEMO_EDGE, now_iso

_values = itertools.count(1001)


def setpoint(
    edge_id: str = DEMO_EDGE,
    *,
    expiry_sec: int = 300,
    channel: str = "SetActivePower",
    **extra: Any,
) -> dict[str, Any]:
    """A setpoint (SetActivePower unless told) whose value no other command of the run has."""
    value = next(_values)
    if value > 99_000:
        raise RuntimeError("ran out of unique setpoint values")
    body: dict[str, Any] = {
        "command_id": f"cmd_{uuid.uuid4().hex[:12]}",
        "command_type": "setpoint",
        "target": {"edge_id": edge_id, "device_id": "bms_main", "channel": channel},
        "value": value,
        "unit": "W",
        "expiry_sec": expiry_sec,
        "source": "user_456",
        "timestamp": now_iso(),
    }
    body.update(extra)
    return body


@dataclass
class FrameLog:
    name: str
    sent: dict[str, float] = field(default_factory=dict)  # command_id -> monotonic
    answered: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    cut: set[str] = field(default_factory=set)
    other: list[Any] = field(default_factory=list)  # frames naming no command id
    lock: threading.Lock = field(default_factory=threading.Lock)

    def unanswered(self) -> list[str]:
        with self.lock:
            return [
                f"{self.name}: frame {cid} got no answer on a live connection "
                f"(frames naming no command: {self.other[-3:]})"
                for cid in self.sent
                if cid not in self.answered and cid not in self.cut
            ]

    def statuses(self, command_id: str) -> list[str]:
        with self.lock:
            return [f.get("status", "?") for f in self.answered.get(command_id, [])]


class Dashboard:
    """A dashboard session: `send()` a command frame; frames are collected in the
    background. Answers for commands not sent here (views) are kept too."""

    def __init__(self, ws_url: str, token: str, name: str = "dashboard") -> None:
        self.log = FrameLog(name)
        self.ws: ClientConnection = connect(
            f"{ws_url}/ws/dashboard",
            additional_headers={"Authorization": f"Bearer {token}"},
            open_timeout=10,
        )
        self.closed = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for message in self.ws:
                frame = json.loads(message)
                cid = frame.get("command_id") if isinstance(frame, dict) else None
                with self.log.lock:
                    if cid is not None:
                        self.log.answered.setdefault(cid, []).append(frame)
                    else:
                        self.log.other.append(frame)
        except (ConnectionClosed, OSError):
            pass
        finally:
            with self.log.lock:
                self.log.cut.update(c for c in self.log.sent if c not in self.log.answered)
            self.closed.set()

    def send(self, body: dict[str, Any]) -> None:
        with self.log.lock:
            self.log.sent[body["command_id"]] = time.monotonic()
        try:
            self.ws.send(json.dumps(body))
        except (ConnectionClosed, OSError):
            with self.log.lock:
                self.log.cut.add(body["command_id"])

    def wait_answers(self, timeout_s: float = 15) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.log.lock:
                if all(c in self.log.answered or c in self.log.cut for c in self.log.sent):
                    return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        self.ws.close()
        self._reader.join(5)


class HttpSender:
    """POST /api/commands; an HTTP status is an answer, a refused/reset connection is a cut."""

    def __init__(self, http_url: str, token: str, name: str = "http") -> None:
        self.url = f"{http_url}/api/commands"
        self.token = token
        self.log = FrameLog(name)

    def send(self, body: dict[str, Any], timeout_s: float = 15) -> int | None:
        cid = body["command_id"]
        with self.log.lock:
            self.log.sent[cid] = time.monotonic()
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), method="POST")
        req.add_header("Authorization", f"Bearer {self.token}")
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                code, payload = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            code, payload = exc.code, exc.read()
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if not isinstance(reason, TimeoutError):  # no answer in time is silence
                with self.log.lock:
                    self.log.cut.add(cid)
            return None
        try:
            frame = json.loads(payload)
        except ValueError:
            frame = {"status": "?", "raw": payload[:200].decode(errors="replace")}
        frame["http_status"] = code
        with self.log.lock:
            self.log.answered.setdefault(cid, []).append(frame)
        return code
