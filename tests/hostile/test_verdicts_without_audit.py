"""Verdicts do not share the audit's fate: with no projector running and PostgreSQL out
of reach, a gateway alone still reaches `expired` and `timed_out` (contract: "Timeout
and expiry verdicts need only Redis and at least one running dispatch gateway")."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import EDGE, Site, close_site, open_site
from support import command, drop_namespace, free_port, http, wait_until

OFFLINE_EDGE = "hostile_edge_offline"


@pytest.fixture
def gateway_only(tmp_path: Path) -> Iterator[Site]:
    namespace = f"t{uuid.uuid4().hex[:10]}"
    nowhere = f"postgresql://127.0.0.1:{free_port()}/test"  # nothing listens there
    site = open_site(
        namespace,
        tmp_path,
        projector=False,
        DISPATCH_DATABASE_URL=nowhere,
        DISPATCH_ACK_TIMEOUT_MS="1500",
    )
    try:
        yield site
    finally:
        close_site(site)
        drop_namespace(namespace)


def test_a_gateway_alone_reaches_expiry_and_timeout_verdicts(gateway_only: Site) -> None:
    site = gateway_only
    enroll = site.processes.dispatch("token", "token", "--edge", OFFLINE_EDGE)
    assert enroll.popen.wait(20) == 0, enroll.log()
    token = site.token(control=[EDGE, OFFLINE_EDGE])
    code, _, ready = http("GET", f"{site.gw.http}/readyz")
    # The audit's outage is reported but never takes the gateway out of rotation.
    assert ready["checks"]["postgres"]["ok"] is False, ready
    assert code == 200 and ready["ready"] is True, ready
    # Only the audit routes say it: 503 with the cause, not 500.
    code, _, listing = http("GET", f"{site.gw.http}/api/commands", token)
    assert code == 503 and "does not answer" in listing["error"]["message"], listing

    offline = command(f"cmd_{uuid.uuid4().hex[:12]}", edge_id=OFFLINE_EDGE, expiry_sec=2)
    silent = command(f"silent_{uuid.uuid4().hex[:12]}", edge_id=EDGE)
    for body in (offline, silent):
        code, _, reply = http("POST", f"{site.gw.http}/api/commands", token, body)
        assert code == 202, reply

    assert site.wait_status(offline["command_id"], "expired", timeout_s=15) == "expired"
    assert site.edge is not None
    # It reached the edge, which stays silent about it.
    wait_until(lambda: site.edge.got(silent["command_id"]), 10, what="the silent command")
    assert site.wait_status(silent["command_id"], "timed_out", timeout_s=15) == "timed_out"
    assert "gateway.verdicts.started" in site.gw.proc.log()
