"""The WebSocket wire format, sans-I/O: frames (RFC 6455) and permessage-deflate (RFC 7692).

Nothing here touches a socket.  :class:`FrameReader` takes the bytes a client
sent and gives back whole messages and control frames, checked as they arrive:

* a client frame must be masked (section 5.1), its reserved bits clear unless
  an extension says otherwise, its opcode known, a control frame short and
  unfragmented, continuations in order; else close 1002;
* a message may not exceed ``max_size`` bytes, compressed or not (1009), which
  is checked from the frame header, before its payload is buffered;
* text must be UTF-8, checked fragment by fragment so a bad message fails as
  soon as it is bad (1007);
* a close frame carries no code, or a valid one (section 7.4) and a UTF-8
  reason; else 1002 (1007 for the reason).

Outgoing frames are built by :func:`frame`.  Compression negotiates
``server_no_context_takeover`` and ``client_no_context_takeover``: no
compressor or decompressor state outlives a message, so the server keeps no
zlib state per connection, and a message compressed once (:class:`Deflater`,
one per window size per application) is the same bytes for every recipient.
"""

from __future__ import annotations

import base64
import codecs
import hashlib
import struct
import zlib
from typing import Any

OP_CONT, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA

PROTOCOL_ERROR = 1002
INVALID_DATA = 1007
TOO_BIG = 1009

_DEFLATE_TAIL = b"\x00\x00\xff\xff"
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class WireError(Exception):
    """The client broke the protocol: fail the connection with ``code``.

    ``after_close`` is true when the faulty frame was the client's close frame
    (so the client is done sending, and the TCP connection can go at once)."""

    def __init__(self, code: int, reason: str, after_close: bool = False) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.after_close = after_close


def valid_close_code(code: int) -> bool:
    """May a peer send this close code (RFC 6455 section 7.4; IANA registry)?

    1004, 1005, 1006 and 1015 are reserved and never sent; 1016-2999 are
    unassigned; 3000-4999 belong to libraries and applications."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def accept_value(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a client's ``Sec-WebSocket-Key``."""
    return base64.b64encode(hashlib.sha1(key.encode("latin-1") + _GUID).digest()).decode("ascii")


def frame(payload: bytes, opcode: int = OP_TEXT, rsv1: bool = False) -> bytes:
    """An unmasked, unfragmented server-to-client frame (section 5.2)."""
    n = len(payload)
    first = 0x80 | opcode | (0x40 if rsv1 else 0)
    if n < 126:
        header = struct.pack("!BB", first, n)
    elif n <= 0xFFFF:
        header = struct.pack("!BBH", first, 126, n)
    else:
        header = struct.pack("!BBQ", first, 127, n)
    return header + payload


def close_payload(code: int | None, reason: str = "") -> bytes:
    if code is None:
        return b""
    return struct.pack("!H", code) + reason.encode("utf-8")


def unmask(mask: bytes, data: bytes | bytearray | memoryview) -> bytes:
    """XOR ``data`` with the repeated 4-byte ``mask`` (as one big integer: C speed)."""
    n = len(data)
    if not n:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


# -- permessage-deflate --------------------------------------------------------


class Deflater:
    """Compresses whole messages, each on its own (no context carried over).

    A full flush after each message resets the compressor's history, so every
    output decodes with a fresh inflater: the ``server_no_context_takeover``
    this server always negotiates.  One per window size per application; the
    caller caches the result on the message (``Outgoing.frame_for``)."""

    def __init__(self, wbits: int = 15, level: int = 6, mem_level: int = 8) -> None:
        strategy = zlib.Z_DEFAULT_STRATEGY
        if wbits < 9:
            # zlib has no raw 256-byte window; run-length matches (distance 1)
            # fit any window, so a client that asked for 8 bits can inflate them.
            wbits, strategy = 9, zlib.Z_RLE
        self.wbits = wbits
        self._z = zlib.compressobj(level, zlib.DEFLATED, -wbits, mem_level, strategy)

    def compress(self, data: bytes) -> bytes:
        out = self._z.compress(data) + self._z.flush(zlib.Z_FULL_FLUSH)
        # RFC 7692 7.2.1: drop the flush's empty block; an empty message is one 0x00.
        return out[:-4] or b"\x00"


def inflate(data: bytes, max_size: int) -> bytes:
    """One compressed message (the client takes no context over either)."""
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = d.decompress(data + _DEFLATE_TAIL, max_size + 1)
    except zlib.error:
        raise WireError(INVALID_DATA, "compressed message is not valid deflate data") from None
    if len(out) > max_size or d.unconsumed_tail:
        raise WireError(TOO_BIG, "message too big after decompression (max %d bytes)" % max_size)
    return out


_DEFLATE_PARAMS = {"server_no_context_takeover", "client_no_context_takeover",
                   "server_max_window_bits", "client_max_window_bits"}


def _window_bits(value: str | None) -> int | None:
    if value is None or not value.isdigit() or len(value) > 2:
        return None
    bits = int(value)
    return bits if 8 <= bits <= 15 else None


def negotiate_deflate(header: str) -> tuple[str, int] | None:
    """Answer a client's ``Sec-WebSocket-Extensions`` offers.

    Returns the response header value and the window bits our frames may use,
    or None when no ``permessage-deflate`` offer is acceptable.  Offers are
    tried in the client's order (RFC 7692 section 5); one with an unknown,
    repeated or malformed parameter is declined."""
    for ext in header.split(","):
        parts = [p.strip() for p in ext.split(";")]
        if parts[0].lower() != "permessage-deflate":
            continue
        params: dict[str, str | None] = {}
        ok = True
        for part in parts[1:]:
            key, eq, value = part.partition("=")
            key = key.strip().lower()
            val: str | None = value.strip().strip('"') if eq else None
            if key not in _DEFLATE_PARAMS or key in params:
                ok = False
                break
            params[key] = val
        if not ok:
            continue
        if params.get("server_no_context_takeover", None) is not None or \
                params.get("client_no_context_takeover", None) is not None:
            continue  # these take no value
        if "client_max_window_bits" in params and params["client_max_window_bits"] is not None \
                and _window_bits(params["client_max_window_bits"]) is None:
            continue
        wbits = 15
        response = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        if "server_max_window_bits" in params:
            bits = _window_bits(params["server_max_window_bits"])
            if bits is None:
                continue
            wbits = bits
            response += "; server_max_window_bits=%d" % bits
        return response, wbits
    return None


# -- reading client frames -------------------------------------------------------------

_utf8_decoder = codecs.getincrementaldecoder("utf-8")


class FrameReader:
    """Client bytes in; ``(opcode, payload)`` events out (section 5).

    Events: ``(OP_TEXT, str)``, ``(OP_BINARY, bytes)``, ``(OP_PING, bytes)``,
    ``(OP_PONG, bytes)``, ``(OP_CLOSE, (code or None, reason))``.  After a close
    frame, or once :meth:`fail` was called, data frames are skipped and only a
    close frame is reported, so that a failed connection can still see the
    client's answering close."""

    __slots__ = ("max_size", "deflate", "buf", "msg_op", "parts", "size", "compressed", "utf8",
                 "failed", "skip")

    def __init__(self, max_size: int, deflate: bool = False) -> None:
        self.max_size = max_size
        self.deflate = deflate  # permessage-deflate negotiated: RSV1 marks a compressed message
        self.buf: bytes | bytearray = b""  # an incomplete frame
        self.msg_op = 0  # opcode of the fragmented message in progress, 0 if none
        self.parts: list[Any] = []
        self.size = 0
        self.compressed = False
        self.utf8: Any = None
        self.failed = False
        self.skip = 0  # failed: payload bytes still to skip

    def fail(self) -> None:
        """From now on only look for the client's close frame."""
        self.failed = True
        self.parts = []
        self.msg_op = 0

    def feed(self, data: bytes) -> tuple[list[tuple[int, Any]], WireError | None]:
        """Parse what ``data`` completes.  Returns the events, in order, and the
        error that failed the connection, if any (the events before it still count)."""
        if self.buf:
            self.buf += data
            buf: bytes | bytearray = self.buf
        else:
            buf = data
        events: list[tuple[int, Any]] = []
        pos = 0
        end = len(buf)
        error: WireError | None = None
        while True:
            if self.failed:
                pos = self._skip(buf, pos, events)
                break
            if end - pos < 2:
                break
            b0 = buf[pos]
            b1 = buf[pos + 1]
            n = b1 & 0x7F
            hl = 2
            if n == 126:
                if end - pos < 4:
                    break
                n = (buf[pos + 2] << 8) | buf[pos + 3]
                hl = 4
            elif n == 127:
                if end - pos < 10:
                    break
                n = int.from_bytes(buf[pos + 2:pos + 10], "big")
                hl = 10
            try:
                self._check(b0, b1, n)
            except WireError as e:
                error = e
                self.fail()
                # Step over the faulty frame itself (its header is all here): the search for the
                # client's close starts after it (an oversized close frame is a fault, not a close).
                after = pos + hl + (4 if b1 & 0x80 else 0)
                self.skip = n + max(0, after - end)
                pos = min(after, end)
                continue
            try:
                start = pos + hl + 4
                if end - start < n:
                    break  # wait for the rest of the payload
                payload = unmask(bytes(buf[start - 4:start]), buf[start:start + n])
                pos = start + n
                event = self._frame(b0, payload)
            except WireError as e:
                error = e
                self.fail()
                if e.after_close:
                    pos = end
                continue  # failed: the rest is only searched for the client's close
            if event is not None:
                events.append(event)
                if event[0] == OP_CLOSE:
                    self.failed = True  # nothing after a close frame counts
                    pos = end
                    break
        if pos >= end:
            self.buf = b""
        elif buf is data:
            self.buf = bytearray(data[pos:])
        elif pos:
            del self.buf[:pos]  # type: ignore[union-attr]
        return events, error

    def _check(self, b0: int, b1: int, n: int) -> None:
        """Everything the header alone can tell, before any payload is buffered."""
        if n >> 63:
            raise WireError(PROTOCOL_ERROR, "the most significant bit of a 64-bit length must be 0")
        if not b1 & 0x80:
            raise WireError(PROTOCOL_ERROR, "client frames must be masked (RFC 6455 section 5.1)")
        opcode = b0 & 0x0F
        rsv = b0 & 0x70
        if opcode & 0x8:
            if opcode > OP_PONG:
                raise WireError(PROTOCOL_ERROR, "unknown opcode %d" % opcode)
            if not b0 & 0x80:
                raise WireError(PROTOCOL_ERROR, "control frames must not be fragmented")
            if n > 125:
                raise WireError(PROTOCOL_ERROR, "control frame payloads are at most 125 bytes")
            if rsv:
                raise WireError(PROTOCOL_ERROR, "reserved bits set on a control frame")
            return
        if opcode > OP_BINARY:
            raise WireError(PROTOCOL_ERROR, "unknown opcode %d" % opcode)
        if opcode == OP_CONT:
            if not self.msg_op:
                raise WireError(PROTOCOL_ERROR, "continuation frame with no message to continue")
            if rsv:
                raise WireError(PROTOCOL_ERROR, "reserved bits set on a continuation frame")
        else:
            if self.msg_op:
                raise WireError(PROTOCOL_ERROR, "a new message began before the fragmented one ended")
            if rsv & ~0x40 or (rsv and not self.deflate):
                raise WireError(PROTOCOL_ERROR, "reserved bits set without a negotiated extension")
        size = (self.size if opcode == OP_CONT else 0) + n
        if size > self.max_size:
            raise WireError(TOO_BIG, "message too big (max %d bytes)" % self.max_size)

    def _frame(self, b0: int, payload: bytes) -> tuple[int, Any] | None:
        opcode = b0 & 0x0F
        if opcode & 0x8:
            if opcode == OP_CLOSE:
                return OP_CLOSE, self._close(payload)
            return opcode, payload
        fin = b0 & 0x80
        if opcode != OP_CONT:
            if fin and not b0 & 0x40:  # the common case: one uncompressed frame
                if opcode == OP_TEXT:
                    try:
                        return OP_TEXT, payload.decode("utf-8")
                    except UnicodeDecodeError:
                        raise WireError(INVALID_DATA, "text message is not valid UTF-8") from None
                return OP_BINARY, payload
            self.msg_op = opcode
            self.compressed = bool(b0 & 0x40)
            self.parts = []
            self.size = 0
            self.utf8 = _utf8_decoder() if opcode == OP_TEXT and not self.compressed else None
        self.size += len(payload)
        if self.utf8 is not None:
            try:
                self.parts.append(self.utf8.decode(payload, bool(fin)))
            except UnicodeDecodeError:
                raise WireError(INVALID_DATA, "text message is not valid UTF-8") from None
        else:
            self.parts.append(payload)
        if not fin:
            return None
        op, parts, self.msg_op, self.parts, self.size = self.msg_op, self.parts, 0, [], 0
        if self.utf8 is not None:
            self.utf8 = None
            return op, "".join(parts)
        data = b"".join(parts)
        if self.compressed:
            data = inflate(data, self.max_size)
            if op == OP_TEXT:
                try:
                    return op, data.decode("utf-8")
                except UnicodeDecodeError:
                    raise WireError(INVALID_DATA, "text message is not valid UTF-8") from None
        return op, data

    def _close(self, payload: bytes) -> tuple[int | None, str]:
        if not payload:
            return None, ""
        if len(payload) == 1:
            raise WireError(PROTOCOL_ERROR, "a close payload is empty or at least 2 bytes", after_close=True)
        code = (payload[0] << 8) | payload[1]
        if not valid_close_code(code):
            raise WireError(PROTOCOL_ERROR, "invalid close code %d" % code, after_close=True)
        try:
            reason = payload[2:].decode("utf-8")
        except UnicodeDecodeError:
            raise WireError(INVALID_DATA, "close reason is not valid UTF-8", after_close=True) from None
        return code, reason

    def _skip(self, buf: bytes | bytearray, pos: int, events: list[tuple[int, Any]]) -> int:
        """Failed: step over frames (checked no further) until a close frame."""
        end = len(buf)
        while pos < end:
            if self.skip:
                step = min(self.skip, end - pos)
                self.skip -= step
                pos += step
                continue
            if end - pos < 2:
                return pos
            b0, b1 = buf[pos], buf[pos + 1]
            n = b1 & 0x7F
            hl = 2
            if n == 126:
                if end - pos < 4:
                    return pos
                n, hl = (buf[pos + 2] << 8) | buf[pos + 3], 4
            elif n == 127:
                if end - pos < 10:
                    return pos
                n, hl = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
            if b1 & 0x80:
                hl += 4
            if b0 & 0x0F == OP_CLOSE:
                events.append((OP_CLOSE, (None, "")))
                return end
            if end - pos < hl:
                return pos
            pos += hl
            self.skip = n
        return pos
