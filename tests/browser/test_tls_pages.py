"""The three pages over https:// and wss:// in real Chromium (the test's own self-signed
certificate; the browser context is told to accept it, as Chromium's
--ignore-certificate-errors flag does)."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.browser.conftest import PageHandle
from tests.certs import https_ready, self_signed, trusting
from tests.servers import ServerProcess, free_port

try:
    from playwright.sync_api import expect
except ImportError:  # the `browser` fixture skips (or, under CI, fails) these tests
    expect = None  # type: ignore[assignment]

KEY = "tls-browser-key-0123456789"


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[ServerProcess]:
    cert, key = self_signed(tmp_path / "certs")
    port = free_port()
    srv = ServerProcess(port, tmp_path / "data", "--certfile=" + cert, "--keyfile=" + key, "--ingest_key=" + KEY,
                        "--host_metrics=False", log_path=tmp_path / "server.log")
    srv.url = "https://127.0.0.1:%d" % port
    srv.cert = cert  # type: ignore[attr-defined]
    srv.start(ready=lambda: https_ready(port))
    try:
        yield srv
    finally:
        srv.stop()


def test_chat_dashboard_and_editor_work_over_wss(tls_server: ServerProcess,
                                                 make_page: Callable[..., PageHandle]) -> None:
    base = tls_server.url
    assert base.startswith("https://")
    chat = make_page(ignore_https_errors=True)
    page = chat.page
    page.add_init_script("try { localStorage.setItem('rt.chat.name', JSON.stringify('ann')); } catch (e) {}")
    page.goto(base + "/chat")
    expect(page.locator("#conn-state")).to_have_attribute("data-state", "open")
    expect(page.locator("#chat")).to_have_attribute("data-joined", "true")
    page.fill("#text", "sent over wss")
    page.press("#text", "Enter")
    expect(page.locator("#messages .msg:not(.pending) .msg-text")).to_have_text(["sent over wss"])
    assert page.evaluate("() => location.protocol") == "https:"

    dash = make_page(ignore_https_errors=True)
    dash.page.goto(base + "/dashboard")
    expect(dash.page.locator("#dash")).to_have_attribute("data-ready", "true")
    req = urllib.request.Request(base + "/api/sensors/tls.boiler/readings", method="POST",
                                 data=json.dumps([[time.time(), 42.5]]).encode(),
                                 headers={"Authorization": "Bearer " + KEY})
    with urllib.request.urlopen(req, timeout=5, context=trusting(tls_server.cert)) as r:  # type: ignore[attr-defined]
        assert r.status == 200
    card = dash.page.locator('.sensor-card[data-sensor="tls.boiler"]')
    expect(card.locator(".sensor-value")).to_contain_text("42.5")

    ed = make_page(ignore_https_errors=True)
    ed.page.goto(base + "/edit/tlsnotes")
    expect(ed.page.locator("#editor")).to_have_attribute("data-state", "ready")
    ed.page.locator("#text").type("typed over wss")
    expect(ed.page.locator("#editor")).to_have_attribute("data-sync", "saved")
    with urllib.request.urlopen(base + "/api/docs/tlsnotes", timeout=5,
                                context=trusting(tls_server.cert)) as r:  # type: ignore[attr-defined]
        assert json.loads(r.read())["text"] == "typed over wss"
    for h in (chat, dash, ed):
        assert not h.page_errors and not h.csp_violations(), (h.page_errors, h.console_errors)
