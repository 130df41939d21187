"""Tokens in real Chromium: the shared client refreshes a token before it expires, stops on a
4001 it cannot fix, never reconnects after a 4003, and sees those codes at all (close_codes=1)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jwt
import pytest

from tests.browser.conftest import PageHandle
from tests.clients import request
from tests.servers import ServerProcess, free_port

try:
    from playwright.sync_api import expect
except ImportError:  # the `browser` fixture skips (or, under CI, fails) these tests
    expect = None  # type: ignore[assignment]

SECRET = "browser-" + "s" * 40
KEY = "k" * 32


def mint(sub: str = "ann", ttl: float = 60.0) -> str:
    return jwt.encode({"sub": sub, "name": sub, "exp": time.time() + ttl}, SECRET, algorithm="HS256")


@pytest.fixture
def token_server(tmp_path: Path) -> Iterator[ServerProcess]:
    srv = ServerProcess(free_port(), tmp_path / "data", "--auth=token", "--jwt_secret=" + SECRET,
                        "--token_refresh_window=2", "--ingest_key=" + KEY, "--simulated_sensors=",
                        "--host_metrics=False", log_path=tmp_path / "server.log")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def opened(srv: ServerProcess) -> int:
    """WebSocket connections the server has opened (a reconnect is one more)."""
    text = request(srv.port, "/metrics").body
    m = re.search(r"realtime_connections_opened_total ([0-9.]+)", text)
    return int(float(m.group(1))) if m else 0


def test_the_page_refreshes_its_token_before_exp_and_keeps_chatting(token_server: ServerProcess,
                                                                     make_page: Callable[..., PageHandle]) -> None:
    handle = make_page()
    page = handle.page
    minted: list[str] = []

    def fresh() -> str:
        minted.append(mint(ttl=60))
        return minted[-1]

    page.expose_function("mintToken", fresh)
    page.add_init_script("window.realtimeRefreshToken = () => window.mintToken();"
                         "try { localStorage.setItem('rt.chat.name', JSON.stringify('ann')); } catch (e) {}")
    page.goto(token_server.url + "/chat?token=" + mint(ttl=4))
    expect(page.locator("#conn-state")).to_have_attribute("data-state", "open")
    expect(page.locator("#chat")).to_have_attribute("data-joined", "true")
    page.wait_for_timeout(5500)  # past the first token's exp
    assert len(minted) == 1  # asked once, at token_expiring, and sent on the open socket
    expect(page.locator("#conn-state")).to_have_attribute("data-state", "open")
    assert opened(token_server) == 1  # the same socket all along
    page.fill("#text", "still here")
    page.press("#text", "Enter")
    expect(page.locator("#messages .msg:not(.pending) .msg-text")).to_have_text(["still here"])
    assert not handle.page_errors


def test_without_a_way_to_refresh_a_4001_stops_the_client(token_server: ServerProcess,
                                                          make_page: Callable[..., PageHandle]) -> None:
    handle = make_page()
    page = handle.page
    page.goto(token_server.url + "/chat?token=" + mint(ttl=3))
    expect(page.locator("#conn-state")).to_have_attribute("data-state", "open")
    expect(page.locator("#conn-state")).to_have_attribute("data-state", "closed", timeout=6000)
    assert "expired" in (page.locator("#conn-state").get_attribute("title") or "")
    page.wait_for_timeout(2000)  # and it does not come back with the same token
    expect(page.locator("#conn-state")).to_have_attribute("data-state", "closed")
    assert opened(token_server) == 1


def test_refused_handshakes_reach_the_browser_as_4001_and_4003(token_server: ServerProcess,
                                                               make_page: Callable[..., PageHandle]) -> None:
    handle = make_page()
    page = handle.page
    page.goto(token_server.url + "/chat?token=" + mint())
    expect(page.locator("#conn-state")).to_have_attribute("data-state", "open")
    result = page.evaluate("""async ([good]) => {
      const { RealtimeClient } = await import("/static/js/client.js");
      const watch = (path, options) => new Promise((resolve) => {
        const states = [];
        const c = new RealtimeClient(path, { ...options, onState: (s, d) => {
          states.push(s);
          if (s === "closed") setTimeout(() => resolve({ code: d.code, fatal: !!d.fatal, states,
                                                          final: c.state }), 1500);
        } });
        c.connect();
      });
      return {
        badToken: await watch("/ws/chat", { token: "junk" }),
        wrongKey: await watch("/ws/sensors", { token: good, params: () => ({ key: "wrong" }) }),
      };
    }""", [mint()])
    for case in ("badToken", "wrongKey"):
        r = result[case]
        assert r["fatal"] and r["final"] == "closed", r
        assert r["states"].count("connecting") == 1, r  # one attempt, no reconnect loop
    assert result["badToken"]["code"] == 4001 and result["wrongKey"]["code"] == 4003
    assert not handle.page_errors
