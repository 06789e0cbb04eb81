"""Every expression of the Grafana dashboard and the alert rules names real metrics.

The names come from the `# TYPE` lines of a real gateway's /metrics (labelled metrics
are declared there before their first sample), with the suffixes each type adds.
"""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest

from support import Processes

DOCS = Path(__file__).resolve().parents[2] / "docs"
METRIC = re.compile(r"\b(dispatch_[a-z0-9_]+)\b")
SUFFIXES = {
    "counter": ("",),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("", "_count", "_sum"),
}

pytestmark = pytest.mark.slow


def exposed_names(text: str) -> set[str]:
    names: set[str] = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        names.update(name + suffix for suffix in SUFFIXES.get(kind, ("",)))
    return names


def dashboard_expressions() -> list[str]:
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def alert_expressions() -> list[str]:
    return re.findall(r"^\s+expr: (.+)$", (DOCS / "alerts.yml").read_text(), re.M)


def test_dashboard_and_alerts_use_only_exposed_metrics(processes: Processes) -> None:
    gw = processes.gateway()
    with urllib.request.urlopen(f"{gw.http}/metrics", timeout=5) as resp:
        exposed = exposed_names(resp.read().decode())
    expressions = dashboard_expressions() + alert_expressions()
    assert len(dashboard_expressions()) >= 15 and len(alert_expressions()) >= 10
    missing = {
        (name, expr) for expr in expressions for name in METRIC.findall(expr) if name not in exposed
    }
    assert not missing, f"expressions name metrics /metrics does not expose: {sorted(missing)}"
