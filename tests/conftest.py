"""Shared fixtures: a fresh app per test on a temp data dir, and JSON socket clients on it
(tests/clients.py)."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import pytest
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import server  # noqa: E402
from tests.clients import Client  # noqa: E402

# Test defaults: fast presence flushes, no pings to wait for.
TEST_OPTIONS: dict[str, Any] = {"presence_window": 0.01, "ping_interval": 0}


@pytest.fixture
def app_options() -> dict[str, Any]:
    """Override in a test module (or parametrize) to change options."""
    return {}


@pytest.fixture
def app(io_loop, tmp_path, app_options):
    opts = {**TEST_OPTIONS, "data_dir": str(tmp_path / "data"), **app_options}
    application = server.make_app(**opts)
    io_loop.run_sync(application.start)
    yield application
    io_loop.run_sync(lambda: application.shutdown(0.2))


@pytest.fixture
def http_server(request, io_loop, _unused_port, app):
    """pytest-tornado's server fixture, with the server the app really runs
    behind (handshake deadline, half-open cap, accept backoff)."""
    srv = server.make_server(app)
    srv.add_socket(_unused_port[0])
    yield srv
    srv.stop()
    io_loop.run_sync(srv.close_all_connections, timeout=5)


@pytest.fixture
def connect(http_server, http_port):
    """``await connect('/ws/chat', name='ann')`` -> Client (welcome not yet read).
    ``source_ip='127.0.0.2'``: connect from that loopback address (the server
    listens on 127.0.0.1; on Linux all of 127/8 is this machine)."""
    opened: list[Client] = []

    async def _connect(path: str, headers: dict[str, str] | None = None, source_ip: str | None = None,
                       **params: Any) -> Client:
        from urllib.parse import urlencode

        url = "ws://127.0.0.1:%d%s" % (http_port, path)
        if params:
            url += "?" + urlencode(params)
        conn = await websocket_connect(HTTPRequest(url, headers=headers or {}, network_interface=source_ip))
        client = Client(conn)
        opened.append(client)
        return client

    yield _connect
    for c in opened:
        c.close()


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def _skip_reason(report: Any) -> str:
    longrepr = report.longrepr
    return longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


def _fail_skips_in_ci(report: Any) -> None:
    """In CI every test must run: scripts/test.sh installs what each needs, so
    a skip there means a missing tool, and it fails instead of passing quietly."""
    if report.skipped and in_ci() and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = "skipped under CI=%s, where every test must run: %s" % (
            os.environ["CI"], _skip_reason(report))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_skips_in_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield  # a module-level importorskip or skip(allow_module_level=True)
    _fail_skips_in_ci(outcome.get_result())


def pytest_collection_modifyitems(config, items):
    """Browser tests run last: Playwright's sync API keeps an event loop running
    in the main thread, which the asyncio-based tests can't share."""
    items.sort(key=lambda item: "/browser/" in str(item.fspath).replace("\\", "/"))


@pytest.fixture(autouse=True)
def no_unexpected_error_logs(request, caplog):
    """Fail a test whose server logged an error it did not expect (the way
    Tornado's own tests use ExpectLog).  Mark a test ``expect_error_log`` when
    the error is the point."""
    caplog.set_level(logging.WARNING)
    yield
    if request.node.get_closest_marker("expect_error_log"):
        return
    errors = [r for r in caplog.get_records("call") + caplog.get_records("teardown")
              if r.levelno >= logging.ERROR and r.name.startswith(("tornado", "realtime", "asyncio"))]
    assert not errors, "unexpected error log: " + "; ".join(r.getMessage()[:200] for r in errors[:3])
