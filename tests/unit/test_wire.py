"""realtime/wire.py with no socket: client frames in, events and close codes out."""

from __future__ import annotations

import os
import struct
import zlib

import pytest

from realtime.wire import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Deflater,
    FrameReader,
    WireError,
    accept_value,
    frame,
    inflate,
    negotiate_deflate,
    unmask,
    valid_close_code,
)


def client_frame(payload: bytes, opcode: int = OP_TEXT, fin: bool = True, rsv: int = 0, masked: bool = True) -> bytes:
    """A client-to-server frame, as a browser sends it (masked)."""
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | rsv | opcode])
    bit = 0x80 if masked else 0
    if n < 126:
        head += bytes([bit | n])
    elif n <= 0xFFFF:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def read_all(data: bytes, max_size: int = 1 << 20, deflate: bool = False, step: int | None = None):
    reader = FrameReader(max_size, deflate)
    events: list = []
    error = None
    chunks = [data] if step is None else [data[i:i + step] for i in range(0, len(data), step)]
    for chunk in chunks:
        got, err = reader.feed(chunk)
        events += got
        error = error or err
    return events, error


def test_the_handshake_accept_value_is_rfc_6455s_example():
    assert accept_value("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_unmask_is_the_xor_with_the_repeated_key():
    mask = b"\x01\x02\x03\x04"
    data = os.urandom(1001)
    assert unmask(mask, data) == bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    assert unmask(mask, b"") == b""


@pytest.mark.parametrize("n", [0, 1, 125, 126, 65535, 65536, 70000])
def test_server_frames_use_the_shortest_length_form(n):
    f = frame(b"x" * n, OP_BINARY, rsv1=True)
    assert f[0] == 0x80 | 0x40 | OP_BINARY
    header = 2 if n < 126 else 4 if n < 65536 else 10
    assert len(f) == header + n


def test_messages_and_control_frames_come_out_in_order_whatever_the_chunking():
    wire = (client_frame("héllo".encode()) + client_frame(b"\x00\xff", OP_BINARY)
            + client_frame(b"frag", fin=False) + client_frame(b"p", OP_PING)
            + client_frame("ment €".encode()[:6], 0, fin=False) + client_frame("ment €".encode()[6:], 0)
            + client_frame(b"", OP_PONG) + client_frame(b"x" * 70000, OP_BINARY))
    expected = [(OP_TEXT, "héllo"), (OP_BINARY, b"\x00\xff"), (OP_PING, b"p"), (OP_TEXT, "fragment €"),
                (OP_PONG, b""), (OP_BINARY, b"x" * 70000)]
    for step in (None, 1, 7, 4096):
        assert read_all(wire, step=step) == (expected, None), step


@pytest.mark.parametrize("wire, reason", [
    (client_frame(b"hi", masked=False), "masked"),
    (client_frame(b"hi", rsv=0x20), "reserved bits"),
    (client_frame(b"hi", rsv=0x40), "reserved bits"),  # RSV1 without permessage-deflate
    (client_frame(b"hi", opcode=3), "opcode"),
    (client_frame(b"hi", opcode=11), "opcode"),
    (client_frame(b"hi", OP_PING, fin=False), "fragmented"),
    (client_frame(b"x" * 126, OP_PING), "125"),
    (client_frame(b"hi", 0), "no message to continue"),
    (client_frame(b"a", fin=False) + client_frame(b"b"), "before the fragmented"),
])
def test_protocol_violations_fail_with_1002(wire, reason):
    events, error = read_all(wire)
    assert events == [] and isinstance(error, WireError)
    assert error.code == 1002 and reason in error.reason


def test_a_frame_over_the_limit_fails_1009_from_its_header_alone():
    reader = FrameReader(1000)
    head = client_frame(b"x" * 5000)[:8]  # header and mask: no payload yet
    events, error = reader.feed(head)
    assert error is not None and error.code == 1009


def test_fragments_count_together_toward_the_limit():
    wire = client_frame(b"x" * 600, fin=False) + client_frame(b"x" * 600, 0)
    assert read_all(wire, max_size=1000)[1].code == 1009
    assert read_all(wire, max_size=1200) == ([(OP_TEXT, "x" * 1200)], None)


def test_invalid_utf8_fails_1007():
    assert read_all(client_frame(b"\xce\xba\xe1\xbd"))[1].code == 1007
    assert read_all(client_frame(b"\xed\xa0\x80"))[1].code == 1007  # a UTF-16 surrogate


def test_invalid_utf8_in_a_fragment_fails_before_the_message_ends():
    reader = FrameReader(1 << 20)
    events, error = reader.feed(client_frame(b"ok \xf4\x90\x80\x80", fin=False))  # > U+10FFFF
    assert events == [] and error is not None and error.code == 1007


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014,
                                  3000, 3999, 4000, 4999])
def test_valid_close_codes_come_through_with_their_reason(code):
    events, error = read_all(client_frame(struct.pack("!H", code) + "bye ☺".encode(), OP_CLOSE))
    assert (events, error) == ([(OP_CLOSE, (code, "bye ☺"))], None)
    assert valid_close_code(code)


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535])
def test_invalid_close_codes_fail_with_1002(code):
    events, error = read_all(client_frame(struct.pack("!H", code), OP_CLOSE))
    assert events == [] and error.code == 1002 and error.after_close
    assert not valid_close_code(code)


def test_close_payloads_of_one_byte_or_bad_utf8_fail():
    assert read_all(client_frame(b"\x03", OP_CLOSE))[1].code == 1002
    assert read_all(client_frame(b"\x03\xe8\xff\xfe", OP_CLOSE))[1].code == 1007
    assert read_all(client_frame(b"", OP_CLOSE)) == ([(OP_CLOSE, (None, ""))], None)


def test_nothing_after_a_close_frame_counts():
    wire = client_frame(b"\x03\xe8", OP_CLOSE) + client_frame(b"late") + b"\x00garbage"
    assert read_all(wire) == ([(OP_CLOSE, (1000, ""))], None)


def test_a_failed_reader_still_finds_the_clients_answering_close():
    reader = FrameReader(1000)
    events, error = reader.feed(client_frame(b"bad", masked=False) + client_frame(b"more"))
    assert events == [] and error.code == 1002
    later = client_frame(b"y" * 5000) + client_frame(b"\x03\xea", OP_CLOSE)  # too big: skipped, not checked
    got: list = []
    for i in range(0, len(later), 333):
        events, error = reader.feed(later[i:i + 333])
        got += events
        assert error is None
    assert got == [(OP_CLOSE, (None, ""))]


# -- permessage-deflate ----------------------------------------------------------------


@pytest.mark.parametrize("offer, response, wbits", [
    ("permessage-deflate", "permessage-deflate; server_no_context_takeover; client_no_context_takeover", 15),
    ("permessage-deflate; client_max_window_bits",
     "permessage-deflate; server_no_context_takeover; client_no_context_takeover", 15),
    ("permessage-deflate; server_max_window_bits=10; client_no_context_takeover",
     "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=10", 10),
    ("x-webkit-deflate-frame, permessage-deflate; server_max_window_bits=16, permessage-deflate",
     "permessage-deflate; server_no_context_takeover; client_no_context_takeover", 15),  # first acceptable offer
    ('permessage-deflate; server_max_window_bits="8"',
     "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=8", 8),
])
def test_deflate_is_agreed_without_context_takeover(offer, response, wbits):
    assert negotiate_deflate(offer) == (response, wbits)


@pytest.mark.parametrize("offer", ["", "x-webkit-deflate-frame", "permessage-deflate; foo",
                                   "permessage-deflate; server_max_window_bits",
                                   "permessage-deflate; server_max_window_bits=7",
                                   "permessage-deflate; client_max_window_bits=99",
                                   "permessage-deflate; server_no_context_takeover=1",
                                   "permessage-deflate; client_no_context_takeover; client_no_context_takeover"])
def test_unacceptable_offers_are_declined(offer):
    assert negotiate_deflate(offer) is None


@pytest.mark.parametrize("wbits", [8, 9, 12, 15])
def test_each_compressed_message_stands_alone(wbits):
    d = Deflater(wbits)
    text = b'{"type":"message","text":"hello hello hello hello"}' * 20
    first, second = d.compress(text), d.compress(text)
    assert first == second  # nothing carried over from the first message
    assert len(first) < len(text)
    window = max(wbits, 8)
    assert zlib.decompressobj(-window).decompress(second + b"\x00\x00\xff\xff") == text
    assert inflate(second, len(text)) == text
    assert inflate(d.compress(b""), 10) == b""


def test_inflate_bounds_the_decompressed_size_and_refuses_garbage():
    bomb = Deflater().compress(b"\x00" * 200_000)
    assert len(bomb) < 1000
    with pytest.raises(WireError) as e:
        inflate(bomb, 65536)
    assert e.value.code == 1009
    with pytest.raises(WireError) as e:
        inflate(b"\xff\xff\xff\xff", 100)
    assert e.value.code == 1007


def test_compressed_messages_are_inflated_and_checked():
    d = Deflater()
    text = "ünïcode ✓ " * 50
    packed = d.compress(text.encode())
    wire = (client_frame(packed, rsv=0x40)
            + client_frame(packed[:10], rsv=0x40, fin=False) + client_frame(packed[10:], 0)
            + client_frame(b"plain"))
    assert read_all(wire, deflate=True) == ([(OP_TEXT, text), (OP_TEXT, text), (OP_TEXT, "plain")], None)
    assert read_all(client_frame(d.compress(b"\xff\xfe"), rsv=0x40), deflate=True)[1].code == 1007
    assert read_all(client_frame(packed, rsv=0x40), max_size=100, deflate=True)[1].code == 1009
