"""Our RFC 6455 server endpoint, on Tornado's HTTP handshake and stream.

:class:`WireProtocol` is what ``BaseSocketHandler.get_websocket_protocol``
returns: Tornado's ``WebSocketHandler.get`` still checks the upgrade request and
the origin, then hands the connection to it.  From there on the frames are
ours: :class:`realtime.wire.FrameReader` checks what the client sends (masking,
opcodes, close codes, UTF-8, sizes: each fault fails the connection with the
close code RFC 6455 names for it, instead of dropping TCP), and every frame we
send, control frames included, goes through one :class:`handlers.writer.StreamWriter`,
so a connection's unflushed bytes are always known.

permessage-deflate is negotiated here (``realtime.wire.negotiate_deflate``) with
no context takeover either way: a message is compressed once for everyone who
receives it, and no zlib state is kept per connection.

It relies only on Tornado's public surface: the abstract ``WebSocketProtocol``,
the handler's ``detach()``, ``open_args``, ``select_subprotocol`` and the
``IOStream`` read and write calls.  ``--fast_path=false`` serves connections
with Tornado's own ``WebSocketProtocol13`` instead.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from tornado import httputil
from tornado.iostream import StreamClosedError
from tornado.websocket import WebSocketClosedError, WebSocketProtocol

from handlers.writer import StreamWriter
from realtime.protocol import Formats, encode
from realtime.wire import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameReader,
    WireError,
    accept_value,
    close_payload,
    frame,
    negotiate_deflate,
)

READ_CHUNK = 65536
CLOSE_TIMEOUT = 5.0  # seconds a client has to answer our close frame
PONG_BACKLOG = 65536  # past this many unflushed bytes, pings go unanswered (RFC 6455 5.5.3 allows it)


class WireParams:
    """What a connection needs from its application, fixed at the handshake."""

    __slots__ = ("max_message_size", "ping_interval", "ping_timeout", "compression", "formats")

    def __init__(self, max_message_size: int, ping_interval: float | None = 0.0, ping_timeout: float | None = 0.0,
                 compression: bool = False, formats: Formats | None = None) -> None:
        self.max_message_size = max_message_size
        self.ping_interval = ping_interval or 0.0
        self.ping_timeout = min(ping_timeout or self.ping_interval, self.ping_interval)
        self.compression = compression
        self.formats = formats if formats is not None else Formats()


class WireProtocol(WebSocketProtocol):
    """One server-side WebSocket connection (see the module docstring)."""

    def __init__(self, handler: Any, params: WireParams) -> None:
        super().__init__(handler)
        self.params = params
        self.reader: FrameReader | None = None
        self.writer: StreamWriter | None = None
        self.deflate_wbits: int | None = None  # negotiated permessage-deflate: our window bits
        self._subprotocol: str | None = None
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self._ping_timer: asyncio.TimerHandle | None = None
        self._got_pong = False

    # -- the handshake -----------------------------------------------------

    @property
    def selected_subprotocol(self) -> str | None:
        return self._subprotocol

    async def accept_connection(self, handler: Any) -> None:
        headers = handler.request.headers
        key = headers.get("Sec-WebSocket-Key")
        if not key or not headers.get("Host"):
            handler.set_status(400)
            handler.finish("Missing/Invalid WebSocket headers")
            return
        offered = [s.strip() for s in headers.get("Sec-WebSocket-Protocol", "").split(",") if s.strip()]
        chosen = handler.select_subprotocol(offered)
        if chosen:
            assert chosen in offered
            handler.set_header("Sec-WebSocket-Protocol", chosen)
            self._subprotocol = chosen
        if self.params.compression:
            agreed = negotiate_deflate(headers.get("Sec-WebSocket-Extensions", ""))
            if agreed is not None:
                handler.set_header("Sec-WebSocket-Extensions", agreed[0])
                self.deflate_wbits = agreed[1]
        handler.clear_header("Content-Type")
        handler.set_status(101)
        handler.set_header("Upgrade", "websocket")
        handler.set_header("Connection", "Upgrade")
        handler.set_header("Sec-WebSocket-Accept", accept_value(key))
        handler.finish()
        stream = self.stream = handler.detach()
        self.reader = FrameReader(self.params.max_message_size, deflate=self.deflate_wbits is not None)
        self.writer = StreamWriter(stream)
        self.start_pinging()
        try:
            try:
                result = handler.open(*handler.open_args, **handler.open_kwargs)
                if result is not None:
                    await result
            except Exception:
                handler.log_exception(*sys.exc_info())
                self._abort()
                return
            await self._receive_frame_loop()
        finally:
            handler.on_ws_connection_close(self.close_code, self.close_reason)

    def _process_server_headers(self, key: str | bytes, headers: httputil.HTTPHeaders) -> None:
        raise NotImplementedError("server side only")

    # -- reading -----------------------------------------------------------

    async def _receive_frame_loop(self) -> None:
        stream = self.stream
        reader = self.reader
        assert stream is not None and reader is not None
        handler = self.handler
        try:
            while not self.client_terminated:
                data = await stream.read_bytes(READ_CHUNK, partial=True)
                events, error = reader.feed(data)
                for op, payload in events:
                    if op == OP_TEXT or op == OP_BINARY:
                        if self.server_terminated:
                            continue  # closing: the handler is done with messages
                        result = self._call(handler.on_message, payload)
                        if result is not None:
                            await self._wait(result)
                    elif op == OP_CLOSE:
                        self._on_close_frame(*payload)
                        break
                    elif op == OP_PING:
                        self._pong(payload)
                        self._call(handler.on_ping, payload)
                    elif op == OP_PONG:
                        self._got_pong = True
                        self._call(handler.on_pong, payload)
                if error is not None and not self.client_terminated:
                    self._fail(error)
        except StreamClosedError:
            self._abort()

    def _call(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception:
            self.handler.log_exception(*sys.exc_info())
            self._abort()
            return None

    async def _wait(self, result: Any) -> None:
        try:
            await result
        except Exception:
            self.handler.log_exception(*sys.exc_info())
            self._abort()

    def _on_close_frame(self, code: int | None, reason: str) -> None:
        """The client's close: answer with the same code (section 5.5.1), then
        drop the TCP connection (the server closes first, section 7.1.1)."""
        self.client_terminated = True
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
        if self.server_terminated:
            self._close_tcp()
            return
        self._close_after_queued(code)

    def _fail(self, error: WireError) -> None:
        """Fail the connection (section 7.1.7): our close frame with the code,
        then wait for the client's (the reader only looks for that now)."""
        if self.close_code is None:
            self.close_code = error.code
            self.close_reason = error.reason
        if error.after_close:
            self.client_terminated = True
        self._close_after_queued(error.code, error.reason)

    def _close_after_queued(self, code: int | None, reason: str | None = None) -> None:
        """Close through the handler, so the replies it queued for frames that
        came before this one go out first, then our close frame."""
        if getattr(self.handler, "ws_connection", None) is self:
            self.handler.close(code, reason)
        self.close(code, reason)  # a no-op if the handler just did it

    # -- writing -----------------------------------------------------------

    def _control(self, opcode: int, payload: bytes) -> None:
        writer = self.writer
        if writer is None or self.stream is None or self.stream.closed():
            return
        try:
            writer.write(frame(payload, opcode))
        except StreamClosedError:
            self._abort()

    def _pong(self, payload: bytes) -> None:
        if self.server_terminated or self.writer is None or self.writer.pending > PONG_BACKLOG:
            return
        self._control(OP_PONG, payload)

    def write_message(self, message: str | bytes | dict[str, Any], binary: bool = False) -> "asyncio.Future[None]":
        """One message, framed (and compressed if negotiated) for this connection
        alone; fan-out goes through ``Outgoing.frame_for`` instead."""
        if self.writer is None or self.is_closing():
            raise WebSocketClosedError()
        if isinstance(message, dict):
            message = encode(message)
        data = message.encode("utf-8") if isinstance(message, str) else message
        opcode = OP_BINARY if binary else OP_TEXT
        if self.deflate_wbits is not None:
            data = frame(self.params.formats.deflater(self.deflate_wbits).compress(data), opcode, rsv1=True)
        else:
            data = frame(data, opcode)
        try:
            self.writer.write(data)
        except StreamClosedError:
            raise WebSocketClosedError() from None
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    def write_ping(self, data: bytes) -> None:
        self._control(OP_PING, data)

    # -- keepalive ---------------------------------------------------------

    def start_pinging(self) -> None:
        if self.params.ping_interval > 0 and self._ping_timer is None:
            self._ping_timer = asyncio.get_running_loop().call_later(self.params.ping_interval, self._ping)

    def _ping(self) -> None:
        if self.is_closing():
            return
        self._got_pong = False
        self.write_ping(b"")
        loop = asyncio.get_running_loop()
        timeout = self.params.ping_timeout
        if timeout > 0:
            self._ping_timer = loop.call_later(timeout, self._check_pong)
        else:
            self._ping_timer = loop.call_later(self.params.ping_interval, self._ping)

    def _check_pong(self) -> None:
        if self.is_closing():
            return
        if not self._got_pong:
            self.close(1000, "ping timed out")
            return
        wait = max(0.0, self.params.ping_interval - self.params.ping_timeout)
        self._ping_timer = asyncio.get_running_loop().call_later(wait, self._ping)

    # -- closing -----------------------------------------------------------

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        """Send our close frame (once); drop TCP now if the client already sent
        its close, else after it does or after ``CLOSE_TIMEOUT``."""
        if not self.server_terminated:
            self.server_terminated = True
            if code is None and reason:
                code = 1000
            self._control(OP_CLOSE, close_payload(code, reason or ""))
            if self.reader is not None:
                self.reader.fail()  # from now on, only the client's close matters
        if self._ping_timer is not None:
            self._ping_timer.cancel()
            self._ping_timer = None
        stream = self.stream
        if stream is None:
            return
        if self.client_terminated:
            self._close_tcp()
        elif self._close_timer is None and not stream.closed():
            self._close_timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, self._abort)

    def _close_tcp(self) -> None:
        """Once our last bytes are written (a close frame may be behind others)."""
        stream = self.stream
        writer = self.writer
        if stream is None or stream.closed():
            return
        if writer is not None and writer.busy():
            writer.on_drain = stream.close
            if self._close_timer is None:
                self._close_timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, self._abort)
            return
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        stream.close()

    def _abort(self) -> None:
        """Drop the TCP connection now (Tornado calls this on a closed stream too)."""
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        self.client_terminated = self.server_terminated = True
        if self.stream is not None:
            self.stream.close()
        self.close()

    def is_closing(self) -> bool:
        stream = self.stream
        return stream is None or stream.closed() or self.client_terminated or self.server_terminated

    def set_nodelay(self, x: bool) -> None:
        if self.stream is not None:
            self.stream.set_nodelay(x)


def _tornado_fits() -> bool:
    """Does this Tornado have the public surface :class:`WireProtocol` stands on?

    If a future version adds an abstract method or drops one of these hooks,
    ``BaseSocketHandler`` serves connections with Tornado's own protocol
    instead (and tests/unit/test_writer.py fails, so the change is seen)."""
    from tornado.web import RequestHandler
    from tornado.websocket import WebSocketHandler

    return (not getattr(WireProtocol, "__abstractmethods__", None)
            and callable(getattr(RequestHandler, "detach", None))
            and callable(getattr(WebSocketHandler, "on_ws_connection_close", None))
            and callable(getattr(WebSocketHandler, "select_subprotocol", None)))


TORNADO_FITS = _tornado_fits()
