"""The frame writer (handlers/writer.py): direct sends, counting, draining, the fallback."""

from __future__ import annotations

import asyncio
import socket

import pytest
from tornado.iostream import IOStream, StreamClosedError

from handlers.base import _NO_ARGS, _NO_HEADERS
from handlers.writer import MessageWriter, StreamWriter
from tests.waiting import until


def pair(rcvbuf: int = 4096) -> tuple[IOStream, socket.socket]:
    a, b = socket.socketpair()
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, rcvbuf)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    b.setblocking(False)
    return IOStream(a), b


def drain(sock: socket.socket) -> bytes:
    got = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return got
        if not chunk:
            return got
        got += chunk


@pytest.mark.gen_test
async def test_small_writes_go_straight_to_the_kernel_and_leave_nothing_pending():
    stream, peer = pair()
    w = StreamWriter(stream)
    w.write_batch([b"one", b"two"])
    w.write(b"three")
    assert (w.sent, w.done, w.pending, w.busy()) == (0, 0, 0, False)
    assert drain(peer) == b"onetwothree"
    stream.close()


@pytest.mark.gen_test
async def test_a_peer_that_stops_reading_is_counted_then_drains_in_order():
    stream, peer = pair()
    w = StreamWriter(stream)
    chunks = [bytes([65 + i % 26]) * 50_000 for i in range(8)]
    for c in chunks:
        w.write(c)
    assert w.busy() and 0 < w.pending <= sum(len(c) for c in chunks)
    drained = asyncio.Event()
    w.on_drain = drained.set
    got = b""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while not drained.is_set():
        assert loop.time() < deadline
        got += drain(peer)
        await asyncio.sleep(0.002)
    got += drain(peer)
    assert got == b"".join(chunks)  # nothing lost, doubled or reordered
    assert w.pending == 0 and not w.busy() and w.on_drain is None
    stream.close()


@pytest.mark.gen_test
async def test_a_closed_stream_raises_and_a_failed_write_counts_as_done():
    stream, peer = pair()
    w = StreamWriter(stream)
    w.write(b"x" * 300_000)
    assert w.busy()
    peer.close()
    stream.close()
    await until(lambda: not w.busy())
    with pytest.raises(StreamClosedError):
        w.write(b"more")


class PublicOnlyStream:
    """A stream with only IOStream's public writing API, as a future Tornado
    might have: the writer must not reach for anything else."""

    __slots__ = ("futures", "data", "socket")

    def __init__(self) -> None:
        self.futures: list[asyncio.Future[None]] = []
        self.data = b""
        self.socket = None

    def write(self, data: bytes) -> asyncio.Future[None]:
        self.data += data
        fut = asyncio.get_running_loop().create_future()
        self.futures.append(fut)
        return fut

    def writing(self) -> bool:
        return any(not f.done() for f in self.futures)

    def closed(self) -> bool:
        return False


@pytest.mark.gen_test
async def test_counting_needs_only_the_public_stream_api():
    stream = PublicOnlyStream()
    w = StreamWriter(stream)  # type: ignore[arg-type]
    w.write(b"a" * 10)
    w.write(b"b" * 5)
    assert w.pending == 15
    stream.futures[0].set_result(None)
    await until(lambda: w.pending == 5)
    stream.futures[1].set_result(None)
    await until(lambda: w.pending == 0)
    assert stream.data == b"a" * 10 + b"b" * 5


class FakeProtocol:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, bool]] = []
        self.futures: list[asyncio.Future[None]] = []

    def write_message(self, data: bytes, binary: bool = False) -> asyncio.Future[None]:
        self.sent.append((data, binary))
        fut = asyncio.get_running_loop().create_future()
        self.futures.append(fut)
        return fut


class FakeHandler:
    def __init__(self) -> None:
        self.ws_connection = FakeProtocol()


@pytest.mark.gen_test
async def test_the_fallback_sends_whole_messages_and_counts_them_until_written():
    handler = FakeHandler()
    w = MessageWriter(handler, binary=True)
    assert not w.frames and not w.busy()
    w.write_batch([b"12345", b"678"])
    assert handler.ws_connection.sent == [(b"12345", True), (b"678", True)]
    assert w.pending == 8
    handler.ws_connection.futures[0].set_result(None)
    handler.ws_connection.futures[1].set_exception(StreamClosedError())  # closed: not an error here
    await until(lambda: w.pending == 0)


def test_shed_handshake_state_is_empty_and_refuses_changes():
    """One instance stands in for every connection's headers and arguments:
    it must be impossible for one connection to change what another sees."""
    assert len(_NO_HEADERS) == 0 and _NO_HEADERS.get("Host") is None
    for change in (lambda: _NO_HEADERS.add("X", "1"), lambda: _NO_HEADERS.__setitem__("X", "1"),
                   lambda: _NO_HEADERS.parse_line("X: 1"), lambda: _NO_HEADERS.update({"X": "1"})):
        with pytest.raises(TypeError):
            change()
    assert len(_NO_HEADERS) == 0
    with pytest.raises(TypeError):
        _NO_ARGS["name"] = [b"x"]  # type: ignore[index]
    assert dict(_NO_ARGS) == {}


def test_our_protocol_fits_the_installed_tornado():
    """Else every connection silently falls back to Tornado's protocol (and
    loses the conformance fixes and compression once per message)."""
    from handlers.websocket import TORNADO_FITS

    assert TORNADO_FITS
