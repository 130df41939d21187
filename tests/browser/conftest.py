"""Fixtures for browser tests: a real server process and a real Chromium.

* ``server_process``: ``python server.py`` on a free loopback port with its own
  data_dir (tests/servers.py); ``.stop()``, ``.start()``, ``.restart()`` keep
  the same port and data_dir (for reconnect tests).
* ``server``: its base URL, e.g. ``http://127.0.0.1:54321``.
* ``browser``: Chromium from /usr/bin/chromium through Playwright's sync API.
  Without that binary the tests are skipped, unless the ``CI`` environment
  variable is set: then the skip is a failure (tests/conftest.py), so CI can't
  go green by skipping them.
* ``make_page``: a fresh browser context (a separate person: own cookies and
  localStorage) and page, recording page errors, console errors and dialogs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.servers import ServerProcess, free_port

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[ServerProcess]:
    data_dir = tmp_path / "data"
    srv = ServerProcess(free_port(), data_dir, log_path=tmp_path / "server.log")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def server(server_process: ServerProcess) -> str:
    return server_process.url


@pytest.fixture
def restart_server(server_process: ServerProcess) -> Callable[[], None]:
    return server_process.restart


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        pytest.skip("Chromium not found at %s (set CHROMIUM_PATH)" % CHROMIUM)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@dataclass
class PageHandle:
    """A page plus what went wrong in it."""

    page: Any
    page_errors: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def csp_violations(self) -> list[str]:
        return [e for e in self.console_errors if "Content Security Policy" in e]


@pytest.fixture
def make_page(browser: Any) -> Iterator[Callable[..., PageHandle]]:
    contexts: list[Any] = []

    def make(**context_args: Any) -> PageHandle:
        context_args.setdefault("viewport", {"width": 1280, "height": 800})
        ctx = browser.new_context(**context_args)
        ctx.set_default_timeout(10_000)
        contexts.append(ctx)
        page = ctx.new_page()
        handle = PageHandle(page)
        page.on("pageerror", lambda exc: handle.page_errors.append(str(exc)))
        page.on("console", lambda m: handle.console_errors.append(m.text) if m.type == "error" else None)

        def on_dialog(dialog: Any) -> None:
            handle.dialogs.append("%s: %s" % (dialog.type, dialog.message))
            dialog.dismiss()

        page.on("dialog", on_dialog)
        return handle

    yield make
    for ctx in contexts:
        ctx.close()
