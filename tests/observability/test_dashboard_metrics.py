"""Every expression of the Grafana dashboard and the alert rules names real metrics.

The names come from the `# TYPE` lines of a real gateway's /metrics and a real
projector's (its own port: quarantine and reconciliation; labelled metrics are declared
before their first sample), with the suffixes each type adds.
"""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest

from support import Processes, free_port, wait_until

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


def scrape(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return str(resp.read().decode())
    except OSError:
        return ""


def test_dashboard_and_alerts_use_only_exposed_metrics(processes: Processes) -> None:
    gw = processes.gateway()
    exposed = exposed_names(scrape(f"{gw.http}/metrics"))
    port = free_port()
    processes.dispatch("projector", "projector", env={"DISPATCH_PROJECTOR_METRICS_PORT": str(port)})
    projector = wait_until(
        lambda: scrape(f"http://127.0.0.1:{port}/metrics"), 30, what="the projector's /metrics"
    )
    exposed |= exposed_names(projector)
    expressions = dashboard_expressions() + alert_expressions()
    assert len(dashboard_expressions()) >= 15 and len(alert_expressions()) >= 10
    missing = {
        (name, expr) for expr in expressions for name in METRIC.findall(expr) if name not in exposed
    }
    assert not missing, f"expressions name metrics /metrics does not expose: {sorted(missing)}"
