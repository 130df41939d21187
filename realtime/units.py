"""Position units: Unicode code points and UTF-16 code units (pure, no I/O).

The server counts positions and lengths in code points (Python ``str``
indexing).  JavaScript strings, textareas, CodeMirror, Monaco, Yjs and ot.js
count UTF-16 code units, where a character outside the Basic Multilingual
Plane (``"😀"``, ``"𝔸"``) is a *surrogate pair* of two units.  An editing
connection chooses its units (``?units=utf16``); the server converts at the
edge, against the text the positions refer to.

* :class:`TextUnits` maps one text's positions and ops between the two
  counts.  A UTF-16 position between the
  two halves of a pair has no code-point equivalent: :class:`SplitError`.
* Ops keep their shape when converted: the same components in the same order,
  the same inserted strings, only the retain and delete counts change.  So a
  conversion keeps normal form, and transforming two ops in UTF-16 units
  (``ot.transform(a, b, size=utf16_length)``) gives the conversions of what
  transforming them in code points gives.
"""

from __future__ import annotations

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

    For a text with astral characters it keeps a mask, one byte per code
    point (zero for a BMP character), built once; a conversion then counts
    zero bytes in C, over the stretch of text before the position.  Nothing
    is built for a text without astral characters (``length16`` says so when
    the caller knows it).  Errors are :class:`~realtime.ot.OTError` (position
    or op length outside the text) or :class:`SplitError` (a UTF-16 position
    inside a surrogate pair), each with a sentence a person can read.
    """

    __slots__ = ("text", "length", "length16", "_mask")

    def __init__(self, text: str, length16: int | None = None) -> None:
        self.text = text
        self.length = len(text)
        self.length16 = utf16_length(text) if length16 is None else length16
        self._mask: bytes | None = None

    @property
    def same(self) -> bool:
        """True when both counts agree everywhere (no astral characters)."""
        return self.length16 == self.length

    def _astral(self, start: int, end: int) -> int:
        """How many of the code points ``start .. end - 1`` are astral."""
        if self._mask is None:
            # The third byte of a UTF-32 code unit is non-zero exactly for U+10000 and up.
            self._mask = self.text.encode("utf-32-le")[2::4]
        return end - start - self._mask.count(0, start, end)

    def to_utf16(self, index: int) -> int:
        """The UTF-16 position of code-point position ``index``."""
        if type(index) is not int or not 0 <= index <= self.length:
            raise OTError(f"position {index!r} is outside a text of {self.length} characters")
        return index if self.same else index + self._astral(0, index)

    def from_utf16(self, index16: int) -> int:
        """The code-point position of UTF-16 position ``index16``; :class:`SplitError` inside a pair."""
        if type(index16) is not int or not 0 <= index16 <= self.length16:
            raise OTError(f"position {index16!r} is outside a text of {self.length16} UTF-16 code units")
        return index16 if self.same else self._advance(0, index16)

    def _advance(self, start: int, units: int) -> int:
        """The code-point position ``units`` UTF-16 code units after code-point position ``start``.

        A binary search for the last position at most ``units`` away, each
        probe counting from the last one below: the counts add up to one pass.
        """
        lo, at_lo = start, 0
        hi = min(start + units, self.length)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            at_mid = at_lo + mid - lo + self._astral(lo, mid)
            if at_mid <= units:
                lo, at_lo = mid, at_mid
            else:
                hi = mid - 1
        if at_lo != units:  # the next character is a pair: ``units`` ends inside it
            ch = self.text[lo]
            raise SplitError(
                f"UTF-16 position {self.to_utf16(start) + units} is inside {ch!r} "
                f"(U+{ord(ch):04X}, a surrogate pair)"
            )
        return lo

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
        if self.same:
            return op
        out: Op = []
        pos = 0
        for c in op:
            if type(c) is str:
                out.append(c)
                continue
            end = pos + (c if c > 0 else -c)
            width = end - pos + self._astral(pos, end)
            out.append(width if c > 0 else -width)
            pos = end
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
        if self.same:
            return op16
        out: Op = []
        pos = 0
        for c in op16:
            if type(c) is str:
                out.append(c)
                continue
            try:
                end = self._advance(pos, c if c > 0 else -c)
            except SplitError as exc:
                raise SplitError(f"the edit would split a character: {exc}") from None
            out.append(end - pos if c > 0 else pos - end)
            pos = end
        return out
