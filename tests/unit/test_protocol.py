import json

import msgpack
import pytest
import websockets.frames
from websockets.streams import StreamReader

from realtime.protocol import (
    Outgoing,
    ProtocolError,
    close_reason,
    decode,
    decode_msgpack,
    has_control_chars,
    websocket_frame,
)


@pytest.mark.parametrize("text,code", [
    ("{bad", "bad_json"),
    ("", "bad_json"),
    ('{"type":"x","v":NaN}', "bad_message"),
    ('{"type":"x","v":Infinity}', "bad_message"),
    ('{"type":"x","v":-Infinity}', "bad_message"),
    ('{"type":"x","v":1e999}', "bad_message"),
    ('{"type":"x","v":"\\ud800"}', "bad_json"),
    ('{"type":"x","\\udfff":1}', "bad_json"),
    ("[" * 40 + "]" * 40, "bad_json"),
    ("[1,2]", "bad_message"),
    ('"type"', "bad_message"),
    ('{"no":"type"}', "bad_message"),
    ('{"type":""}', "bad_message"),
    ('{"type":5}', "bad_message"),
])
def test_decode_rejects(text, code):
    with pytest.raises(ProtocolError) as e:
        decode(text)
    assert e.value.code == code


@pytest.mark.parametrize("data,code", [
    (b"", "bad_msgpack"),
    (b"\xc1", "bad_msgpack"),  # a byte MessagePack never uses
    (msgpack.packb({"type": "x"}) + msgpack.packb(1), "bad_msgpack"),  # two values in one frame
    (b"\x81\xa4type\xa2\xed\xa0", "bad_msgpack"),  # a str that is not UTF-8 (a UTF-8 surrogate)
    (msgpack.packb({"type": "x", "v": [[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]}), "bad_msgpack"),  # too deep
    (msgpack.packb({"type": "x", "v": float("nan")}), "bad_message"),
    (msgpack.packb({"type": "x", "v": float("-inf")}), "bad_message"),
    (msgpack.packb({"type": "x", 1: 2}), "bad_message"),
    (msgpack.packb({"type": "x", b"k": 2}), "bad_message"),
    (msgpack.packb({"type": "x", "v": b"bin"}), "bad_message"),
    (msgpack.packb({"type": "x", "v": msgpack.ExtType(5, b"a")}), "bad_message"),
    (msgpack.packb({"type": "x", "t": msgpack.Timestamp(1, 0)}), "bad_message"),
    (msgpack.packb([1, 2]), "bad_message"),
    (msgpack.packb("type"), "bad_message"),
    (msgpack.packb({"no": "type"}), "bad_message"),
    (msgpack.packb({"type": b"say"}), "bad_message"),
])
def test_decode_msgpack_rejects(data, code):
    with pytest.raises(ProtocolError) as e:
        decode_msgpack(data)
    assert e.value.code == code


def test_a_non_string_key_is_named_as_such():
    with pytest.raises(ProtocolError) as e:
        decode_msgpack(msgpack.packb({"type": "x", 1: 2}))
    assert e.value.message == "map keys are strings, not int"


def test_decode_msgpack_gives_what_decode_gives_for_the_same_message():
    obj = {"type": "say", "room": "lobby", "text": "hé 😀 日本", "n": [1, -2, 2.5, True, None], "m": {"a": {}}}
    assert decode_msgpack(msgpack.packb(obj)) == decode(json.dumps(obj)) == obj


def test_decode_accepts_unicode_and_pairs():
    msg = decode('{"type":"say","text":"h\\u00e9 \\ud83d\\ude00 日本"}')
    assert msg["text"] == "hé 😀 日本"


@pytest.mark.parametrize("size", [0, 5, 125, 126, 65535, 65536, 70000])
def test_frame_matches_rfc6455(size):
    payload = b"x" * size
    frame = websocket_frame(payload)
    # Parse it back with the websockets library's own (sans-I/O) frame parser.
    reader = StreamReader()
    reader.feed_data(frame)
    reader.feed_eof()
    parser = websockets.frames.Frame.parse(reader.read_exact, mask=False)
    with pytest.raises(StopIteration) as done:
        next(parser)
    parsed = done.value.value
    assert parsed.data == payload and parsed.fin and parsed.opcode == websockets.frames.Opcode.TEXT


def test_outgoing_encodes_once_compact_utf8():
    out = Outgoing({"type": "m", "text": "é/</script>"})
    assert json.loads(out.text) == {"type": "m", "text": "é/</script>"}
    assert out.data == out.text.encode("utf-8")
    assert out.frame is out.frame  # built once


def test_close_reason_is_trimmed_to_123_bytes():
    assert len(close_reason("é" * 200).encode()) <= 123


def test_control_chars():
    assert not has_control_chars("a\tb\nc")
    assert has_control_chars("a\x00b")
    assert has_control_chars("bell\x07")
    assert has_control_chars("del\x7f")
