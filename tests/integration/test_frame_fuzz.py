"""Frame-level fuzz against a real server process, on every WebSocket endpoint: malformed
frames, bad UTF-8, oversized and fragmented control frames, invalid close codes, random
mutations of valid frames, handshakes trickled byte by byte.  Each connection ends with the
close code RFC 6455 names for its fault (or an answer), never a hang; the server never logs
a traceback, and its memory stays bounded (RSS measured before and after)."""

from __future__ import annotations

import asyncio
import base64
import os
import random
import struct
import time
from typing import Any

import psutil
import pytest

from tests.servers import free_port, start_server
from tests.unit.test_wire import client_frame

pytestmark = pytest.mark.slow

ENDPOINTS = ["/ws/chat", "/ws/sensors", "/ws/edit/fuzzdoc", "/ws/echo"]
MAX_MESSAGE = 65536


def handshake(path: str, port: int) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return ("GET %s?name=fuzz HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (path, port, key)).encode()


def close(code: int, reason: bytes = b"") -> bytes:
    return client_frame(struct.pack("!H", code) + reason, 0x8)


def bad_length(n: int) -> bytes:
    """A masked text frame header claiming ``n`` bytes (64-bit length), with a little payload."""
    return bytes([0x81, 0x80 | 127]) + struct.pack("!Q", n) + os.urandom(4) + b"abcd"


# (what is wrong, the bytes after the handshake, the close code RFC 6455 asks for)
CASES: list[tuple[str, bytes, int]] = [
    ("unmasked frame", client_frame(b'{"type":"ping"}', masked=False), 1002),
    ("RSV1 without deflate", client_frame(b'{"type":"ping"}', rsv=0x40), 1002),
    ("RSV2 and RSV3", client_frame(b'{"type":"ping"}', rsv=0x30), 1002),
    ("reserved data opcode 3", client_frame(b"x", 0x3), 1002),
    ("reserved control opcode 0xB", client_frame(b"x", 0xB), 1002),
    ("continuation with nothing to continue", client_frame(b"x", 0x0), 1002),
    ("a new text frame inside a fragmented one", client_frame(b"ab", fin=False) + client_frame(b"cd"), 1002),
    ("ping of 126 bytes", client_frame(b"p" * 126, 0x9), 1002),
    ("close of 200 bytes", client_frame(b"\x03\xe8" + b"r" * 198, 0x8), 1002),
    ("fragmented ping", client_frame(b"p", 0x9, fin=False), 1002),
    ("invalid UTF-8 text", client_frame(b'{"type":"\xff\xfe"}'), 1007),
    ("overlong UTF-8 encoding", client_frame(b"\xc0\xaf"), 1007),
    ("a surrogate in UTF-8", client_frame(b"\xed\xa0\x80"), 1007),
    ("UTF-8 split badly across fragments", client_frame(b"\xe2\x82", fin=False) + client_frame(b"x", 0x0), 1007),
    ("close code 999", close(999), 1002),
    ("close code 1005 (reserved)", close(1005), 1002),
    ("close code 1006 (reserved)", close(1006), 1002),
    ("close code 1015 (reserved)", close(1015), 1002),
    ("close code 2999", close(2999), 1002),
    ("close code 5000", close(5000), 1002),
    ("close with a one-byte payload", client_frame(b"\x03", 0x8), 1002),
    ("close reason that is not UTF-8", close(1000, b"\xff"), 1007),
    ("a frame claiming 2^63-1 bytes", bad_length(2**63 - 1), 1009),
    ("a length with the top bit set", bad_length(2**64 - 1), 1002),
    ("a message over the limit in fragments",
     client_frame(b"a" * 40000, fin=False) + client_frame(b"a" * 40000, 0x0), 1009),
]


async def open_raw(port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(handshake(path, port))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101"), head[:200]
    return reader, writer


async def close_code(reader: asyncio.StreamReader, timeout: float = 5.0) -> int | None:
    """Read server frames until its close frame: its code (None if TCP ended without one)."""
    async def run() -> int | None:
        while True:
            try:
                b0, b1 = await reader.readexactly(2)
            except asyncio.IncompleteReadError:
                return None
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", await reader.readexactly(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", await reader.readexactly(8))
            payload = await reader.readexactly(n)
            if b0 & 0x0F == 0x8:
                return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
    return await asyncio.wait_for(run(), timeout)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: Any) -> Any:
    tmp = tmp_path_factory.mktemp("fuzz")
    port = free_port()
    proc = start_server(port, tmp / "data", "--rate_limit=0", "--max_connections_per_ip=0",
                        "--handshake_timeout=1.5", "--ping_interval=1", "--ping_timeout=1",
                        "--simulated_sensors=", "--host_metrics=False", "--max_message_size=%d" % MAX_MESSAGE,
                        log_path=tmp / "server.log")
    yield port, proc, tmp / "server.log"
    proc.stop()


def no_traceback(log_path: Any) -> None:
    text = log_path.read_text(errors="replace")
    assert "Traceback" not in text and "Exception" not in text, text[-3000:]


@pytest.mark.parametrize("path", ENDPOINTS)
def test_each_malformed_frame_gets_its_close_code(fuzz_server: Any, path: str) -> None:
    port, _, log_path = fuzz_server

    async def main() -> list[str]:
        wrong = []
        for what, data, want in CASES:
            reader, writer = await open_raw(port, path)
            writer.write(data)
            got = await close_code(reader)
            writer.close()
            if got != want:
                wrong.append("%s: %s, expected %d" % (what, got, want))
        return wrong

    assert asyncio.run(main()) == []
    no_traceback(log_path)


def test_random_mutations_never_hang_or_break_the_server_and_memory_stays_bounded(fuzz_server: Any) -> None:
    port, proc, log_path = fuzz_server
    rng = random.Random(12)
    server = psutil.Process(proc.pid)
    valid = [client_frame(b'{"type":"ping","ref":1}'), client_frame(b'{"type":"join","room":"fz"}'),
             client_frame(b'{"type":"subscribe","sensors":["*"]}'), client_frame(b"\x03\xe8bye", 0x8),
             client_frame(b"hi", 0x9), client_frame(b"x" * 300), client_frame(b"\x81\xa4type\xa4ping", 0x2)]

    def mutate(data: bytes) -> bytes:
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            kind = rng.randrange(5)
            if kind == 0 and b:  # flip bits
                i = rng.randrange(len(b))
                b[i] ^= 1 << rng.randrange(8)
            elif kind == 1 and b:  # random byte
                b[rng.randrange(len(b))] = rng.randrange(256)
            elif kind == 2:  # truncate
                del b[rng.randrange(len(b) + 1):]
            elif kind == 3:  # garbage after it
                b += os.urandom(rng.randint(1, 40))
            else:  # two frames glued, the second mutated later
                b += rng.choice(valid)
        return bytes(b)

    async def one(path: str) -> str:
        reader, writer = await open_raw(port, path)
        writer.write(b"".join(mutate(rng.choice(valid)) for _ in range(rng.randint(1, 3))))
        eof = rng.random() < 0.5
        if eof:
            writer.write_eof()  # and then the client goes quiet
        try:
            code = await close_code(reader, timeout=8)
        except asyncio.TimeoutError:
            return "hang"
        finally:
            writer.close()
        if code is None:  # TCP ended without a close frame: only fair once the client itself ended
            return "eof" if eof else "dropped"
        return str(code)

    async def main() -> dict[str, int]:
        outcomes: dict[str, int] = {}
        for batch in range(12):
            results = await asyncio.gather(*[one(rng.choice(ENDPOINTS)) for _ in range(50)])
            for r in results:
                outcomes[r] = outcomes.get(r, 0) + 1
            if batch == 1:
                outcomes["rss_after_warmup"] = server.memory_info().rss
        return outcomes

    outcomes = asyncio.run(asyncio.wait_for(main(), 240))
    rss_warm = outcomes.pop("rss_after_warmup")
    rss_end = server.memory_info().rss
    assert "hang" not in outcomes, outcomes
    # Only the codes of the table, an echo of a valid close the mutation produced (any code RFC 6455
    # lets a client send: 1000-1003, 1007-1011, 3000-4999; a flipped bit turns 1000 into 1001), or none
    # (1005 is "a close without a code", echoed as such), or TCP ending after the client's EOF.
    assert set(outcomes) <= {"1000", "1001", "1002", "1003", "1005", "1007", "1008", "1009", "1010", "1011",
                             "eof"} | {str(c) for c in range(3000, 5000)}, outcomes
    assert outcomes.get("1002", 0) > 50 and outcomes.get("1007", 0) + outcomes.get("1000", 0) > 0, outcomes
    growth = (rss_end - rss_warm) / 2**20
    print("outcomes %s; RSS %.1f MiB after warm-up, %.1f MiB at the end" % (outcomes, rss_warm / 2**20,
                                                                           rss_end / 2**20))
    assert growth < 20, "RSS grew %.1f MiB over 500 fuzzed connections" % growth
    no_traceback(log_path)
    assert proc.poll() is None and psutil.Process(proc.pid).is_running()


def test_a_handshake_trickled_byte_by_byte_is_bounded_by_the_handshake_timeout(fuzz_server: Any) -> None:
    port, _, log_path = fuzz_server

    async def trickle(path: str, pause: float) -> tuple[bytes, float]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        start = time.monotonic()
        data = handshake(path, port)
        try:
            for i in range(len(data)):
                writer.write(data[i:i + 1])
                await writer.drain()
                await asyncio.sleep(pause)
                if reader.at_eof():
                    break
        except (ConnectionError, OSError):
            pass
        try:
            got = await asyncio.wait_for(reader.read(200), 5)
        except (ConnectionError, OSError):
            got = b""
        writer.close()
        return got, time.monotonic() - start

    async def main() -> None:
        for path in ENDPOINTS:
            slow, fast = await asyncio.gather(trickle(path, 0.05), trickle(path, 0.002))
            # ~230 bytes at 50 ms each would take 11 s: cut at the 1.5 s deadline, unanswered.
            assert slow[0] == b"" and slow[1] < 4.0, (path, slow)
            # The same bytes within the deadline are an ordinary handshake.
            assert fast[0].startswith(b"HTTP/1.1 101"), (path, fast[0][:100])

    asyncio.run(main())
    no_traceback(log_path)
