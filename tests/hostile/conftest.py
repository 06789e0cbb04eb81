"""A hostile-event site: a real gateway, a real `dispatch projector`, a real acking edge.

The edge is a WebSocket client that acknowledges every command it receives (`executed`,
or what a test asks for) except those whose id starts with `silent_`, which it keeps
quiet about so that only a verdict can end them.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from websockets.sync.client import ClientConnection, connect

from dispatch import cli

from support import (
    DATABASE_URL,
    REDIS_URL,
    SECRET,
    Gateway,
    Proc,
    Processes,
    drop_namespace,
    edge_token,
    free_port,
    http,
    projected_status,
    user_token,
    wait_until,
)

EDGE = "hostile_edge_1"
OPERATOR = "operator_h"
NO_LIMITS = {
    f"DISPATCH_RATE_{scope}_{kind}": "100000"
    for scope in ("USER", "EDGE", "GLOBAL")
    for kind in ("PER_S", "BURST")
}


def site_env(namespace: str, state_dir: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "DISPATCH_NAMESPACE": namespace,
        "DISPATCH_JWT_SECRET": SECRET,
        "DISPATCH_REDIS_URL": REDIS_URL,
        "DISPATCH_DATABASE_URL": DATABASE_URL,
        "DISPATCH_PARTITIONS": "4",
        "XDG_STATE_HOME": str(state_dir),
        "PYTHONUNBUFFERED": "1",
        **NO_LIMITS,
        **extra,
    }


def ws_connect(url: str, token: str | None = None) -> ClientConnection:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return connect(url, additional_headers=headers, proxy=None, open_timeout=10, legacy=True)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def audit(env: dict[str, str], *args: str) -> tuple[int, str]:
    """`dispatch audit ...` through its real entry point, in this process with `env` (a
    process start costs seconds on a loaded machine): exit code and output."""
    out = io.StringIO()
    with (
        mock.patch.dict(os.environ, env, clear=True),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(out),
    ):
        code = cli.main(["audit", *args])
    return code, out.getvalue()


class AckingEdge:
    """A connected edge (sync client in a thread) that answers every command it gets."""

    def __init__(self, url: str, token: str) -> None:
        self.ws = ws_connect(url, token)
        self.received: list[str] = []
        self.replies: dict[str, dict[str, Any]] = {}  # command_id -> ack fields to send
        self.failure: Exception | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for message in self.ws:
                frame = json.loads(message)
                command_id = frame.get("command_id")
                if "command_type" not in frame or not isinstance(command_id, str):
                    continue  # a notice about an ack, not a command
                with self._lock:
                    self.received.append(command_id)
                    reply = self.replies.get(command_id)
                if command_id.startswith("silent_"):
                    continue
                ack = {"command_id": command_id, "status": "executed", "executed_at": now_iso()}
                ack.update(reply or {})
                self.ws.send(json.dumps(ack))
        except Exception as exc:  # closed at teardown; kept for the asserts
            self.failure = exc

    def got(self, command_id: str) -> bool:
        with self._lock:
            return command_id in self.received

    def close(self) -> None:
        self.ws.close()
        self._thread.join(5)


@dataclass(repr=False)
class Site:
    gw: Gateway
    namespace: str
    processes: Processes
    projector: Proc | None
    edge: AckingEdge | None
    metrics_port: int = 0
    env: dict[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Site(namespace={self.namespace!r}, gateway={self.gw.http})"

    def token(self, **kwargs: Any) -> str:
        kwargs.setdefault("control", [EDGE])
        kwargs.setdefault("view", ["*"])
        return user_token(kwargs.pop("user", OPERATOR), **kwargs)

    def dashboard(self, token: str | None = None) -> ClientConnection:
        return ws_connect(f"{self.gw.ws}/ws/dashboard", token or self.token())

    def prober(self) -> ClientConnection:
        """A dashboard of a user with no grants: it gets only the answers to its frames."""
        return self.dashboard(self.token(user="prober", control=[], view=[]))

    def status(self, command_id: str) -> str | None:
        code, _, body = http("GET", f"{self.gw.http}/api/commands/{command_id}", self.token())
        return str(body["status"]) if code == 200 else None

    def wait_status(self, command_id: str, *statuses: str, timeout_s: float = 20) -> str:
        found: str = wait_until(
            lambda: (s := self.status(command_id)) in statuses and s,
            timeout_s,
            what=f"{command_id} to become one of {statuses} (now {self.status(command_id)})",
        )
        return found

    def wait_projected(self, command_id: str, *statuses: str, timeout_s: float = 20) -> str:
        found: str = wait_until(
            lambda: (s := projected_status(self.namespace, command_id)) in statuses and s,
            timeout_s,
            what=f"{command_id} projected as one of {statuses}",
        )
        return found

    def audit(self, *args: str) -> tuple[int, str]:
        return audit(self.env, *args)

    def assert_projector_alive(self) -> None:
        assert self.projector is not None
        assert self.projector.alive(), self.projector.log()[-4000:]


def open_site(
    namespace: str,
    tmp: Path,
    *,
    projector: bool = True,
    edge: bool = True,
    gateway_env: dict[str, str] | None = None,
    **extra: str,
) -> Site:
    metrics_port = free_port()
    env = site_env(
        namespace, tmp / "state", DISPATCH_PROJECTOR_METRICS_PORT=str(metrics_port), **extra
    )
    processes = Processes(env, tmp)
    enroll = processes.dispatch("token", "token", "--edge", EDGE)
    assert enroll.popen.wait(20) == 0, enroll.log()
    port = free_port()
    gw = Gateway(
        processes.dispatch("gateway", "gateway", "--port", str(port), env=gateway_env), port
    )
    gw.wait_ready()
    proj = None
    if projector:
        proj = processes.dispatch("projector", "projector")
        wait_until(lambda: "projector.started" in proj.log(), 30, what="the projector")
    watcher = AckingEdge(f"{gw.ws}/ws/edge/{EDGE}", edge_token(EDGE)) if edge else None
    return Site(gw, namespace, processes, proj, watcher, metrics_port, env)


def close_site(site: Site) -> None:
    if site.edge is not None:
        site.edge.close()
    site.processes.stop_all()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    namespace = f"t{uuid.uuid4().hex[:10]}"
    the_site = open_site(namespace, tmp_path_factory.mktemp("hostile"))
    try:
        yield the_site
    finally:
        close_site(the_site)
        drop_namespace(namespace)
