"""Wire protocol shared by every endpoint: decoding, validation, errors, close codes.

Sans-I/O: nothing here touches a socket.  A handler hands the text of a frame to
:func:`decode`, gets back a checked ``dict`` with a ``type``, or a
:class:`ProtocolError` whose ``code`` goes straight into an ``error`` message.

Outgoing messages are encoded once into an :class:`Outgoing`, which also carries
the finished WebSocket frame so that fan-out writes the same bytes to every
recipient instead of re-encoding per connection.
"""

from __future__ import annotations

import math
import re
import struct
from typing import Any, Iterable

import ujson

# -- close codes -------------------------------------------------------------


class Close:
    """The close codes this server uses, and what a client should do on each."""

    NORMAL = 1000
    GOING_AWAY = 1001  # shutdown: reconnect (elsewhere)
    UNSUPPORTED = 1003  # binary frame where text was expected
    INVALID_DATA = 1007
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
        "bad_message",
        "unknown_type",
        "too_large",
        "rate_limited",
        "forbidden",
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
            _check_value(k, depth + 1)
            _check_value(v, depth + 1)
    elif t is list:
        for v in value:
            _check_value(v, depth + 1)


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
    value = decode_value(text)
    if type(value) is not dict:
        raise ProtocolError("bad_message", "a message is a JSON object")
    mtype = value.get("type")
    if not isinstance(mtype, str) or not mtype:
        raise ProtocolError("bad_message", "a message needs a string 'type'")
    return value


def encode(obj: Any) -> str:
    return ujson.dumps(obj, ensure_ascii=False, escape_forward_slashes=False)


def websocket_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """An unmasked, unfragmented server-to-client frame (RFC 6455 section 5.2)."""
    n = len(payload)
    first = 0x80 | opcode
    if n < 126:
        header = struct.pack("!BB", first, n)
    elif n <= 0xFFFF:
        header = struct.pack("!BBH", first, 126, n)
    else:
        header = struct.pack("!BBQ", first, 127, n)
    return header + payload


class Outgoing:
    """One message, encoded once, handed to every recipient.

    ``text`` is the JSON; ``data`` its UTF-8 bytes; ``frame`` the finished
    WebSocket frame, built on first use and then shared.  ``kind`` (the
    message's ``type``), ``seq`` (an ordering number: a chat seq, a document
    rev) and ``client`` (the editor client it came from) are what subscribers
    filter on; they travel in a backplane's envelope, so a message that came
    from another node has them too.  ``obj`` is decoded from the text on first
    use when the message arrived as text.
    """

    __slots__ = ("_obj", "text", "data", "_frame", "seq", "client", "kind")

    def __init__(self, obj: Any, seq: int | None = None, client: str | None = None) -> None:
        self._obj = obj
        self.text = encode(obj)
        self.data = self.text.encode("utf-8")
        self._frame: bytes | None = None
        self.seq = seq
        self.client = client
        self.kind: str | None = obj.get("type") if type(obj) is dict else None

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
