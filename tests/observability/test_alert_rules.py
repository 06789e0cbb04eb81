"""docs/alerts.yml passes `promtool check rules` and its unit tests in docs/alerts.test.yml."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def promtool() -> str:
    """promtool, installed by scripts/promtool.sh when missing; skip only if that fails."""
    found = os.environ.get("DISPATCH_PROMTOOL") or shutil.which("promtool")
    if not found:
        setup = subprocess.run(
            [str(ROOT / "scripts" / "promtool.sh")],
            check=False,
            capture_output=True,
            text=True,
            timeout=600,
        )
        found = shutil.which("promtool")
        if not found:
            pytest.skip(f"promtool could not be installed: {setup.stdout.strip()}")
    return found


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], check=False, cwd=DOCS, capture_output=True, text=True, timeout=120
    )


def test_rules_are_valid() -> None:
    result = run("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_rules_pass_their_unit_tests() -> None:
    result = run("test", "rules", "alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr
