"""The TypeScript client: its types follow the msgspec schemas, its committed build follows
its sources, and `node --test` passes against a real gateway, edge agent and simulated BMS."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from schemas import typescript

from support import Processes, edge_token, free_port, http, user_token, wait_until

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "client"
BUILT = ROOT / "gateway" / "static" / "client"
EDGE = "site1_edge_prod"
needs_npm = pytest.mark.skipif(
    not (CLIENT / "node_modules").exists() or shutil.which("node") is None,
    reason="run `npm ci` in client/ (make test does)",
)


def websocket_flag() -> list[str]:
    """Node 20 has a global WebSocket only behind a flag; Node 22 and later always."""
    probe = subprocess.run(
        ["node", "-e", "process.exit(typeof WebSocket === 'undefined' ? 1 : 0)"], check=False
    )
    return [] if probe.returncode == 0 else ["--experimental-websocket"]


def test_committed_typescript_types_are_current() -> None:
    committed = (CLIENT / "src" / "types.ts").read_text()
    assert committed == typescript.render(), (
        "run: python -m schemas.typescript > client/src/types.ts, then `npm run build` in client/"
    )


@needs_npm
def test_committed_build_matches_the_sources(tmp_path: Path) -> None:
    build = subprocess.run(
        ["node", "build.mjs", str(tmp_path)],
        check=False,
        cwd=CLIENT,
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, (
        "`node build.mjs` failed in client/ (`npm ci` there installs esbuild):\n"
        + build.stderr[-2000:]
    )
    built = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    committed = {p.name: p.read_bytes() for p in BUILT.iterdir() if p.is_file()}
    stale = sorted(n for n in built.keys() | committed.keys() if built.get(n) != committed.get(n))
    assert not stale, (
        f"gateway/static/client/ does not match the sources ({', '.join(stale)}): "
        "run `npm run build` in client/ and commit gateway/static/client/"
    )


@pytest.mark.slow
@needs_npm
def test_node_suite_passes_against_the_real_gateway(processes: Processes) -> None:
    assert processes.dispatch("token", "token", "--edge", EDGE).popen.wait(20) == 0
    gateway = processes.gateway()
    modbus_port = free_port()
    processes.dispatch("projector", "projector")
    processes.dispatch("simulator", "simulate-device", "--port", str(modbus_port))
    processes.dispatch(
        "edge",
        "edge",
        "--edge-id",
        EDGE,
        "--gateway",
        gateway.ws,
        "--token",
        edge_token(EDGE),
        "--modbus",
        f"bms_main=127.0.0.1:{modbus_port}",
        "--state-dir",
        str(processes.log_dir / "edge"),
    )
    token = user_token("node_client", control=[EDGE])

    def online() -> bool:
        status, _, body = http("GET", f"{gateway.http}/api/edges", token)
        return status == 200 and any(e["online"] for e in body["edges"])

    wait_until(online, 20, what="the edge agent online")
    run = subprocess.run(
        ["node", *websocket_flag(), "--test", "--test-reporter=tap", "test/"],
        check=False,
        cwd=CLIENT,
        env={
            **os.environ,
            "DISPATCH_URL": gateway.http,
            "DISPATCH_TOKEN": token,
            "DISPATCH_EDGE": EDGE,
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    # Every live test ran (none skipped for want of the URL or token) and none failed.
    assert "\n# fail 0" in run.stdout, run.stdout[-2000:]
    assert re.search(r"^# skip(ped)? 0$", run.stdout, re.MULTILINE), run.stdout[-2000:]
