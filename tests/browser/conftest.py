"""Fixtures for browser tests: a real server process and a real Chromium.

* ``server_process``: ``python server.py`` on a free loopback port with its own
  data_dir, started from the repo root; ``.stop()``, ``.start()``, ``.restart()``
  keep the same port and data_dir (for reconnect tests).
* ``server``: its base URL, e.g. ``http://127.0.0.1:54321``.
* ``browser``: Chromium from /usr/bin/chromium through Playwright's sync API.
  Without that binary the tests are skipped, unless the ``CI`` environment
  variable is set: then they fail, so CI can't go green by skipping them.
* ``make_page``: a fresh browser context (a separate person: own cookies and
  localStorage) and page, recording page errors, console errors and dialogs.
"""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.servers import free_port

REPO = Path(__file__).resolve().parents[2]
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


_UNVERIFIED = ssl._create_unverified_context()  # a test's own self-signed certificate (https:// servers)


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail("browser tests cannot run in CI: " + reason, pytrace=False)
    pytest.skip(reason)


class ServerProcess:
    """``server.py`` as a child process on a fixed port and data_dir."""

    def __init__(self, port: int, data_dir: Path, log_path: Path, args: tuple[str, ...] = (),
                 scheme: str = "http") -> None:
        self.port = port
        self.data_dir = data_dir
        self.log_path = log_path
        self.args = args  # more server.py options
        self.url = "%s://127.0.0.1:%d" % (scheme, port)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> None:
        assert self.proc is None, "already running"
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the fd
            self.proc = subprocess.Popen(
                [sys.executable, "server.py", "--port=%d" % self.port, "--address=127.0.0.1",
                 "--data_dir=%s" % self.data_dir, "--logging=warning", *self.args],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise RuntimeError("server exited with %s:\n%s" % (code, self.log_tail()))
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1, context=_UNVERIFIED) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("server did not answer /healthz within %.0fs:\n%s" % (timeout, self.log_tail()))

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (graceful: sockets close with 1001), then SIGKILL if it lingers."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(lines[-n:])


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[ServerProcess]:
    data_dir = tmp_path / "data"
    srv = ServerProcess(free_port(), data_dir, tmp_path / "server.log")
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
        _unavailable("Chromium not found at %s (set CHROMIUM_PATH)" % CHROMIUM)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed")
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
