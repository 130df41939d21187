"""A lean Redis connection for the hot write path: pipelines packed by hand.

redis-py's asyncio pipeline costs a few hundred microseconds of Python per
round trip (a Pipeline object, a pooled connection taken and given back under
a lock, a retry wrapper, a timeout per read, one parse call per reply).  A
chat ``say`` in cluster mode is one script call, so that machinery was most of
a node's cost per message beyond a single process's.  :class:`RespPipe` is one
TCP connection that writes a batch of commands as RESP in one ``write`` and
reads the replies with hiredis (a dependency of ours already) in the order
they were sent.

It speaks plain ``redis://`` URLs (password, user, database; not TLS, not unix
sockets: :func:`supports` says which).  Error replies come back as
:class:`redis.exceptions.ResponseError` (``NoScriptError`` for NOSCRIPT) in
their command's place, as redis-py's ``execute(raise_on_error=False)`` gives
them; an unreachable Redis, a lost connection or no answer within ``timeout``
raises :class:`redis.exceptions.ConnectionError` for every command in flight,
and the next call connects again.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError


def supports(url: str) -> bool:
    """Whether :class:`RespPipe` can reach Redis at ``url``."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a bad port
    except ValueError:
        return False
    return parts.scheme == "redis" and not parts.query


def pack(command: list[Any] | tuple[Any, ...]) -> bytes:
    """One command as a RESP array of bulk strings (str as UTF-8, numbers as text)."""
    out = [b"*%d\r\n" % len(command)]
    for arg in command:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode("utf-8")
        elif isinstance(arg, int):
            data = b"%d" % arg
        elif isinstance(arg, float):
            data = repr(arg).encode("ascii")
        else:
            raise TypeError("cannot send %r to Redis" % (arg,))
        out.append(b"$%d\r\n" % len(data))
        out.append(data)
        out.append(b"\r\n")
    return b"".join(out)


def _reply_error(message: str) -> ResponseError:
    if message.startswith("NOSCRIPT"):
        return NoScriptError(message)
    return ResponseError(message)


class _Batch:
    __slots__ = ("count", "replies", "future")

    def __init__(self, count: int, future: asyncio.Future[list[Any]]) -> None:
        self.count = count
        self.replies: list[Any] = []
        self.future = future


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader(replyError=ResponseError)
        self.waiting: deque[_Batch] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        reader, waiting = self.reader, self.waiting
        try:
            reader.feed(data)
            while True:
                reply = reader.gets()
                if reply is False:
                    return
                if not waiting:  # nothing asked for this: the stream is out of step
                    raise hiredis.ProtocolError("an unexpected reply")
                batch = waiting[0]
                if isinstance(reply, ResponseError):
                    reply = _reply_error(str(reply))
                batch.replies.append(reply)
                if len(batch.replies) == batch.count:
                    waiting.popleft()
                    if not batch.future.done():
                        batch.future.set_result(batch.replies)
        except hiredis.ProtocolError as e:
            self.fail(RedisConnectionError("Redis sent what is not RESP: %s" % e))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail_waiting(RedisConnectionError("Connection closed by server: %s" % (exc or "EOF")))

    def fail(self, error: Exception) -> None:
        """Give up on this connection: everything in flight fails with ``error``."""
        self.lost = True
        self._fail_waiting(error)
        if self.transport is not None:
            self.transport.abort()

    def _fail_waiting(self, error: Exception) -> None:
        while self.waiting:
            batch = self.waiting.popleft()
            if not batch.future.done():
                batch.future.set_exception(error)


class RespPipe:
    """One connection to Redis at ``url`` for pipelined commands (see the module docstring)."""

    def __init__(self, url: str, *, timeout: float = 5.0, connect_timeout: float = 3.0) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 6379
        self.password = unquote(parts.password) if parts.password else None
        self.username = unquote(parts.username) if parts.username else None
        path = parts.path.strip("/")
        self.db = int(path) if path else 0
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._closed = False

    async def execute(self, commands: list[list[Any]]) -> list[Any]:
        """Send ``commands`` in one write; their replies, in order (an error
        reply is a ResponseError in its place).  Raises RedisConnectionError."""
        if not commands:
            return []
        proto = self._proto
        if proto is None or proto.lost:
            proto = await self._connect()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        proto.waiting.append(_Batch(len(commands), future))
        assert proto.transport is not None
        proto.transport.write(b"".join([pack(c) for c in commands]))
        timer = loop.call_later(self.timeout, self._timed_out, proto, future)
        try:
            return await future
        finally:
            timer.cancel()

    def _timed_out(self, proto: _Protocol, future: asyncio.Future[list[Any]]) -> None:
        if not future.done():
            # Replies still owed on this connection would come out of step: drop it.
            proto.fail(RedisConnectionError("Redis did not answer within %.1f s" % self.timeout))

    async def _connect(self) -> _Protocol:
        if self._closed:
            raise RedisConnectionError("closed")
        if self._connecting is not None:
            return await asyncio.shield(self._connecting)
        loop = asyncio.get_running_loop()
        self._connecting = loop.create_future()
        connecting = self._connecting
        try:
            _, proto = await asyncio.wait_for(loop.create_connection(_Protocol, self.host, self.port),
                                              self.connect_timeout)
            hello: list[list[Any]] = []
            if self.password is not None:
                hello.append(["AUTH", self.username, self.password] if self.username else ["AUTH", self.password])
            if self.db:
                hello.append(["SELECT", self.db])
            self._proto = proto
            if hello:
                replies = await self.execute(hello)
                failed = next((r for r in replies if isinstance(r, Exception)), None)
                if failed is not None:
                    proto.fail(RedisConnectionError(str(failed)))
                    raise RedisConnectionError("Redis refused the connection: %s" % failed)
        except (OSError, asyncio.TimeoutError) as e:
            error = RedisConnectionError("cannot reach Redis at %s:%d: %s" % (self.host, self.port, e or "timeout"))
            connecting.set_exception(error)
            connecting.exception()  # retrieved: a waiter may not exist
            raise error from None
        except BaseException as e:
            connecting.set_exception(e if isinstance(e, Exception) else RedisConnectionError("cancelled"))
            connecting.exception()
            raise
        finally:
            self._connecting = None
        connecting.set_result(proto)
        return proto

    async def close(self) -> None:
        self._closed = True
        proto, self._proto = self._proto, None
        if proto is not None and proto.transport is not None:
            proto.transport.close()
