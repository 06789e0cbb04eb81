"""`dispatch demo` stopped with Ctrl-C in a terminal: quiet, exit 0, nothing left running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from support import free_port

pytestmark = pytest.mark.slow


def test_ctrl_c_stops_the_demo_quietly_with_exit_0(env: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    # Its own process group, as a shell gives a foreground job: the terminal's SIGINT
    # reaches the demo and every child at once.
    demo = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dispatch.cli",
            "demo",
            "--port",
            str(port),
            "--state-dir",
            str(tmp_path / "demo"),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        text=True,
    )
    try:
        assert demo.stdout is not None
        banner = []
        for line in demo.stdout:
            banner.append(line)
            if "Press Ctrl-C" in line:
                break
        text = "".join(banner)
        assert "Operator token:" in text and "#token=" not in text, text
        os.killpg(demo.pid, signal.SIGINT)
        out, err = demo.communicate(timeout=30)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
    assert demo.returncode == 0, err
    assert err == "", err
    assert "unexpectedly" not in out and "Traceback" not in out
