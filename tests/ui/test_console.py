"""The operator console in Chromium against the real gateway, edge agent and simulated BMS.

The tests of this module share one site and one browser and run in file order: the
later ones build on the edge state the earlier ones leave (online, killed, back).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from console_kit import EDGE, OPERATOR, ROOT, Site, sign_in
from support import command, http, user_token, wait_until

pytestmark = pytest.mark.slow
SHOTS = ROOT / "docs" / "screenshots"
STEPS = ["issued", "authorized", "routed", "delivered", "executed"]


def row(page: Page, status: str | None = None) -> str:
    return "#commands tbody tr[data-command]" + (f"[data-status={status}]" if status else "")


def send_setpoint(page: Page, value: str, unit: str = "kW") -> None:
    page.select_option("#f-type", "setpoint")
    page.select_option("#f-channel", "bms_main/SetActivePower")
    page.select_option("#f-unit", unit)
    page.fill("#f-value", value)
    page.click("#send")


def shot(page: Page, name: str) -> None:
    """Screenshots for the README, refreshed only when asked (DISPATCH_SCREENSHOTS=1)."""
    if os.environ.get("DISPATCH_SCREENSHOTS") == "1":
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_sign_in_shows_the_edge_online_and_keeps_the_token_out_of_the_url(
    page: Page, site: Site
) -> None:
    sign_in(page, site)
    edge = page.locator(f"#edges li[data-edge={EDGE}]")
    expect(edge.locator(".badge")).to_have_text("online")
    expect(page.locator("#who-user")).to_have_text("operator")
    expect(page.locator("#who-expiry")).to_contain_text("token expires in")
    assert "token" not in page.url and page.url.rstrip("/") == site.url
    # Channels, limits and controllers come from the capability config.
    expect(page.locator("#f-channel option")).to_have_text(
        ["bms_main / SetActivePower", "bms_main / MinSoc"]
    )
    expect(page.locator("#f-channel-limits")).to_contain_text("-100 kW to 100 kW")


def test_50_kw_shows_every_step_and_reaches_the_register(page: Page, site: Site) -> None:
    sent: list[str] = []
    page.on("websocket", lambda ws: ws.on("framesent", lambda f: sent.append(str(f))))
    sign_in(page, site)
    page.select_option("#f-channel", "bms_main/SetActivePower")
    page.select_option("#f-unit", "kW")
    page.fill("#f-value", "50")
    page.dblclick("#send")  # an impatient double click sends one command
    page.wait_for_selector(row(page, "executed"), timeout=15_000)
    assert len([f for f in sent if "command_type" in f]) == 1, sent
    expect(page.locator("#announce")).to_contain_text("executed")
    first = page.locator(row(page, "executed")).first
    expect(first).to_contain_text("setpoint")
    expect(first).to_contain_text("50 kW (50000 W)")
    expect(first).to_contain_text("operator")
    first.get_by_role("button", name="Steps").click()
    steps = page.locator(".timeline li[data-step]")
    expect(steps).to_have_count(len(STEPS))
    assert [s.get_attribute("data-step") for s in steps.all()] == STEPS
    expect(steps.last).to_contain_text("ms in total")
    assert site.power_register() == 50_000
    shot(page, "console-executed")


def test_forms_follow_the_capabilities_and_work_from_the_keyboard(page: Page, site: Site) -> None:
    sent: list[str] = []
    page.on("websocket", lambda ws: ws.on("framesent", lambda f: sent.append(str(f))))
    sign_in(page, site)
    # A controller mode: pickers from the capability config, no free text.
    page.select_option("#f-type", "mode_change")
    expect(page.locator("#f-controller option")).to_have_text(["peak shaving", "balancing"])
    expect(page.locator("#f-mode option")).to_have_text(["disabled", "enabled"])
    page.select_option("#f-mode", "enabled")
    page.click("#send")
    mode = page.locator(row(page)).first
    expect(mode).to_have_attribute("data-status", "executed", timeout=15_000)
    expect(mode).to_contain_text("site1_edge_prod / core / peak_shaving")
    # A restart asks first; Escape keeps it unsent.
    page.select_option("#f-type", "system")
    page.select_option("#f-system", "restart")
    page.focus("#send")
    page.keyboard.press("Enter")
    expect(page.locator("#confirm")).to_contain_text("restarts the edge")
    page.keyboard.press("Escape")
    expect(page.locator("#confirm")).to_be_hidden()
    expect(page.locator(row(page)).first).to_contain_text("peak_shaving")
    assert not [f for f in sent if '"restart"' in f], sent
    # An override needs its duration (no silent default), then counts down.
    page.select_option("#f-type", "config_override")
    page.select_option("#f-channel", "bms_main/MinSoc")
    page.focus("#f-value")
    page.keyboard.type("20")
    page.focus("#f-duration")
    page.keyboard.press("Tab")
    expect(page.locator("#f-duration-error")).to_contain_text("Enter the duration")
    expect(page.locator("#send")).to_be_disabled()
    page.focus("#f-duration")
    page.keyboard.type("1")
    page.keyboard.press("Enter")
    override = page.locator(row(page)).first
    expect(override).to_have_attribute("data-status", "executed", timeout=15_000)
    expect(page.locator("#overrides li")).to_contain_text("MinSoc = 20 %: ends in 0 min")


def test_empty_blank_hex_and_out_of_range_values_are_blocked_at_the_field(
    page: Page, site: Site
) -> None:
    sent: list[str] = []
    page.on("websocket", lambda ws: ws.on("framesent", lambda f: sent.append(str(f))))
    sign_in(page, site)
    page.select_option("#f-unit", "kW")
    for value, words in [
        ("", "Enter a value"),
        ("   ", "Enter a value"),
        ("0x10", "not a plain number"),
        ("1e3", "not a plain number"),
        ("150", "Out of range"),
        ("-100.5", "Out of range"),
    ]:
        page.fill("#f-value", value)
        page.locator("#f-value").blur()
        expect(page.locator("#f-value-error")).to_contain_text(words)
        expect(page.locator("#f-value")).to_have_attribute("aria-invalid", "true")
        expect(page.locator("#send")).to_be_disabled()
    page.fill("#f-value", "100")
    expect(page.locator("#f-value-error")).to_be_empty()
    expect(page.locator("#send")).to_be_enabled()
    assert [f for f in sent if "command_type" in f] == []


def test_a_large_value_asks_first_and_the_device_refusal_shows_its_reason(
    page: Page, site: Site
) -> None:
    sign_in(page, site)
    page.check("#f-emergency")
    send_setpoint(page, "70")  # within the channel's limits, above the BMS's 60 kW
    dialog = page.locator("#confirm")
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text("EMERGENCY")
    expect(dialog).to_contain_text("more than half its limit")
    page.click("#confirm-yes")
    failed = page.locator(row(page, "failed")).first
    expect(failed).to_be_visible(timeout=15_000)
    expect(failed.locator(".reason")).to_contain_text("The device refused or failed the write.")
    expect(failed.locator(".reason")).to_contain_text("Modbus exception 3")
    expect(failed).to_contain_text("emergency")
    # The emergency flag does not stick to the next command.
    expect(page.locator("#f-emergency")).not_to_be_checked()


def test_killed_edge_shows_offline_and_queued_commands_run_when_it_returns(
    page: Page, site: Site
) -> None:
    sign_in(page, site)
    site.kill_edge()
    badge = page.locator(f"#edges li[data-edge={EDGE}] .badge")
    expect(badge).to_have_text("offline", timeout=10_000)  # edge ping interval: 10 s
    send_setpoint(page, "10")
    queued = page.locator(row(page, "queued")).first
    expect(queued).to_be_visible(timeout=10_000)
    kept = queued.get_attribute("data-command")
    meta = page.locator(f"#edges li[data-edge={EDGE}] .edge-meta")
    expect(meta).to_contain_text("queue 1", timeout=5_000)
    # A second one, for another channel, is cancelled while it waits.
    page.select_option("#f-channel", "bms_main/MinSoc")
    expect(page.locator("#f-unit option")).to_have_text(["%"])
    page.fill("#f-value", "30")
    page.click("#send")
    expect(page.locator(row(page, "queued"))).to_have_count(2, timeout=10_000)
    second = page.locator(row(page, "queued")).first
    cancelled_id = second.get_attribute("data-command")
    assert cancelled_id != kept
    second.get_by_role("button", name="Cancel").click()
    expect(page.locator(f"#commands tr[data-command='{cancelled_id}']")).to_have_attribute(
        "data-status", "cancelled", timeout=10_000
    )
    shot(page, "console-queued")
    site.start_edge()
    expect(badge).to_have_text("online", timeout=10_000)
    expect(page.locator(f"#commands tr[data-command='{kept}']")).to_have_attribute(
        "data-status", "executed", timeout=15_000
    )
    assert site.power_register() == 10_000


def test_reload_keeps_history_and_gateway_restart_fills_the_gap(page: Page, site: Site) -> None:
    sign_in(page, site)
    send_setpoint(page, "5")
    page.wait_for_selector(row(page, "executed"), timeout=15_000)
    before = page.eval_on_selector_all(row(page), "rows => rows.map(r => r.dataset.command)")
    assert before
    page.reload()
    page.wait_for_selector("#conn[data-state=open]", timeout=15_000)
    for command_id in before:  # mine: sent from this tab, and the history of the user
        expect(page.locator(f"#commands tr[data-command='{command_id}']")).to_be_visible()
    page.select_option("#h-status", "cancelled")
    page.click("#history-form button[type=submit]")
    cancelled = page.locator("#history tbody tr")
    expect(cancelled.first).to_contain_text("cancelled")
    assert all("cancelled" in t for t in cancelled.all_inner_texts())
    page.select_option("#h-status", "")
    with page.expect_download() as download:
        page.click("#h-export")
    csv = Path(download.value.path()).read_text()
    assert csv.startswith("command_id,") and any(c in csv for c in before), csv[:300]
    # The edge goes away; a command waits for it; the gateway restarts meanwhile.
    site.kill_edge()
    send_setpoint(page, "7")
    queued = page.locator(row(page, "queued")).first
    expect(queued).to_be_visible(timeout=10_000)
    waiting = queued.get_attribute("data-command")
    site.gateway.proc.stop()
    expect(page.locator("#conn")).to_have_attribute("data-state", "reconnecting", timeout=10_000)
    site.restart_gateway()
    site.start_edge()  # executes the queued command while the page may still be away
    token = site.operator_token()
    wait_until(
        lambda: (
            http("GET", f"{site.url}/api/commands/{waiting}", token)[2].get("status") == "executed"
        ),
        20,
        what="the queued command executed",
    )
    expect(page.locator("#conn")).to_have_attribute("data-state", "open", timeout=15_000)
    expect(page.locator(f"#commands tr[data-command='{waiting}']")).to_have_attribute(
        "data-status", "executed", timeout=10_000
    )


def test_view_only_user_sees_the_form_disabled(page: Page, site: Site) -> None:
    body = command(value=1000, source=OPERATOR)
    status, _, _ = http("POST", f"{site.url}/api/commands", site.operator_token(), body)
    assert status == 202

    def projected() -> bool:
        _, _, listing = http("GET", f"{site.url}/api/commands?limit=20", site.viewer_token())
        return any(r["command_id"] == body["command_id"] for r in listing["commands"])

    wait_until(projected, 15, what="the operator's command in the audit history")
    sign_in(page, site, site.viewer_token())
    expect(page.locator("#send-readonly")).to_be_visible()
    expect(page.locator("#f-value")).to_be_disabled()
    expect(page.locator("#f-type")).to_be_disabled()
    expect(page.locator("#send")).to_be_disabled()
    page.get_by_label("All").check()
    seen = page.locator(f"#commands tr[data-command='{body['command_id']}']")
    expect(seen).to_contain_text("operator", timeout=10_000)
    expect(page.locator(f"{row(page)} button", has_text="Cancel")).to_have_count(0)
    page.click("#refusals-load")
    expect(page.locator("#refusals tbody tr").first).to_be_visible()
    expect(page.locator("#refusals-error")).to_be_empty()


def test_phone_width_has_no_horizontal_scroll(page: Page, site: Site) -> None:
    page.set_viewport_size({"width": 390, "height": 844})
    sign_in(page, site)
    page.get_by_label("All").check()
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, width
    shot(page, "console-phone")


def test_axe_finds_no_violation(page: Page, site: Site) -> None:
    axe = ROOT / "client" / "node_modules" / "axe-core" / "axe.min.js"
    assert axe.exists(), "run `npm ci` in client/"
    page.goto(site.url + "/")
    page.evaluate(axe.read_text() + ";0")  # DevTools evaluation: not subject to the CSP
    assert _axe(page) == []
    sign_in(page, site)
    send_setpoint(page, "1")
    page.wait_for_selector(row(page, "executed"), timeout=15_000)
    page.get_by_label("All").check()
    page.locator("#commands button", has_text="Steps").first.click()
    page.evaluate(axe.read_text() + ";0")  # DevTools evaluation: not subject to the CSP
    assert _axe(page) == []
    shot(page, "console-laptop")


def _axe(page: Page) -> list[str]:
    result = page.evaluate(
        "async () => (await axe.run(document, {runOnly: ['wcag2a', 'wcag2aa', 'wcag21aa']}))"
        ".violations.map(v => v.id + ': ' + v.nodes.map(n => n.target.join(' ')).join(', '))"
    )
    return list(result)


def test_page_responses_carry_the_security_headers(site: Site) -> None:
    for path in ["/", "/static/console.js", "/api/edges"]:
        status, headers, _ = http("GET", site.url + path, site.operator_token())
        assert status == 200, path
        csp = headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
        assert "unsafe-inline" not in csp
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "no-referrer"
    status, icon_headers, _ = http("GET", site.url + "/static/favicon.svg")
    assert status == 200 and icon_headers["content-type"].startswith("image/svg+xml")
    _, page_headers, body = http("GET", site.url + "/")
    assert page_headers["cache-control"] == "no-store"
    assert "<script>" not in str(body)  # no inline script


def test_capability_config_needs_can_view(site: Site) -> None:
    url = f"{site.url}/api/edges/{EDGE}/capabilities"
    status, _, body = http("GET", url, user_token("nobody"))
    assert status == 403 and body["error"]["code"] == "forbidden"
    status, _, body = http("GET", url, site.viewer_token())
    assert status == 200 and [c["name"] for c in body["controllers"]] == [
        "peak_shaving",
        "balancing",
    ]


def test_an_ended_token_signs_out_with_the_reason_in_words(page: Page, site: Site) -> None:
    sign_in(page, site, user_token("operator", control=[EDGE], ttl_s=6))
    expect(page.locator("#token-error")).to_contain_text("token expired", timeout=15_000)
    expect(page.locator("#signin")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('dispatch.token')") is None
