"""One demo site (gateway, projector, simulated BMS, edge agent: real processes) and one
Chromium per test module."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from console_kit import CHROMIUM, DEVICE_POWER_LIMIT_W, EDGE, Site
from support import DATABASE_URL, REDIS_URL, SECRET, Processes, drop_namespace, free_port


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    namespace = f"t{uuid.uuid4().hex[:10]}"
    tmp = tmp_path_factory.mktemp("ui")
    env = {
        **os.environ,
        "DISPATCH_NAMESPACE": namespace,
        "DISPATCH_JWT_SECRET": SECRET,
        "DISPATCH_REDIS_URL": REDIS_URL,
        "DISPATCH_DATABASE_URL": DATABASE_URL,
        "DISPATCH_PARTITIONS": "4",
        "XDG_STATE_HOME": str(tmp / "state"),
        "PYTHONUNBUFFERED": "1",
        "DISPATCH_JWT_LEEWAY_S": "0",  # an ended token closes the console's socket at once
    }
    procs = Processes(env, tmp)
    try:
        assert procs.dispatch("token", "token", "--edge", EDGE).popen.wait(20) == 0
        gateway = procs.gateway()
        procs.dispatch("projector", "projector")
        modbus_port = free_port()
        procs.dispatch(
            "simulator",
            "simulate-device",
            "--port",
            str(modbus_port),
            "--power-limit-w",
            str(DEVICE_POWER_LIMIT_W),
        )
        site = Site(procs, gateway, modbus_port, tmp / "edge")
        site.start_edge()
        yield site
    finally:
        procs.stop_all()
        drop_namespace(namespace)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed (scripts/browser.sh)")
    with sync_playwright() as p:
        chromium = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    yield page
    context.close()
    assert problems == [], f"the page threw: {problems}"
