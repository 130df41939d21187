"""A small asyncio TCP proxy that treats connections the way bad networks do.

Between clients and a server on loopback, each accepted connection may be

* **refused**: closed at once, before the server is even asked;
* **delayed**: every chunk waits a random time before it is passed on (in
  order: a delay never reorders bytes within one direction);
* **stalled**: for a while nothing is passed on in either direction (a dead
  Wi-Fi link; the server's pings and the client's timeouts have to notice);
* **cut**: after a random lifetime both sides are closed abruptly, possibly in
  the middle of a frame, with whatever was in flight lost.

Bytes are never altered or dropped from the middle of a stream: TCP does not do
that, and what is tested is what a WebSocket server and its clients do when
connections die, not frame corruption (the frame fuzz does that).

``calm()`` stops the mischief (for the end of a test, when everyone must be able
to catch up), ``cut_all()`` cuts every connection now.  Randomness comes from
one seeded ``random.Random``, so a failing run can be replayed with its seed.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Mischief:
    refuse: float = 0.05  # chance a new connection is closed at once
    cut_after: float = 4.0  # mean lifetime (s) of a connection before it is cut (exponential); 0 = never
    delay: float = 0.3  # chance a connection's chunks are delayed ...
    max_delay: float = 0.08  # ... by up to this many seconds each
    stall: float = 0.1  # chance a connection stalls once ...
    max_stall: float = 1.5  # ... for up to this many seconds


@dataclass
class ProxyStats:
    accepted: int = 0
    refused: int = 0
    cut: int = 0
    stalled: int = 0
    delayed: int = 0
    upstream_down: int = 0
    bytes: int = 0
    open: set[Any] = field(default_factory=set)


class ChaosProxy:
    def __init__(self, target_port: int, rng: random.Random, mischief: Mischief | None = None,
                 host: str = "127.0.0.1") -> None:
        self.target = (host, target_port)
        self.host = host
        self.rng = rng
        self.mischief = mischief or Mischief()
        self.calm_now = False
        self.stats = ProxyStats()
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> "ChaosProxy":
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut_all()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def calm(self) -> None:
        """No more refusals, delays, stalls or cuts, from now on (connections already
        being delayed or stalled finish that)."""
        self.calm_now = True

    def cut_all(self) -> None:
        for conn in list(self.stats.open):
            conn.cut()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        m, rng = self.mischief, self.rng
        self.stats.accepted += 1
        if not self.calm_now and rng.random() < m.refuse:
            self.stats.refused += 1
            _abort(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            self.stats.upstream_down += 1  # the server is down (killed, restarting)
            _abort(writer)
            return
        conn = _Link(self, writer, up_writer)
        if not self.calm_now:
            if m.delay and rng.random() < m.delay:
                conn.max_delay = rng.uniform(0, m.max_delay)
                self.stats.delayed += 1
            loop = asyncio.get_running_loop()
            if m.cut_after:
                conn.cut_timer = loop.call_later(rng.expovariate(1 / m.cut_after), conn.timed_cut)
            if m.stall and rng.random() < m.stall:
                conn.stall_timer = loop.call_later(rng.uniform(0.1, 3.0), conn.stall, rng.uniform(0.2, m.max_stall))
        self.stats.open.add(conn)
        self._spawn(conn.pump(reader, up_writer))
        self._spawn(conn.pump(up_reader, writer))


class _Link:
    """One proxied connection: two pumps and the mischief planned for it."""

    def __init__(self, proxy: ChaosProxy, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.max_delay = 0.0
        self.cut_timer: asyncio.TimerHandle | None = None
        self.stall_timer: asyncio.TimerHandle | None = None
        self.stalled_until = 0.0
        self.closed = False

    def stall(self, seconds: float) -> None:
        if not self.closed and not self.proxy.calm_now:
            self.proxy.stats.stalled += 1
            self.stalled_until = asyncio.get_running_loop().time() + seconds

    def timed_cut(self) -> None:
        if not self.proxy.calm_now:
            self.cut()

    def cut(self) -> None:
        if self.closed:
            return
        self.proxy.stats.cut += 1
        self.close(abort=True)

    def close(self, abort: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        for timer in (self.cut_timer, self.stall_timer):
            if timer is not None:
                timer.cancel()
        self.proxy.stats.open.discard(self)
        for w in (self.client, self.upstream):
            if abort:
                _abort(w)
            else:
                try:
                    w.close()
                except (OSError, RuntimeError):
                    pass

    async def pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        rng = self.proxy.rng
        try:
            while not self.closed:
                data = await reader.read(65536)
                if not data:
                    break
                wait = self.stalled_until - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if self.max_delay and not self.proxy.calm_now:
                    await asyncio.sleep(rng.uniform(0, self.max_delay))
                if self.closed:
                    break
                writer.write(data)
                self.proxy.stats.bytes += len(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError, RuntimeError):
            pass
        finally:
            # One side ended: end the other (a half-closed WebSocket is no use to anyone).
            self.close()


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a reset, not a FIN: what a cut link or a crashed peer looks like."""
    sock = writer.get_extra_info("socket")
    try:
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
    except (OSError, RuntimeError):
        pass
