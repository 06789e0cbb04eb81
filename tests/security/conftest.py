"""Shared pieces of the security tests: a real gateway, a connected edge, the audit trail.

Most hostile inputs are independent of each other, so a module shares one gateway (a
`Site`) and every test proves its own "nothing reached the edge" with a barrier: after
the bad input it sends a valid sentinel command and waits until the connected edge has
it; the edge must have received exactly the sentinel, and the edge's delivery stream
and partition log must hold nothing but the sentinel's entries.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from websockets.sync.client import ClientConnection, connect

from ledger.keys import Keys

from support import (
    DATABASE_URL,
    REDIS_URL,
    SECRET,
    Gateway,
    Processes,
    command,
    drop_namespace,
    edge_token,
    free_port,
    user_token,
    wait_until,
)

PARTITIONS = 4
EDGE = "sec_edge_1"
OPERATOR = "operator_1"
# High enough that only the rate limit tests ever meet a limit.
NO_LIMITS = {
    "DISPATCH_RATE_USER_PER_S": "100000",
    "DISPATCH_RATE_USER_BURST": "100000",
    "DISPATCH_RATE_EDGE_PER_S": "100000",
    "DISPATCH_RATE_EDGE_BURST": "100000",
    "DISPATCH_RATE_GLOBAL_PER_S": "100000",
    "DISPATCH_RATE_GLOBAL_BURST": "100000",
    # Modules refuse many handshakes from 127.0.0.1 on purpose; the throttle has its own.
    "DISPATCH_HANDSHAKE_REFUSALS_PER_S": "0",
}


def make_env(namespace: str, state_dir: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "DISPATCH_NAMESPACE": namespace,
        "DISPATCH_JWT_SECRET": SECRET,
        "DISPATCH_REDIS_URL": REDIS_URL,
        "DISPATCH_DATABASE_URL": DATABASE_URL,
        "DISPATCH_PARTITIONS": str(PARTITIONS),
        "XDG_STATE_HOME": str(state_dir),
        "PYTHONUNBUFFERED": "1",
        **NO_LIMITS,
        **extra,
    }


def start_gateway(processes: Processes, env: dict[str, str] | None = None) -> Gateway:
    """A real `dispatch gateway` with extra environment (limits, keys, leeway...)."""
    port = free_port()
    proc = processes.dispatch("gateway", "gateway", "--port", str(port), env=env)
    gw = Gateway(proc, port)
    gw.wait_ready()
    return gw


def enroll(processes: Processes, edge_id: str) -> None:
    proc = processes.dispatch("token", "token", "--edge", edge_id)
    assert proc.popen.wait(20) == 0, proc.log()


def ws_connect(url: str, token: str | None = None, **kwargs: Any) -> ClientConnection:
    headers = dict(kwargs.pop("additional_headers", {}))
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return connect(
        url, additional_headers=headers, proxy=None, open_timeout=10, legacy=True, **kwargs
    )


def recv_json(ws: ClientConnection, timeout_s: float = 10) -> dict[str, Any]:
    return dict(json.loads(ws.recv(timeout=timeout_s)))


def recv_refusal(ws: ClientConnection, timeout_s: float = 10) -> dict[str, Any]:
    """The `rejected` answer to a frame just sent, skipping the viewer's updates of earlier
    tests' commands (the module's edge never acks, so they time out while this one runs).
    A frame wrongly admitted gets no `rejected`, and the read times out: the test fails."""
    while True:
        msg = recv_json(ws, timeout_s)
        if msg.get("status") == "rejected":
            return msg


def recv_for(ws: ClientConnection, command_id: str | None, timeout_s: float = 10) -> dict[str, Any]:
    """The next message about `command_id` (None: a rejection that named no command)."""
    while True:
        msg = recv_json(ws, timeout_s)
        if msg.get("command_id") == command_id:
            return msg


def digest(raw: bytes | str) -> str:
    return hashlib.sha256(raw.encode() if isinstance(raw, str) else raw).hexdigest()


class EdgeWatcher:
    """A connected edge (sync client in a thread) that records every frame it receives."""

    def __init__(self, url: str, token: str) -> None:
        self.ws = ws_connect(url, token)
        self.frames: list[dict[str, Any]] = []
        self.closed: Exception | None = None
        self.close_code: int | None = None
        self.ended = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for message in self.ws:
                with self._lock:
                    self.frames.append(json.loads(message))
        except Exception as exc:  # closed, or torn down with the test: keep it for asserts
            self.closed = exc
        self.close_code = self.ws.close_code
        self.ended.set()

    def ids(self) -> list[str]:
        with self._lock:
            return [str(f.get("command_id")) for f in self.frames]

    def close(self) -> None:
        self.ws.close()
        self._thread.join(5)


@dataclass
class Site:
    """One gateway, one enrolled and connected edge, and a user who may control it."""

    gw: Gateway
    namespace: str
    processes: Processes
    edge: EdgeWatcher
    edge_id: str = EDGE
    user: str = OPERATOR
    redis: redis.Redis = field(default_factory=lambda: redis.Redis.from_url(REDIS_URL))

    @property
    def keys(self) -> Keys:
        return Keys(self.namespace, PARTITIONS)

    def token(self, **kwargs: Any) -> str:
        kwargs.setdefault("control", [self.edge_id])
        return user_token(kwargs.pop("user", self.user), **kwargs)

    def dashboard(self, token: str | None = None, **kwargs: Any) -> ClientConnection:
        return ws_connect(f"{self.gw.ws}/ws/dashboard", token or self.token(), **kwargs)

    # -- what the ledger holds ---------------------------------------------------------
    def edge_stream_len(self) -> int:
        return int(self.redis.xlen(self.keys.edge_stream(self.edge_id)))

    def log_entries(self) -> list[dict[str, Any]]:
        rows = self.redis.xrange(self.keys.log(self.keys.partition(self.edge_id)))
        return [json.loads(fields[b"e"]) for _, fields in rows]

    def audit(self, count: int = 200) -> list[dict[str, Any]]:
        rows = self.redis.xrevrange(self.keys.audit(), count=count)
        return [json.loads(fields[b"e"]) for _, fields in rows]

    def audit_for(
        self, *, code: str, raw: bytes | str | None = None, **match: str
    ) -> dict[str, Any]:
        """The audit record of a refusal (waits for it: rejections are recorded async)."""

        def find() -> dict[str, Any] | None:
            for entry in self.audit():
                if entry["error"]["code"] != code:
                    continue
                if raw is not None and entry.get("input_digest") != digest(raw):
                    continue
                if all(str(entry.get(k, "")).find(v) >= 0 for k, v in match.items()):
                    return entry
            return None

        found: dict[str, Any] = wait_until(find, 5, what=f"an audit record with code {code}")
        return found

    # -- the barrier -------------------------------------------------------------------
    def assert_edge_got_nothing(self, dash: ClientConnection | None = None) -> None:
        """Nothing since the last barrier reached the edge, its stream or its log."""
        frames_before = len(self.edge.frames)
        stream_before = self.edge_stream_len()
        log_before = len(self.log_entries())
        sentinel = command(f"sentinel_{uuid.uuid4().hex[:10]}", edge_id=self.edge_id)
        own = dash is None
        dash = dash or self.dashboard()
        try:
            dash.send(json.dumps(sentinel))
            wait_until(
                lambda: sentinel["command_id"] in self.edge.ids(),
                10,
                what="the sentinel at the edge",
            )
        finally:
            if own:
                dash.close()
        assert self.edge.ids()[frames_before:] == [sentinel["command_id"]]
        assert self.edge_stream_len() == stream_before + 1
        new_events = self.log_entries()[log_before:]
        assert {e["command_id"] for e in new_events} == {sentinel["command_id"]}


@pytest.fixture(scope="module")
def module_namespace() -> Iterator[str]:
    ns = f"t{uuid.uuid4().hex[:10]}"
    yield ns
    drop_namespace(ns)


@pytest.fixture(scope="module")
def site_env() -> dict[str, str]:
    """Extra gateway environment for a module's `site` (modules override this fixture)."""
    return {}


@pytest.fixture(scope="module")
def site(
    module_namespace: str, tmp_path_factory: pytest.TempPathFactory, site_env: dict[str, str]
) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("site")
    processes = Processes(make_env(module_namespace, tmp / "state", **site_env), tmp)
    enroll(processes, EDGE)
    gw = start_gateway(processes)
    watcher = EdgeWatcher(f"{gw.ws}/ws/edge/{EDGE}", edge_token(EDGE))
    the_site = Site(gw=gw, namespace=module_namespace, processes=processes, edge=watcher)
    # The edge session is registered once a first command reaches it.
    the_site.assert_edge_got_nothing()
    yield the_site
    watcher.close()
    the_site.redis.close()
    processes.stop_all()
