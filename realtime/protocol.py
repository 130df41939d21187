"""Wire protocol shared by every endpoint: decoding, validation, errors, close codes.

Sans-I/O: nothing here touches a socket.  A handler hands the text of a frame to
:func:`decode`, gets back a checked ``dict`` with a ``type``, or a
:class:`ProtocolError` whose ``code`` goes straight into an ``error`` message.

Outgoing messages are encoded once into an :class:`Outgoing`, which also carries
the finished WebSocket frame so that fan-out writes the same bytes to every
recipient instead of re-encoding per connection: one frame per wire format
(:class:`WireFormat`: JSON text or MessagePack binary, deflated or not), each
built the first time a recipient of that format needs it.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable

import msgpack
import ujson

from realtime.wire import OP_BINARY, OP_TEXT, Deflater, frame

# -- close codes -------------------------------------------------------------


class Close:
    """The close codes this server uses, and what a client should do on each."""

    NORMAL = 1000
    GOING_AWAY = 1001  # shutdown: reconnect (elsewhere)
    PROTOCOL_ERROR = 1002  # a frame RFC 6455 forbids (unmasked, bad opcode or close code)
    UNSUPPORTED = 1003  # binary frame where text was expected (or text on a msgpack connection)
    INVALID_DATA = 1007  # text that is not UTF-8
    POLICY = 1008  # kept flooding, or another policy violation
    TOO_BIG = 1009
    SERVER_ERROR = 1011
    TRY_AGAIN = 1013  # slow consumer / overload: reconnect and resume
    TOKEN_EXPIRED = 4001  # refresh the token, then reconnect
    FORBIDDEN = 4003  # do not reconnect


def close_reason(text: str) -> str:
    """Trim a close reason to the 123 bytes RFC 6455 allows."""
    raw = text.encode("utf-8")[:123]
    return raw.decode("utf-8", "ignore")


# -- errors ------------------------------------------------------------------

ERROR_CODES = frozenset(
    {
        "bad_json",
        "bad_msgpack",
        "bad_message",
        "unknown_type",
        "too_large",
        "rate_limited",
        "forbidden",
        "unauthorized",
        "not_found",
        "conflict",
        "unavailable",
    }
)


class ProtocolError(Exception):
    """A client fault, reported as ``{"type":"error","code":...,"message":...}``.

    ``close`` is a close code when the fault is a protocol violation that ends the
    connection; ``None`` keeps the connection open.
    """

    def __init__(self, code: str, message: str, close: int | None = None) -> None:
        assert code in ERROR_CODES, code
        super().__init__(message)
        self.code = code
        self.message = message
        self.close = close

    def __repr__(self) -> str:
        close = "" if self.close is None else ", close=%d" % self.close
        return f"ProtocolError({self.code!r}, {self.message!r}{close})"


def error_message(code: str, message: str, ref: Any = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if ref is not None:
        msg["ref"] = ref
    return msg


# -- decoding ----------------------------------------------------------------

MAX_DEPTH = 16


def _check_value(value: Any, depth: int) -> None:
    """Reject what JSON should not carry but ujson accepts: NaN, Infinity,
    lone surrogates, and absurd nesting."""
    if depth > MAX_DEPTH:
        raise ProtocolError("bad_json", "nesting too deep (max %d)" % MAX_DEPTH)
    t = type(value)
    if t is str:
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ProtocolError("bad_json", "string contains a lone surrogate")
    elif t is float:
        if not math.isfinite(value):
            # Not JSON either, but the usual cause is a sensor or a float that went
            # bad: report it as a bad value, the way the apps report other bad values.
            raise ProtocolError("bad_message", "NaN and Infinity are not valid numbers")
    elif t is dict:
        for k, v in value.items():
            if type(k) is not str:  # only MessagePack has other keys
                raise ProtocolError("bad_message", "map keys are strings, not %s" % type(k).__name__)
            _check_value(k, depth + 1)
            _check_value(v, depth + 1)
    elif t is list:
        for v in value:
            _check_value(v, depth + 1)
    elif t is not int and t is not bool and value is not None:
        # Only MessagePack gets here (bin, ext, timestamps): no JSON equivalent.
        raise ProtocolError("bad_message", "values are strings, numbers, booleans, nil, arrays or maps;"
                            " not %s" % type(value).__name__)


def decode_value(text: str | bytes) -> Any:
    """Parse JSON strictly: ProtocolError ``bad_json`` for anything JSON forbids."""
    try:
        value = ujson.loads(text)
    except (ValueError, OverflowError, RecursionError):
        raise ProtocolError("bad_json", "not valid JSON")
    _check_value(value, 0)
    return value


def decode(text: str) -> dict[str, Any]:
    """Parse one client frame into a message ``dict`` that has a string ``type``.

    Raises :class:`ProtocolError` (``bad_json`` or ``bad_message``).
    """
    return _message(decode_value(text))


def decode_msgpack(data: bytes) -> dict[str, Any]:
    """Parse one MessagePack frame (the ``msgpack`` subprotocol) into a message
    ``dict``, checked exactly like :func:`decode`'s JSON.

    Raises :class:`ProtocolError` (``bad_msgpack`` or ``bad_message``).
    """
    try:
        # Keys of any type are let through here so that _check_value can say
        # what is wrong with them: the MessagePack itself is valid.
        value = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, TypeError, OverflowError, RecursionError, msgpack.UnpackException):
        raise ProtocolError("bad_msgpack", "not valid MessagePack (one map per binary frame)") from None
    try:
        _check_value(value, 0)
    except ProtocolError as e:
        if e.code == "bad_json":  # too deep: JSON's code names the other format
            raise ProtocolError("bad_msgpack", e.message) from None
        raise
    return _message(value)


def _message(value: Any) -> dict[str, Any]:
    if type(value) is not dict:
        raise ProtocolError("bad_message", "a message is a JSON object (a MessagePack map)")
    mtype = value.get("type")
    if not isinstance(mtype, str) or not mtype:
        raise ProtocolError("bad_message", "a message needs a string 'type'")
    return value


def encode(obj: Any) -> str:
    return ujson.dumps(obj, ensure_ascii=False, escape_forward_slashes=False)


websocket_frame = frame  # an unmasked, unfragmented server-to-client frame


class WireFormat:
    """How one connection's messages go on the wire: JSON text or MessagePack
    binary frames, deflated or not.  ``key`` names the format's slot in every
    :class:`Outgoing`'s frame cache; ``key`` 0 is plain JSON."""

    __slots__ = ("key", "binary", "deflater")

    def __init__(self, key: int, binary: bool, deflater: Deflater | None) -> None:
        self.key = key
        self.binary = binary
        self.deflater = deflater


class Formats:
    """The wire formats of one application, and one compressor per window size
    (made by ``make_app``; a compressor is used for one message at a time and
    keeps nothing from it)."""

    def __init__(self, level: int = 6) -> None:
        self.level = level
        self._formats: dict[tuple[bool, int | None], WireFormat] = {}
        self._deflaters: dict[int, Deflater] = {}
        self.json = self.get(False, None)
        self.msgpack = self.get(True, None)

    def deflater(self, wbits: int) -> Deflater:
        d = self._deflaters.get(wbits)
        if d is None:
            d = self._deflaters[wbits] = Deflater(wbits, self.level)
        return d

    def get(self, binary: bool, wbits: int | None) -> WireFormat:
        """``wbits``: the negotiated permessage-deflate window, None for no compression."""
        fmt = self._formats.get((binary, wbits))
        if fmt is None:
            deflater = self.deflater(wbits) if wbits is not None else None
            fmt = self._formats[(binary, wbits)] = WireFormat(len(self._formats), binary, deflater)
        return fmt


class Outgoing:
    """One message, encoded once, handed to every recipient.

    ``text`` is the JSON; ``data`` its UTF-8 bytes; ``frame`` the finished
    WebSocket frame, built on first use and then shared.  Other wire formats'
    frames (:meth:`frame_for`) and the MessagePack encoding (``packed``) are
    built the first time a recipient needs them, once each.  ``kind`` (the
    message's ``type``), ``seq`` (an ordering number: a chat seq, a document
    rev) and ``client`` (the editor client it came from) are what subscribers
    filter on; they travel in a backplane's envelope, so a message that came
    from another node has them too.  ``obj`` is decoded from the text on first
    use when the message arrived as text, and must not change once built.
    """

    __slots__ = ("_obj", "text", "data", "_frame", "seq", "client", "kind", "_frames", "_packed")

    def __init__(self, obj: Any, seq: int | None = None, client: str | None = None) -> None:
        self._obj = obj
        self.text = encode(obj)
        self.data = self.text.encode("utf-8")
        self._frame: bytes | None = None
        self.seq = seq
        self.client = client
        self.kind: str | None = obj.get("type") if type(obj) is dict else None
        self._frames: dict[int, bytes] | None = None
        self._packed: bytes | None = None

    @classmethod
    def from_text(cls, text: str, seq: int | None = None, client: str | None = None,
                  kind: str | None = None) -> "Outgoing":
        """A message already encoded (received from another node)."""
        out = cls.__new__(cls)
        out._obj = None
        out.text = text
        out.data = text.encode("utf-8")
        out._frame = None
        out.seq = seq
        out.client = client
        out.kind = kind
        out._frames = None
        out._packed = None
        return out

    @property
    def obj(self) -> Any:
        if self._obj is None:
            self._obj = ujson.loads(self.text)
        return self._obj

    @property
    def frame(self) -> bytes:
        if self._frame is None:
            self._frame = websocket_frame(self.data)
        return self._frame

    @property
    def packed(self) -> bytes:
        """The message as MessagePack."""
        if self._packed is None:
            obj = self.obj
            self._packed = msgpack.packb(obj)
        return self._packed

    def frame_for(self, fmt: WireFormat) -> bytes:
        """The finished frame in ``fmt``: built (and compressed) once per format."""
        key = fmt.key
        if key == 0:
            return self.frame
        frames = self._frames
        if frames is None:
            frames = self._frames = {}
        else:
            cached = frames.get(key)
            if cached is not None:
                return cached
        opcode = OP_BINARY if fmt.binary else OP_TEXT
        payload = self.packed if fmt.binary else self.data
        if fmt.deflater is None:
            built = frame(payload, opcode)
        else:
            built = frame(fmt.deflater.compress(payload), opcode, rsv1=True)
        frames[key] = built
        return built

    def __len__(self) -> int:
        return len(self.data)


# -- field helpers -----------------------------------------------------------


def get_str(
    msg: dict[str, Any],
    key: str,
    *,
    max_len: int = 200,
    required: bool = True,
    default: str | None = None,
) -> str | None:
    value = msg.get(key)
    if value is None:
        if required:
            raise ProtocolError("bad_message", "'%s' is required" % key)
        return default
    if not isinstance(value, str):
        raise ProtocolError("bad_message", "'%s' must be a string" % key)
    if len(value) > max_len:
        raise ProtocolError("too_large", "'%s' is longer than %d characters" % (key, max_len))
    return value


def get_int(
    msg: dict[str, Any],
    key: str,
    *,
    required: bool = True,
    default: int | None = None,
    minimum: int | None = None,
    maximum: int | None = None,
) -> int | None:
    value = msg.get(key)
    if value is None:
        if required:
            raise ProtocolError("bad_message", "'%s' is required" % key)
        return default
    if type(value) is not int:
        raise ProtocolError("bad_message", "'%s' must be an integer" % key)
    if minimum is not None and value < minimum:
        raise ProtocolError("bad_message", "'%s' must be >= %d" % (key, minimum))
    if maximum is not None and value > maximum:
        raise ProtocolError("bad_message", "'%s' must be <= %d" % (key, maximum))
    return value


def get_number(
    msg: dict[str, Any],
    key: str,
    *,
    required: bool = True,
    default: float | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
) -> float | None:
    value = msg.get(key)
    if value is None:
        if required:
            raise ProtocolError("bad_message", "'%s' is required" % key)
        return default
    if type(value) not in (int, float) or not math.isfinite(value):
        raise ProtocolError("bad_message", "'%s' must be a finite number" % key)
    if minimum is not None and value < minimum:
        raise ProtocolError("bad_message", "'%s' must be >= %s" % (key, minimum))
    if maximum is not None and value > maximum:
        raise ProtocolError("bad_message", "'%s' must be <= %s" % (key, maximum))
    return float(value)


def get_str_list(msg: dict[str, Any], key: str, *, max_items: int, max_len: int = 200) -> list[str]:
    value = msg.get(key)
    if not isinstance(value, list):
        raise ProtocolError("bad_message", "'%s' must be a list of strings" % key)
    if len(value) > max_items:
        raise ProtocolError("too_large", "'%s' has more than %d items" % (key, max_items))
    for item in value:
        if not isinstance(item, str) or not item or len(item) > max_len:
            raise ProtocolError("bad_message", "'%s' must be a list of non-empty strings" % key)
    return list(value)


# Control characters other than tab and newline are refused in user text.
_CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f]")


def has_control_chars(text: str, allowed: Iterable[int] | None = None) -> bool:
    """True if ``text`` has a C0 control character or DEL, other than the
    code points in ``allowed`` (default: tab and newline)."""
    if allowed is None:
        return _CONTROL_RE.search(text) is not None
    ok = set(allowed)
    return any((ord(ch) < 0x20 or ord(ch) == 0x7F) and ord(ch) not in ok for ch in text)
