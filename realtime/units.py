"""Position units: Unicode code points and UTF-16 code units (pure, no I/O).

The server counts positions and lengths in code points (Python ``str``
indexing).  JavaScript strings, textareas, CodeMirror, Monaco, Yjs and ot.js
count UTF-16 code units, where a character outside the Basic Multilingual
Plane (``"😀"``, ``"𝔸"``) is a *surrogate pair* of two units.  An editing
connection chooses its units (``?units=utf16``); the server converts at the
edge, against the text the positions refer to.

* :class:`TextUnits` knows where one text's astral characters are and maps
  positions and ops between the two counts.  A UTF-16 position between the
  two halves of a pair has no code-point equivalent: :class:`SplitError`.
* Ops keep their shape when converted: the same components in the same order,
  the same inserted strings, only the retain and delete counts change.  So a
  conversion keeps normal form, and transforming two ops in UTF-16 units
  (``ot.transform(a, b, size=utf16_length)``) gives the conversions of what
  transforming them in code points gives.
"""

from __future__ import annotations

import re
from bisect import bisect_left

from realtime.ot import Op, OTError, Size, lengths

__all__ = [
    "CODEPOINT",
    "UNITS",
    "UTF16",
    "SplitError",
    "TextUnits",
    "inserted",
    "same_shape",
    "utf16_length",
]

CODEPOINT = "codepoint"
UTF16 = "utf16"
UNITS = (CODEPOINT, UTF16)

_ASTRAL = re.compile("[\U00010000-\U0010ffff]")


class SplitError(OTError):
    """A UTF-16 position falls between the two halves of a surrogate pair."""


def utf16_length(s: str) -> int:
    """Length of ``s`` in UTF-16 code units (a JavaScript ``string.length``)."""
    if s.isascii():
        return len(s)
    return len(s.encode("utf-16-le", "surrogatepass")) // 2


def inserted(op: Op, size: Size = len) -> int:
    """How much text ``op`` inserts, measured by ``size`` (``len`` or :func:`utf16_length`)."""
    return sum(size(c) for c in op if type(c) is str)


def same_shape(op: Op, other: Op) -> bool:
    """True if ``other`` could be ``op`` counted in other units: same kinds, same inserts."""
    if len(op) != len(other):
        return False
    for a, b in zip(op, other):
        if type(a) is str or type(b) is str:
            if a != b:
                return False
        elif type(a) is not int or type(b) is not int or (a > 0) != (b > 0) or abs(b) < abs(a):
            return False
    return True


class TextUnits:
    """One text's positions in code points and in UTF-16 code units.

    Built once per text (a scan for astral characters, skipped for ASCII or
    when ``length16`` says there are none), then each conversion costs a
    binary search.  Errors are :class:`~realtime.ot.OTError` (position or op
    length outside the text) or :class:`SplitError` (a UTF-16 position inside
    a surrogate pair), each with a sentence a person can read.
    """

    __slots__ = ("text", "length", "length16", "_cp", "_u16")

    def __init__(self, text: str, length16: int | None = None) -> None:
        self.text = text
        self.length = len(text)
        if length16 is None:
            length16 = utf16_length(text)
        astral = [m.start() for m in _ASTRAL.finditer(text)] if length16 != self.length else []
        self._cp = astral  # code-point index of each astral character
        self._u16 = [p + k for k, p in enumerate(astral)]  # the UTF-16 index of its first half
        self.length16 = self.length + len(astral)

    @property
    def same(self) -> bool:
        """True when both counts agree everywhere (no astral characters)."""
        return not self._cp

    def to_utf16(self, index: int) -> int:
        """The UTF-16 position of code-point position ``index``."""
        if type(index) is not int or not 0 <= index <= self.length:
            raise OTError(f"position {index!r} is outside a text of {self.length} characters")
        return index + bisect_left(self._cp, index)

    def from_utf16(self, index16: int) -> int:
        """The code-point position of UTF-16 position ``index16``; :class:`SplitError` inside a pair."""
        if type(index16) is not int or not 0 <= index16 <= self.length16:
            raise OTError(f"position {index16!r} is outside a text of {self.length16} UTF-16 code units")
        k = bisect_left(self._u16, index16)
        if k and self._u16[k - 1] == index16 - 1:
            ch = self.text[self._cp[k - 1]]
            raise SplitError(
                f"UTF-16 position {index16} is inside {ch!r} (U+{ord(ch):04X}, a surrogate pair)"
            )
        return index16 - k

    def op_to_utf16(self, op: Op) -> Op:
        """``op`` (code points, for this text) counted in UTF-16 code units.

        Returns ``op`` itself when the counts agree.  Raises
        :class:`~realtime.ot.OTError` unless ``op`` spans this text exactly.
        """
        base = lengths(op)[0]
        if base != self.length:
            raise OTError(
                f"the operation is for a document of {base} characters, but this one has {self.length}"
            )
        if not self._cp:
            return op
        cp = self._cp
        out: Op = []
        pos = 0
        below = 0  # astral characters before pos
        for c in op:
            if type(c) is str:
                out.append(c)
                continue
            end = pos + (c if c > 0 else -c)
            below_end = bisect_left(cp, end, below)
            width = end - pos + below_end - below
            out.append(width if c > 0 else -width)
            pos, below = end, below_end
        return out

    def op_from_utf16(self, op16: Op) -> Op:
        """``op16`` (UTF-16 code units, for this text) counted in code points.

        Raises :class:`~realtime.ot.OTError` unless ``op16`` spans this text
        exactly, :class:`SplitError` if one of its retains or deletes starts
        or ends inside a surrogate pair.
        """
        base = lengths(op16)[0]
        if base != self.length16:
            raise OTError(
                f"the operation is for a document of {base} UTF-16 code units, but this one has {self.length16}"
            )
        if not self._cp:
            return op16
        out: Op = []
        pos16 = pos = 0
        for c in op16:
            if type(c) is str:
                out.append(c)
                continue
            end16 = pos16 + (c if c > 0 else -c)
            try:
                end = self.from_utf16(end16)
            except SplitError as exc:
                raise SplitError(f"the edit would split a character: {exc}") from None
            out.append(end - pos if c > 0 else pos - end)
            pos16, pos = end16, end
        return out
