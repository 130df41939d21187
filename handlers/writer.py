"""The frame writer: what each connection sends, batched and counted.

A message is encoded (and framed) once, then handed to every recipient; each
connection queues what it was handed during one event-loop iteration, and the
:class:`Flusher` writes every queue once at the end of that iteration, so many
messages to one client cost one write.

A writer counts the bytes it handed to the stream that the kernel has not
taken yet (``sent - done``); with the queue, that is a connection's unflushed
bytes, the number the slow-consumer bound compares with ``max_write_buffer``.
It is counted here from the futures ``IOStream.write`` returns (they resolve in
order, each once everything up to its end is written), so nothing depends on
Tornado's private attributes.  The only names used are public: ``IOStream.write``,
``writing()``, ``closed()`` and ``socket``, and ``write_message`` in the
fallback.

Two writers:

* :class:`StreamWriter` writes finished WebSocket frames to the stream.  On
  plain TCP, while nothing is queued in the stream (``writing()`` is false and
  every earlier write is done), it hands the bytes to the kernel itself with
  one ``send()``; only a remainder goes through ``IOStream.write``.
* :class:`MessageWriter`, the fallback (``--fast_path=false``, or a connection
  that Tornado's own protocol serves), sends whole messages with
  ``write_message``: Tornado frames, and compresses per connection.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import TYPE_CHECKING, Any, Callable

from tornado.iostream import IOStream

if TYPE_CHECKING:
    from handlers.base import BaseSocketHandler

log = logging.getLogger("realtime.socket")


class Flusher:
    """Writes each connection's queued frames once per loop iteration.

    Many messages to one connection within an iteration become one write (one
    syscall) instead of one each.  One per application (``ctx.flusher``).
    """

    def __init__(self) -> None:
        self._dirty: list["BaseSocketHandler"] = []
        self._scheduled = False

    def mark(self, conn: "BaseSocketHandler") -> None:
        self._dirty.append(conn)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            try:
                conn._flush()
            except Exception:
                log.exception("flush failed")
                conn.rt.outq = None
                conn.rt.outq_bytes = 0


class _Counted:
    """``sent``: every byte handed to a write that returned a future; ``done``:
    the end of the latest one whose future resolved (they resolve in order)."""

    __slots__ = ("sent", "done", "on_drain")

    def __init__(self) -> None:
        self.sent = 0
        self.done = 0
        self.on_drain: Callable[[], None] | None = None

    @property
    def pending(self) -> int:
        """Bytes handed to the stream that the kernel has not taken yet."""
        return self.sent - self.done

    def _written(self, end: int, fut: "asyncio.Future[None]") -> None:
        # A failed write (the stream closed) leaves nothing to wait for either.
        if not fut.cancelled():
            fut.exception()  # retrieved: a closed connection is not an error here
        if end > self.done:
            self.done = end
        if self.sent == self.done and self.on_drain is not None:
            callback, self.on_drain = self.on_drain, None
            callback()


class StreamWriter(_Counted):
    """Finished frames to one stream, with the bytes not yet written counted.

    Bytes that went straight to the socket count in neither ``sent`` nor
    ``done``: the kernel already took them.
    """

    __slots__ = ("stream", "sock")

    frames = True  # the queue holds finished frames

    def __init__(self, stream: IOStream) -> None:
        super().__init__()
        self.stream = stream
        # Plain TCP only: a TLS stream must encrypt through its SSL object.
        self.sock: Any = stream.socket if type(stream) is IOStream else None

    def busy(self) -> bool:
        """An earlier write is still in the stream's buffer."""
        return self.sent != self.done

    def write(self, data: bytes) -> None:
        """Write ``data`` (whole frames); raises ``StreamClosedError`` when closed."""
        sock = self.sock
        if sock is not None and self.sent == self.done and not self.stream.writing() and not self.stream.closed():
            # Nothing queued ahead of these bytes: give them to the kernel now
            # (what IOStream.write would do, minus its future and buffer).
            try:
                n = sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                n = 0  # the stream's own write sees the error and closes itself
            if n == len(data):
                return
            if n:
                data = data[n:]
        fut = self.stream.write(data)
        self.sent += len(data)
        fut.add_done_callback(functools.partial(self._written, self.sent))

    def write_batch(self, items: list[bytes]) -> None:
        self.write(items[0] if len(items) == 1 else b"".join(items))


class MessageWriter(_Counted):
    """The fallback: whole messages through ``write_message``.

    Counts uncompressed message bytes (an upper bound when Tornado compresses)."""

    __slots__ = ("handler", "binary")

    frames = False  # the queue holds message payloads, not frames

    def __init__(self, handler: Any, binary: bool = False) -> None:
        super().__init__()
        self.handler = handler
        self.binary = binary

    def busy(self) -> bool:
        return False  # write_message queues in order; nothing to park for

    def write_batch(self, items: list[bytes]) -> None:
        for data in items:
            self.write_one(data, self.binary)

    def write_one(self, data: bytes, binary: bool) -> None:
        fut = self.handler.ws_connection.write_message(data, binary=binary)
        self.sent += len(data)
        fut.add_done_callback(functools.partial(self._written, self.sent))
