"""The test peers: one JSON WebSocket client and one pair of HTTP helpers for every test.

* :class:`Client` speaks the JSON protocol over Tornado's client (the in-process
  tests' ``connect`` fixture, tests/conftest.py) or over the ``websockets``
  library (:meth:`Client.open`: a client nobody here wrote, for tests against
  server processes).  Same methods either way: ``send``, ``recv``, ``expect``,
  ``closed``, and ``nothing_before_pong`` for "this did not arrive".
* :func:`fetch` (async, on the test's event loop) and :func:`request` (blocking,
  for process and browser tests) make one HTTP call and return a :class:`Reply`
  with the JSON body decoded; neither raises for an HTTP error status.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import urllib.error
import urllib.request
from typing import Any, Callable, Mapping, NamedTuple

from tornado.httpclient import AsyncHTTPClient, HTTPRequest

_REFS = itertools.count(1)
NOISE = ("presence", "typing")


class _WebsocketsConnection:
    """A ``websockets`` connection with the four calls :class:`Client` uses of
    Tornado's ``WebSocketClientConnection``.  Sends are chained, so they go out
    in the order ``send`` was called even when nobody awaits them."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self._last_send: asyncio.Future[None] | None = None

    @property
    def close_code(self) -> int | None:
        return self.ws.close_code

    def write_message(self, data: str | bytes, binary: bool = False) -> asyncio.Future[None]:
        previous = self._last_send

        async def send() -> None:
            if previous is not None:
                await previous
            await self.ws.send(data)

        self._last_send = asyncio.ensure_future(send())
        return self._last_send

    async def read_message(self) -> str | bytes | None:
        import websockets

        try:
            return await self.ws.recv()
        except websockets.ConnectionClosed:
            return None

    def close(self, code: int = 1000, reason: str = "") -> None:
        asyncio.ensure_future(self.ws.close(code, reason))


class Client:
    """A test peer: JSON in, JSON out, with a skip-list for noise.

    ``timeout`` is how long a read waits by default.  Messages of a type in
    ``hold`` that arrive while ``expect`` waits for another type are kept for a
    later ``expect`` of their type (e.g. chat messages while waiting for acks)."""

    def __init__(self, conn: Any, timeout: float = 3.0, hold: tuple[str, ...] = ()) -> None:
        self.conn = conn
        self.timeout = timeout
        self.hold = hold
        self.held: list[dict[str, Any]] = []
        self.seen: list[dict[str, Any]] = []
        self.welcome: dict[str, Any] = {}
        self.joined: dict[str, Any] = {}

    @classmethod
    async def open(cls, url: str, timeout: float = 3.0, hold: tuple[str, ...] = (), **kwargs: Any) -> "Client":
        """Connect with the ``websockets`` library (``kwargs`` go to ``websockets.connect``)."""
        import websockets

        return cls(_WebsocketsConnection(await websockets.connect(url, **kwargs)), timeout, hold)

    def send(self, obj: Any) -> Any:
        """Queue one message (a dict is sent as JSON); awaiting the result waits for the write."""
        return self.conn.write_message(obj if isinstance(obj, (str, bytes)) else json.dumps(obj),
                                       binary=isinstance(obj, bytes))

    async def recv(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next message, or None when the connection closed."""
        raw = await asyncio.wait_for(self.conn.read_message(), self.timeout if timeout is None else timeout)
        if raw is None:
            return None
        msg = json.loads(raw)
        self.seen.append(msg)
        return msg

    async def expect(self, mtype: str, timeout: float | None = None, skip: tuple[str, ...] = NOISE,
                     where: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
        """The next message of ``mtype`` (for which ``where`` holds, if given),
        skipping ``skip`` types and the ``mtype`` messages ``where`` rejects;
        anything else fails."""
        for i, msg in enumerate(self.held):
            if msg["type"] == mtype and (where is None or where(msg)):
                return self.held.pop(i)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.timeout if timeout is None else timeout)
        while True:
            got = await self.recv(max(0.01, deadline - loop.time()))
            assert got is not None, "connection closed (code %s) while waiting for %s" % (
                self.conn.close_code, mtype)
            msg = got
            if msg["type"] == mtype and (where is None or where(msg)):
                return msg
            if msg["type"] in self.hold:
                self.held.append(msg)
            elif msg["type"] not in skip and msg["type"] != mtype:
                raise AssertionError("expected %s, got %r" % (mtype, msg))

    async def round_trip(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """Send an application ``ping`` and read up to its ``pong``; return what came before it.

        The server answers a ping in order with everything else it queues for
        this connection, so what this returns is everything queued for it
        before the server handled the ping."""
        ref = "sentinel-%d" % next(_REFS)
        self.send({"type": "ping", "ref": ref})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.timeout if timeout is None else timeout)
        before: list[dict[str, Any]] = []
        while True:
            msg = await self.recv(max(0.01, deadline - loop.time()))
            assert msg is not None, "connection closed (code %s) before the pong" % self.conn.close_code
            if msg["type"] == "pong" and msg.get("ref") == ref:
                return before
            before.append(msg)

    async def nothing_before_pong(self, mtype: str | None = None, skip: tuple[str, ...] = NOISE,
                                  after: tuple["Client", ...] = ()) -> list[dict[str, Any]]:
        """Assert that no message of ``mtype`` (of any type not in ``skip``, when
        ``mtype`` is None) reached this connection ahead of the answer to a ping
        sent now; return the skipped messages.

        What it proves: nothing the server did before it handled the ping sent
        one.  Each client in ``after`` first makes a round trip of its own, so
        what it sent earlier has been handled too (for a write, wait for its
        ``ack`` first: handling it means committing it).  It proves nothing
        about timers that fire later (throttles, coalescing windows): a test of
        those waits for the timer's own event instead."""
        for other in after:
            await other.round_trip()
        before = await self.round_trip()
        unwanted = [m for m in before if m["type"] == mtype or (mtype is None and m["type"] not in skip)]
        assert not unwanted, "unexpected message(s) before the pong: %r" % unwanted
        return before

    async def closed(self, timeout: float | None = None) -> int | None:
        """Wait for the close; return the close code."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.timeout if timeout is None else timeout)
        while True:
            raw = await asyncio.wait_for(self.conn.read_message(), max(0.01, deadline - loop.time()))
            if raw is None:
                return self.conn.close_code

    def close(self) -> None:
        self.conn.close()


# -- HTTP ------------------------------------------------------------------------


class Reply(NamedTuple):
    """An HTTP answer: status, the body decoded from JSON (None when empty, the
    text when it is not JSON) and the headers."""

    status: int
    body: Any
    headers: Any  # Tornado's HTTPHeaders or the email.message.Message urllib gives: both case-blind


def base_url(server: int | str) -> str:
    """``http://127.0.0.1:<port>`` for a port; a URL as it is."""
    return "http://127.0.0.1:%d" % server if isinstance(server, int) else server.rstrip("/")


def _encode(body: Any) -> bytes | None:
    if body is None or isinstance(body, bytes):
        return body
    return (body if isinstance(body, str) else json.dumps(body)).encode("utf-8")


def _decode(data: bytes) -> Any:
    if not data:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return data.decode("utf-8", "replace")


async def fetch(server: int | str, path: str, method: str = "GET", body: Any = None,
                headers: Mapping[str, str] | None = None, timeout: float = 10.0) -> Reply:
    """One HTTP call from the test's event loop (Tornado's client); ``body``:
    JSON-encoded unless already str or bytes."""
    data = _encode(body)
    if data is None and method in ("POST", "PUT", "PATCH"):
        data = b""
    resp = await AsyncHTTPClient().fetch(
        HTTPRequest(base_url(server) + path, method=method, body=data, headers=dict(headers or {}),
                    request_timeout=timeout, allow_nonstandard_methods=True),
        raise_error=False)
    assert resp.code != 599, "no HTTP answer from %s%s: %s" % (base_url(server), path, resp.error)
    return Reply(resp.code, _decode(resp.body or b""), resp.headers)


def request(server: int | str, path: str, method: str = "GET", body: Any = None,
            headers: Mapping[str, str] | None = None, timeout: float = 5.0) -> Reply:
    """``fetch`` for code off the event loop (urllib): server processes, browser tests."""
    req = urllib.request.Request(base_url(server) + path, data=_encode(body), method=method,
                                 headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return Reply(r.status, _decode(r.read()), r.headers)
    except urllib.error.HTTPError as e:
        return Reply(e.code, _decode(e.read()), e.headers)
