"""The fan-out fast path writes frames byte-identical to Tornado's write_message."""

import pytest
from tornado.websocket import WebSocketProtocol13, _WebSocketParams

from realtime.protocol import Outgoing


class CaptureStream:
    def __init__(self):
        self.written = b""

    def write(self, data):
        self.written += bytes(data)
        return None


def tornado_frame(payload: bytes) -> bytes:
    proto = WebSocketProtocol13.__new__(WebSocketProtocol13)
    proto.params = _WebSocketParams()
    proto.mask_outgoing = False
    proto._compressor = None
    proto._message_bytes_out = 0
    proto._wire_bytes_out = 0
    stream = proto.stream = CaptureStream()  # type: ignore[assignment]
    proto._write_frame(True, 0x1, payload)
    return stream.written


@pytest.mark.parametrize("text", ["", "x", "é" * 62, "y" * 125, "z" * 126, "€" * 30000, "w" * 70000])
def test_frames_are_byte_identical_to_tornados(text):
    out = Outgoing({"type": "message", "text": text})
    assert out.frame == tornado_frame(out.data)
