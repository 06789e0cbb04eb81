"""The demo site the console tests drive, and helpers to reach it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from playwright.sync_api import Page
from pymodbus.client import ModbusTcpClient

from support import (
    Gateway,
    Proc,
    Processes,
    edge_token,
    http,
    user_token,
    wait_until,
)

CHROMIUM = os.environ.get("DISPATCH_CHROMIUM", "/usr/bin/chromium")
EDGE = "site1_edge_prod"
OPERATOR = "operator"
# The simulated BMS refuses |SetActivePower| above this: a value the edge's own limits
# (100 kW) let through but the device refuses.
DEVICE_POWER_LIMIT_W = 60_000
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Site:
    """The running demo site and how to reach it."""

    procs: Processes
    gateway: Gateway
    modbus_port: int
    state_dir: Path
    edge: Proc | None = None

    @property
    def url(self) -> str:
        return self.gateway.http

    def operator_token(self) -> str:
        return user_token(OPERATOR, control=[EDGE])

    def viewer_token(self) -> str:
        return user_token("auditor", view=[EDGE])

    def edge_online(self) -> bool:
        status, _, body = http("GET", f"{self.url}/api/edges", self.operator_token())
        return status == 200 and any(e["edge_id"] == EDGE and e["online"] for e in body["edges"])

    def start_edge(self) -> None:
        self.edge = self.procs.dispatch(
            "edge",
            "edge",
            "--edge-id",
            EDGE,
            "--gateway",
            self.gateway.ws,
            "--token",
            edge_token(EDGE),
            "--modbus",
            f"bms_main=127.0.0.1:{self.modbus_port}",
            "--state-dir",
            str(self.state_dir),
        )
        wait_until(self.edge_online, 20, what="the edge agent online")

    def kill_edge(self) -> None:
        assert self.edge is not None
        self.edge.kill()
        self.edge = None

    def restart_gateway(self, stop: Any = None) -> None:
        self.gateway.proc.stop()
        self.gateway = self.procs.gateway(port=self.gateway.port)

    def power_register(self) -> int:
        client = ModbusTcpClient("127.0.0.1", port=self.modbus_port)
        assert client.connect()
        try:
            regs = client.read_holding_registers(0, count=2, device_id=1).registers
            return int(client.convert_from_registers(regs, client.DATATYPE.INT32))
        finally:
            client.close()


def sign_in(page: Page, site: Site, token: str | None = None) -> None:
    page.goto(site.url + "/")
    page.fill("#token", token or site.operator_token())
    page.click("#signin-button")
    page.wait_for_selector("#conn[data-state=open]", timeout=15_000)
    page.wait_for_selector(f"#edges li[data-edge={EDGE}]", timeout=10_000)
