"""realtime.units: code points <-> UTF-16 code units, for positions and ops.

The reference is a "JavaScript view" of a text: each astral character becomes
two BMP characters standing for its surrogate halves (private-use code points,
so the view is a valid ``str`` that ot.py accepts and ``len`` counts UTF-16
code units, as JavaScript's ``length`` does).  An op counted in UTF-16 units
must do to the view exactly what the code-point op does to the text.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from realtime import ot
from realtime.ot import OTError
from realtime.units import SplitError, TextUnits, inserted, same_shape, utf16_length

from .test_ot import ALPHABET, ops_on, texts

FAST = settings(max_examples=120, deadline=None)

_HIGH, _LOW = 0xE000, 0xE400  # stand-ins for the surrogate halves (not in ALPHABET)
_PAIR = re.compile("[\ue000-\ue3ff][\ue400-\ue7ff]")


def to_js(s: str) -> str:
    """The JavaScript view of ``s``: an astral character becomes its two halves."""
    out = []
    for ch in s:
        n = ord(ch) - 0x10000
        out.append(ch if n < 0 else chr(_HIGH + (n >> 10)) + chr(_LOW + (n & 0x3FF)))
    return "".join(out)


def from_js(s: str) -> str:
    return _PAIR.sub(lambda m: chr(0x10000 + ((ord(m[0][0]) - _HIGH) << 10) + ord(m[0][1]) - _LOW), s)


def js_op(op: list, convert=to_js) -> list:
    """``op`` with its inserted strings in (or, with ``from_js``, out of) the JavaScript view."""
    return [convert(c) if type(c) is str else c for c in op]


def test_the_reference_view() -> None:
    assert to_js("a😀b") == "a\ue03d\ue600b" and len(to_js("a😀b")) == 4 == utf16_length("a😀b")
    assert from_js(to_js("x👍🏽𝔸中")) == "x👍🏽𝔸中"
    assert any(utf16_length(ch) == 2 for ch in ALPHABET)


# -- examples ------------------------------------------------------------------------


def test_utf16_length() -> None:
    assert utf16_length("") == 0 and utf16_length("abc") == 3 and utf16_length("中é") == 2
    assert utf16_length("😀") == 2 and utf16_length("👍🏽") == 4 and utf16_length("a𝔸b") == 4


def test_positions() -> None:
    t = TextUnits("a😀b𝔸")
    assert (t.length, t.length16, t.same) == (4, 6, False)
    assert [t.to_utf16(i) for i in range(5)] == [0, 1, 3, 4, 6]
    assert [t.from_utf16(u) for u in (0, 1, 3, 4, 6)] == [0, 1, 2, 3, 4]
    for u in (2, 5):
        with pytest.raises(SplitError, match=f"UTF-16 position {u} is inside"):
            t.from_utf16(u)
    for bad in (-1, 7, True, 1.0, None):
        with pytest.raises(OTError, match="outside a text of 6 UTF-16 code units"):
            t.from_utf16(bad)  # type: ignore[arg-type]
    with pytest.raises(OTError, match="outside a text of 4 characters"):
        t.to_utf16(5)
    plain = TextUnits("中文 abc")
    assert plain.same and plain.length16 == plain.length == 6 and plain.from_utf16(3) == 3


def test_ops() -> None:
    t = TextUnits("a😀b")
    assert t.op_to_utf16([1, -1, "🎉", 1]) == [1, -2, "🎉", 1]
    assert t.op_from_utf16([1, "x", -2, 1]) == [1, "x", -1, 1]
    assert t.op_to_utf16([3]) == [4] and t.op_from_utf16([4]) == [3]
    with pytest.raises(SplitError, match="the edit would split a character: UTF-16 position 2 is inside '😀'"):
        t.op_from_utf16([2, "x", 2])
    with pytest.raises(SplitError):
        t.op_from_utf16([1, -1, 2])  # deletes half of the pair
    with pytest.raises(OTError, match="document of 3 UTF-16 code units, but this one has 4"):
        t.op_from_utf16([3])
    with pytest.raises(OTError, match="document of 4 characters, but this one has 3"):
        t.op_to_utf16([4])
    same = TextUnits("abc")
    op = [1, "😀", 2]
    assert same.op_to_utf16(op) is op and same.op_from_utf16(op) is op  # nothing to convert


def test_helpers() -> None:
    assert inserted([1, "a😀", -2, "b"]) == 3 and inserted([1, "a😀", -2, "b"], utf16_length) == 4
    assert same_shape([1, "x", -1], [2, "x", -2]) and same_shape([], [])
    assert not same_shape([1, "x"], [1, "y"]) and not same_shape([2], [1]) and not same_shape([1], [-1])
    assert not same_shape([1], [1, "x"]) and not same_shape(["x"], [1])


# -- properties ------------------------------------------------------------------------


@FAST
@given(texts)
def test_position_round_trip(text: str) -> None:
    t = TextUnits(text)
    view = to_js(text)
    assert t.length16 == len(view) == utf16_length(text)
    for i in range(len(text) + 1):
        u = t.to_utf16(i)
        assert u == len(to_js(text[:i]))
        assert t.from_utf16(u) == i
    splits = {m.start() + 1 for m in _PAIR.finditer(view)}
    for u in range(len(view) + 1):
        if u in splits:
            with pytest.raises(SplitError):
                t.from_utf16(u)
        else:
            assert t.to_utf16(t.from_utf16(u)) == u


@st.composite
def text_and_op(draw: st.DrawFn) -> tuple[str, list]:
    text = draw(texts)
    return text, draw(ops_on(len(text)))


@FAST
@given(text_and_op())
def test_an_op_in_utf16_does_to_the_view_what_it_does_to_the_text(case: tuple[str, list]) -> None:
    text, op = case
    op = ot.check(op)
    t = TextUnits(text)
    op16 = t.op_to_utf16(op)
    assert same_shape(op, op16) and ot.check(op16) == op16  # still in normal form
    assert ot.apply(to_js(text), js_op(op16)) == to_js(ot.apply(text, op))
    assert ot.lengths(op16, utf16_length) == (utf16_length(text), utf16_length(ot.apply(text, op)))
    assert t.op_from_utf16(op16) == op


@FAST
@given(texts, st.data())
def test_an_op_on_the_view_converts_unless_it_splits_a_pair(text: str, data: st.DataObject) -> None:
    view = to_js(text)
    op16 = data.draw(ops_on(len(view)))  # retains and deletes anywhere, pairs or not
    splits = {m.start() + 1 for m in _PAIR.finditer(view)}
    bounds, pos = set(), 0
    for c in op16:
        if type(c) is int:
            pos += abs(c)
            bounds.add(pos)
    t = TextUnits(text)
    if bounds & splits:
        with pytest.raises(SplitError):
            t.op_from_utf16(op16)
    else:
        op = t.op_from_utf16(op16)
        assert from_js(ot.apply(view, js_op(op16))) == ot.apply(text, op)


@FAST
@given(st.data())
def test_transform_commutes_with_the_conversion(data: st.DataObject) -> None:
    """Transforming in UTF-16 units gives the conversions of the code-point results (TP1 in both)."""
    text = data.draw(texts)
    a = ot.check(data.draw(ops_on(len(text))))
    b = ot.check(data.draw(ops_on(len(text))))
    a2, b2 = ot.transform(a, b)
    t = TextUnits(text)
    a16, b16 = t.op_to_utf16(a), t.op_to_utf16(b)
    after_a, after_b = TextUnits(ot.apply(text, a)), TextUnits(ot.apply(text, b))
    assert ot.transform(a16, b16, utf16_length) == (after_b.op_to_utf16(a2), after_a.op_to_utf16(b2))
    # and the cursor moves agree too
    index = data.draw(st.integers(0, len(text)))
    own = data.draw(st.booleans())
    moved = ot.transform_index(index, a, own=own)
    assert ot.transform_index(t.to_utf16(index), a16, own=own, size=utf16_length) == after_a.to_utf16(moved)
