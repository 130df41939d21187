"""Shared fixtures: a fresh app per test on a temp data dir, and a JSON socket client."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from typing import Any

import pytest
from tornado.httpclient import HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import server  # noqa: E402

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


class Client:
    """A test peer: JSON in, JSON out, with a skip-list for noise."""

    def __init__(self, conn: WebSocketClientConnection) -> None:
        self.conn = conn
        self.seen: list[dict[str, Any]] = []

    def send(self, obj: Any) -> None:
        self.conn.write_message(obj if isinstance(obj, (str, bytes)) else json.dumps(obj),
                                binary=isinstance(obj, bytes))

    async def recv(self, timeout: float = 3.0) -> dict[str, Any] | None:
        """The next message, or None when the connection closed."""
        raw = await asyncio.wait_for(self.conn.read_message(), timeout)
        if raw is None:
            return None
        msg = json.loads(raw)
        self.seen.append(msg)
        return msg

    async def expect(self, mtype: str, timeout: float = 3.0, skip: tuple[str, ...] = ("presence", "typing"),
                     ) -> dict[str, Any]:
        """The next message of ``mtype``, skipping ``skip`` types; anything else fails."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            msg = await self.recv(max(0.01, deadline - loop.time()))
            assert msg is not None, "connection closed (code %s) while waiting for %s" % (
                self.conn.close_code, mtype)
            if msg["type"] == mtype:
                return msg
            if msg["type"] not in skip:
                raise AssertionError("expected %s, got %r" % (mtype, msg))

    async def nothing(self, mtype: str | None = None, wait: float = 0.2,
                      skip: tuple[str, ...] = ("presence", "typing")) -> None:
        """Assert that no message (of ``mtype``, or of any non-skipped type) arrives."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while loop.time() < deadline:
            try:
                msg = await self.recv(deadline - loop.time())
            except asyncio.TimeoutError:
                return
            if msg is None:
                return
            if (mtype is None and msg["type"] not in skip) or msg["type"] == mtype:
                raise AssertionError("unexpected message %r" % msg)

    async def closed(self, timeout: float = 3.0) -> int | None:
        """Wait for the close; return the close code."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            raw = await asyncio.wait_for(self.conn.read_message(), max(0.01, deadline - loop.time()))
            if raw is None:
                return self.conn.close_code

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def connect(http_server, http_port):
    """``await connect('/ws/chat', name='ann')`` -> Client (welcome not yet read)."""
    opened: list[Client] = []

    async def _connect(path: str, headers: dict[str, str] | None = None, **params: Any) -> Client:
        from urllib.parse import urlencode

        url = "ws://127.0.0.1:%d%s" % (http_port, path)
        if params:
            url += "?" + urlencode(params)
        conn = await websocket_connect(HTTPRequest(url, headers=headers or {}))
        client = Client(conn)
        opened.append(client)
        return client

    yield _connect
    for c in opened:
        c.close()


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
