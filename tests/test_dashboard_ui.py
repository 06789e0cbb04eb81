"""The operator dashboard in a real browser (Debian Chromium driven by Playwright)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
import websockets
from playwright.async_api import async_playwright

from support import Processes, edge_token, user_token

CHROMIUM = os.environ.get("DISPATCH_CHROMIUM", "/usr/bin/chromium")
EDGE = "site1_edge_prod"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is not installed (scripts/browser.sh)"
    ),
]


async def scripted_edge(url: str, stop: asyncio.Event) -> list[dict[str, object]]:
    got = []
    async with websockets.connect(
        url, additional_headers={"Authorization": f"Bearer {edge_token(EDGE)}"}
    ) as ws:
        while not stop.is_set():
            try:
                msg = json.loads(await asyncio.wait_for(ws.recv(), 0.2))
            except TimeoutError:
                continue
            if "type" in msg:
                continue  # a notice about an ack (ack_recorded), not a command
            got.append(msg)
            await ws.send(json.dumps({"command_id": msg["command_id"], "status": "accepted"}))
            await ws.send(
                json.dumps(
                    {
                        "command_id": msg["command_id"],
                        "status": "executed",
                        "executed_at": None,
                        "error": None,
                    }
                )
            )
    return got


async def test_operator_sends_a_setpoint_from_the_dashboard_and_sees_it_executed(
    processes: Processes,
) -> None:
    processes.dispatch("token", "token", "--edge", EDGE).popen.wait(20)
    gw = processes.gateway()
    stop = asyncio.Event()
    edge = asyncio.create_task(scripted_edge(f"{gw.ws}/ws/edge/{EDGE}", stop))
    token = user_token("operator", control=[EDGE])
    async with async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = await browser.new_page()
            await page.goto(f"{gw.http}/#token={token}")
            await page.wait_for_selector("#conn.online", timeout=10_000)
            assert "token=" not in page.url  # the token leaves the address bar at once
            await page.click("text=Set Battery Charge 50 kW")
            await page.wait_for_selector("tr[data-status=executed]", timeout=15_000)
            statuses = await page.eval_on_selector_all(
                "#events tr", "rows => rows.map(r => r.dataset.status).reverse()"
            )
            assert statuses == ["issued", "authorized", "routed", "delivered", "executed"]
            # A malformed value is refused with its cause, shown to the operator.
            await page.fill("#value", "fifty")
            await page.click("#send")
            await page.wait_for_selector("tr[data-status=rejected]", timeout=10_000)
            detail = await page.inner_text("tr[data-status=rejected] td:last-child")
            assert detail.startswith("invalid_command")
        finally:
            await browser.close()
    stop.set()
    delivered = await edge
    assert [m["value"] for m in delivered] == [50000]
