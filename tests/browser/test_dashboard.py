"""The live dashboard in real Chromium, against a real server process.

What a new user sees: charts that move at once, values that change, and a value
pushed with an HTTP POST showing up on the page.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

from tests.browser.conftest import PageHandle
from tests.clients import request
from tests.servers import ServerProcess
from tests.waiting import until_sync

try:
    from playwright.sync_api import expect
except ImportError:  # the `browser` fixture skips (or, under CI, fails) these tests
    expect = None  # type: ignore[assignment]


def open_dashboard(make_page: Callable[..., PageHandle], base: str, **ctx: Any) -> PageHandle:
    handle = make_page(**ctx)
    page = handle.page
    page.goto(base + "/dashboard")
    expect(page.locator("#conn-state")).to_have_attribute("data-state", "open")
    expect(page.locator("#dash")).to_have_attribute("data-ready", "true")
    return handle


def polling(page: Any) -> Callable[[float], None]:
    """How ``until_sync`` passes the time in a page: Playwright's own wait, so page events keep coming."""
    return lambda seconds: page.wait_for_timeout(seconds * 1000)


def drawn(page: Any) -> None:
    """Return once the page has painted what it received so far (two animation frames)."""
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")


def card(page: Any, sensor: str) -> Any:
    return page.locator('.sensor-card[data-sensor="%s"]' % sensor)


def canvas_pixels(page: Any, sensor: str) -> str:
    return page.eval_on_selector('.sensor-card[data-sensor="%s"] canvas' % sensor, "c => c.toDataURL()")


def ingest(server: ServerProcess, method: str, path: str, body: Any) -> dict:
    key = (server.data_dir / "ingest_key").read_text().strip()
    # (DELETE takes no body: 413 otherwise)
    reply = request(server.url, path, method, body, {"Authorization": "Bearer " + key})
    assert reply.status in (200, 201), reply
    return reply.body


def test_charts_draw_and_move_and_values_update(make_page, server):
    handle = open_dashboard(make_page, server)
    page = handle.page
    # A fresh server's dashboard is alive: simulated sensors and this host's vitals.
    for sensor in ("sim.temperature", "sim.vibration", "sim.power", "host.cpu", "host.mem"):
        expect(card(page, sensor)).to_be_visible()
    vib = card(page, "sim.vibration")
    expect(vib.locator(".sensor-unit")).to_have_text("mm/s")
    expect(vib.locator(".sensor-value")).not_to_have_text("–")
    # The canvas has been drawn on (not blank) and keeps changing.
    blank = page.evaluate("""() => { const c = document.createElement('canvas');
        const s = document.querySelector('.sensor-card[data-sensor="sim.vibration"] canvas');
        c.width = s.width; c.height = s.height; return c.toDataURL(); }""")
    first = canvas_pixels(page, "sim.vibration")
    assert first != blank
    values = {vib.locator(".sensor-value").inner_text()}
    frames = {first}

    def moved() -> bool:
        values.add(vib.locator(".sensor-value").inner_text())
        frames.add(canvas_pixels(page, "sim.vibration"))
        return len(values) >= 3 and len(frames) >= 3

    until_sync(moved, timeout=5, interval=0.1, sleep=polling(page),
               what="three different frames and values of the vibration chart")
    # Backfill on open: the 1 Hz temperature chart already holds a minute of points.
    expect(card(page, "sim.temperature").locator(".sensor-foot")).to_contain_text("max ")
    assert page.evaluate("""() => document.querySelector(
        '.sensor-card[data-sensor="sim.temperature"] .sensor-foot').textContent""").startswith("min ")
    expect(page.locator("#stat-streams")).not_to_have_text("–")
    assert not handle.page_errors and not handle.console_errors, (handle.page_errors, handle.console_errors)


def test_a_value_posted_over_http_appears_on_the_page(make_page, server_process):
    handle = open_dashboard(make_page, server_process.url)
    page = handle.page
    assert card(page, "test.device").count() == 0
    reply = ingest(server_process, "POST", "/api/sensors/test.device/readings", 123.4)
    assert reply == {"sensor": "test.device", "stored": 1}
    dev = card(page, "test.device")
    expect(dev.locator(".sensor-value")).to_have_text("123.4")
    expect(dev.locator(".sensor-kind")).to_have_text("device")
    ingest(server_process, "PUT", "/api/sensors/test.device", {"label": "Boiler <b>one</b>", "unit": "°C"})
    expect(dev.locator(".sensor-label")).to_have_text("Boiler <b>one</b>")  # as text, never as HTML
    expect(dev.locator(".sensor-unit")).to_have_text("°C")
    ingest(server_process, "POST", "/api/sensors/test.device/readings", [[time.time() - 0.5, 7.25], [time.time(), 8]])
    expect(dev.locator(".sensor-value")).to_have_text("8")
    # Deleting it takes the card away.
    ingest(server_process, "DELETE", "/api/sensors/test.device", None)
    expect(dev).to_have_count(0)
    assert not handle.page_errors, handle.page_errors
    assert not handle.csp_violations()


def test_picker_pause_and_rate(make_page, server):
    handle = open_dashboard(make_page, server)
    page = handle.page
    frames: list[str] = []
    page.on("websocket", lambda ws: ws.on("framereceived", lambda payload: frames.append(
        payload if isinstance(payload, str) else payload.decode("utf-8", "replace"))))
    page.reload()
    expect(page.locator("#dash")).to_have_attribute("data-ready", "true")

    # Rate: 2 Hz means about two readings messages a second.  Five readings after the server's
    # answer to the new rate, timed by the server's own timestamps, span four intervals.
    page.click('label[for="rate-2"]')

    def at_two_hz() -> list[dict[str, Any]] | None:
        msgs = [json.loads(f) for f in frames]
        answer = next((i for i, m in enumerate(msgs) if m["type"] == "subscribed" and m.get("max_hz") == 2), None)
        after = [] if answer is None else [m for m in msgs[answer + 1:] if m["type"] == "readings"]
        return after[:5] if len(after) >= 5 else None

    readings = until_sync(at_two_hz, timeout=10, interval=0.1, sleep=polling(page),
                          what="five readings messages after the switch to 2 Hz")
    span = readings[-1]["ts"] - readings[0]["ts"]
    assert 4 / 3 <= span <= 4, [m["ts"] for m in readings]  # 1 to 3 a second

    # Choosing sensors: hide one; the choice survives a reload.
    page.click("#picker-toggle")
    page.fill("#picker-filter", "vibration")
    page.uncheck('#picker-list input[data-sensor="sim.vibration"]')
    expect(card(page, "sim.vibration")).to_have_count(0)
    page.keyboard.press("Escape")
    page.reload()
    expect(page.locator("#dash")).to_have_attribute("data-ready", "true")
    expect(card(page, "sim.temperature")).to_be_visible()
    expect(card(page, "sim.vibration")).to_have_count(0)
    assert page.is_checked("#rate-2")

    # Pause freezes the charts and values; resume goes live again.
    def power_readings() -> int:  # readings messages with points of sim.power
        return sum(1 for f in frames if '"type":"readings"' in f and '"sim.power"' in f)

    def next_power_reading() -> str:  # the chart once the next reading of sim.power is drawn
        seen = power_readings()
        until_sync(lambda: power_readings() > seen, timeout=10, sleep=polling(page))
        drawn(page)
        return canvas_pixels(page, "sim.power")

    page.click("#pause")
    expect(page.locator("#paused-banner")).to_be_visible()
    power = card(page, "sim.power")
    # Points from before the pause still draw, and the first one after it draws the line out to
    # the frozen edge: the first reading that changes nothing shows the frozen view.
    frozen = canvas_pixels(page, "sim.power")
    for _ in range(6):
        now = next_power_reading()
        if now == frozen:
            break
        frozen = now
    else:
        raise AssertionError("the chart kept moving while paused")
    for _ in range(3):  # three more readings: nothing moves
        assert next_power_reading() == frozen, "the chart moved while paused"
    page.click("#resume")
    expect(page.locator("#paused-banner")).to_be_hidden()
    expect(power.locator(".sensor-value")).not_to_have_text("–")
    until_sync(lambda: canvas_pixels(page, "sim.power") != frozen, timeout=5, interval=0.1, sleep=polling(page),
               what="the power chart to move again after resume")

    # "All" brings everything back.
    page.click("#picker-toggle")
    page.click("#picker-all")
    expect(card(page, "sim.vibration")).to_be_visible()
    assert not handle.page_errors, handle.page_errors
    assert not handle.csp_violations()


def test_reconnects_after_a_restart_and_stored_readings_come_back(make_page, server_process):
    handle = open_dashboard(make_page, server_process.url)
    page = handle.page
    ingest(server_process, "POST", "/api/sensors/plant.boiler/readings", 42.5)
    expect(card(page, "plant.boiler").locator(".sensor-value")).to_have_text("42.5")
    server_process.restart()
    expect(page.locator("#conn-state")).to_have_attribute("data-state", "open", timeout=20_000)
    expect(page.locator("#dash")).to_have_attribute("data-ready", "true")  # this connection's backfill
    # The reading was stored before its 200: after the restart it is back, through the backfill.
    expect(card(page, "plant.boiler").locator(".sensor-value")).to_have_text("42.5")
    vib = card(page, "sim.vibration").locator(".sensor-value")
    expect(vib).not_to_have_text(vib.inner_text(), timeout=5000)  # live readings after the reconnect
    assert not handle.page_errors, handle.page_errors
