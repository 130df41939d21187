"""realtime.ot: examples, every OTError path, and properties (TP1, compose, check, cursors)."""

from __future__ import annotations

from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from realtime import ot
from realtime.ot import OTClient, OTError

FAST = settings(max_examples=80, deadline=None)

# Single code points, astral ones included; the sentinel "\0" used below is not one.
ALPHABET = ["a", "b", " ", "\n", "é", "中", "\u0301", "\u200d", "😀", "👍", "🏽", "𝔸"]
texts = st.text(alphabet=st.sampled_from(ALPHABET), max_size=24)
inserts = st.text(alphabet=st.sampled_from(ALPHABET), min_size=1, max_size=5)


@st.composite
def ops_on(draw: st.DrawFn, size: int) -> list:
    """A valid op for a document of ``size`` code points, often not in normal form."""
    op: list = []
    left = size
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from("rdi"))
        if kind == "i":
            op.append(draw(inserts))
        elif left:
            n = draw(st.integers(1, left))
            left -= n
            op.append(n if kind == "r" else -n)
    if left:
        op.append(left if draw(st.booleans()) else -left)
    return op


@st.composite
def doc_and_op(draw: st.DrawFn) -> tuple[str, list]:
    text = draw(texts)
    return text, draw(ops_on(len(text)))


@st.composite
def doc_and_two_ops(draw: st.DrawFn) -> tuple[str, list, list]:
    text = draw(texts)
    return text, draw(ops_on(len(text))), draw(ops_on(len(text)))


def is_normal(op: list) -> bool:
    """No empty components, no two of a kind in a row, never a delete before an insert."""
    kinds = ["i" if type(c) is str else "r" if c > 0 else "d" for c in op]
    if any(c == 0 or c == "" for c in op):
        return False
    return all(x != y and (x, y) != ("d", "i") for x, y in pairwise(kinds))


# -- examples ----------------------------------------------------------------


def test_apply_examples_count_code_points() -> None:
    assert ot.apply("", []) == ""
    assert ot.apply("", ["😀"]) == "😀"
    assert ot.apply("a😀b", [1, -1, "🎉", 1]) == "a🎉b"
    assert ot.apply("👍🏽x", [2, "!", 1]) == "👍🏽!x"
    assert ot.apply("hello", [5]) == "hello"
    assert ot.apply("hello", ["H", -1, 4]) == "Hello"
    assert ot.apply("𝔸𝔸𝔸", [-3]) == ""
    # valid but not normal: still accepted
    assert ot.apply("abc", [1, 1, -1, "x", "y"]) == "abxy"


def test_check_normalizes() -> None:
    assert ot.check([]) == []
    assert ot.check((1, 2)) == [3]
    # between two retains: one insert, then one delete (ot.js's canonical order)
    assert ot.check([1, 2, "a", "b", -1, -2, "c", 3]) == [3, "abc", -3, 3]
    assert ot.check([-1, "x"]) == ["x", -1] == ot.check(["x", -1])
    assert ot.check([-1, "a", -1, "b", 1, -1]) == ["ab", -2, 1, -1]
    assert ot.check(["😀", "👍"]) == ["😀👍"]
    op = [2, "x", -1, 1]
    assert ot.check(op) == op and ot.check(op) is not op


def test_lengths() -> None:
    assert ot.lengths([2, "😀a", -3, 1]) == (6, 5)
    assert ot.base_length([2, "😀a", -3, 1]) == 6
    assert ot.target_length([2, "😀a", -3, 1]) == 5
    assert ot.lengths([]) == (0, 0)


def test_is_noop() -> None:
    assert ot.is_noop([]) and ot.is_noop([4]) and ot.is_noop([1, 3])
    assert not ot.is_noop([1, "a"]) and not ot.is_noop([-1])


def test_compose_example() -> None:
    a = [1, "x", 4]
    b = [2, "z", -2, 2]
    assert ot.compose(a, b) == [1, "xz", -2, 2]
    assert ot.compose(["abc"], [1, -1, 1]) == ["ac"]
    assert ot.compose(["😀😀"], [-1, 1]) == ["😀"]


def test_transform_tie_break_a_first() -> None:
    a, b = [1, "A", 1], [1, "B", 1]
    a2, b2 = ot.transform(a, b)
    assert ot.apply(ot.apply("xy", a), b2) == "xABy"
    assert ot.apply(ot.apply("xy", b), a2) == "xABy"
    b2, a2 = ot.transform(b, a)
    assert ot.apply(ot.apply("xy", a), b2) == "xBAy"


def test_transform_insert_vs_delete() -> None:
    a, b = [1, "😀", 2], [-3]
    a2, b2 = ot.transform(a, b)
    assert a2 == ["😀"] and b2 == [-1, 1, -2]
    assert ot.apply(ot.apply("abc", a), b2) == "😀" == ot.apply(ot.apply("abc", b), a2)


def test_transform_overlapping_deletes() -> None:
    a, b = [-2, 2], [1, -2, 1]
    a2, b2 = ot.transform(a, b)
    assert a2 == [-1, 1] and b2 == [-1, 1]
    assert ot.apply(ot.apply("abcd", a), b2) == "d"


def test_transform_index_examples() -> None:
    op = [2, "😀😀", -1, 2]  # "abcde" -> "ab😀😀de"
    assert ot.transform_index(0, op) == 0
    assert ot.transform_index(2, op) == 2
    assert ot.transform_index(2, op, own=True) == 4
    assert ot.transform_index(3, op) == 4  # just after the deleted "c" -> after the insert
    assert ot.transform_index(5, op) == 6
    assert ot.transform_index(0, []) == 0
    assert ot.transform_index(0, ["x"]) == 0
    assert ot.transform_index(0, ["x"], own=True) == 1


def test_diff_to_op_examples() -> None:
    assert ot.diff_to_op("", "") == []
    assert ot.diff_to_op("abc", "abc") == [3]
    assert ot.diff_to_op("abc", "abXc") == [2, "X", 1]
    assert ot.diff_to_op("a😀b", "a😁b") == [1, "😁", -1, 1]
    assert ot.diff_to_op("aa", "aaa") == [2, "a"]
    assert ot.diff_to_op("abc", "") == [-3]


# -- every OTError path --------------------------------------------------------


@pytest.mark.parametrize(
    "op, words",
    [
        ("abc", "must be a list"),
        ({"r": 1}, "must be a list"),
        (None, "must be a list"),
        ([0], "component 0 is 0"),
        ([1, ""], "component 1 is an empty string"),
        ([True], "boolean"),
        ([1, False], "boolean"),
        ([1.0], "float"),
        ([None], "NoneType"),
        ([[1]], "list"),
        (["ok", "\ud800"], "lone surrogate"),
        (["\udc00x"], "lone surrogate"),
    ],
)
def test_check_rejects(op: object, words: str) -> None:
    with pytest.raises(OTError, match=words):
        ot.check(op)


def test_oterror_is_valueerror() -> None:
    assert issubclass(OTError, ValueError)


@pytest.mark.parametrize("op", [[0], [""], [True], [1.5], ["a", None]])
def test_every_function_rejects_bad_components(op: list) -> None:
    with pytest.raises(OTError):
        ot.lengths(op)
    with pytest.raises(OTError):
        ot.apply("a", op)
    with pytest.raises(OTError):
        ot.compose(op, op)
    with pytest.raises(OTError):
        ot.transform(op, op)
    with pytest.raises(OTError):
        ot.transform_index(0, op)


def test_lengths_rejects_non_list() -> None:
    with pytest.raises(OTError, match="must be a list"):
        ot.lengths("abc")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text, op",
    [
        ("abc", [2]),  # too short: no implicit trailing retain
        ("abc", []),
        ("abc", [4]),
        ("abc", [2, -2]),
        ("😀", [2]),  # one code point, two UTF-16 units
        ("", [1]),
        ("", [-1]),
        ("ab", ["x", 1]),
    ],
)
def test_apply_length_mismatch(text: str, op: list) -> None:
    with pytest.raises(OTError, match="characters"):
        ot.apply(text, op)


def test_compose_length_mismatch() -> None:
    with pytest.raises(OTError, match="cannot compose"):
        ot.compose([1, "x"], [1])


def test_transform_length_mismatch() -> None:
    with pytest.raises(OTError, match="cannot transform"):
        ot.transform([1], [2])


@pytest.mark.parametrize("index", [-1, 4, True, 1.0, None])
def test_transform_index_out_of_range(index: object) -> None:
    with pytest.raises(OTError, match="cursor position"):
        ot.transform_index(index, [3])  # type: ignore[arg-type]


# -- properties ------------------------------------------------------------------


@FAST
@given(doc_and_op())
def test_check_is_idempotent_and_keeps_meaning(case: tuple[str, list]) -> None:
    text, op = case
    normal = ot.check(op)
    assert ot.check(normal) == normal
    assert is_normal(normal)
    assert ot.apply(text, normal) == ot.apply(text, op)
    assert ot.lengths(normal) == ot.lengths(op) == (len(text), len(ot.apply(text, op)))
    with pytest.raises(OTError):  # whole-document rule
        ot.apply(text + "z", op)
    if text:
        with pytest.raises(OTError):
            ot.apply(text[1:], op)


@FAST
@given(doc_and_two_ops())
def test_transform_converges_tp1(case: tuple[str, list, list]) -> None:
    text, a, b = case
    a2, b2 = ot.transform(a, b)
    both = ot.apply(ot.apply(text, a), b2)
    assert both == ot.apply(ot.apply(text, b), a2)
    assert is_normal(a2) and is_normal(b2)
    # compose(a, b') and compose(b, a') are the same edit.
    assert ot.apply(text, ot.compose(a, b2)) == both == ot.apply(text, ot.compose(b, a2))
    # What server and clients transform: ops in normal form (check, apply_client).
    na2, nb2 = ot.transform(ot.check(a), ot.check(b))
    assert ot.apply(ot.apply(text, a), nb2) == ot.apply(ot.apply(text, b), na2)
    assert ot.check(na2) == na2 and ot.check(nb2) == nb2


@FAST
@given(st.data())
def test_compose_matches_sequential_apply(data: st.DataObject) -> None:
    text = data.draw(texts)
    a = data.draw(ops_on(len(text)))
    middle = ot.apply(text, a)
    b = data.draw(ops_on(len(middle)))
    ab = ot.compose(a, b)
    assert ot.apply(text, ab) == ot.apply(middle, b)
    assert is_normal(ab)
    assert ot.lengths(ab) == (len(text), len(ot.apply(middle, b)))


def with_cursor(op: list, index: int, own: bool) -> list:
    """``op`` for the text with a one-character sentinel inserted at ``index``."""
    out: list = []
    pos = 0
    placed = False
    for c in op:
        if not placed and pos == index and (not own or type(c) is not str):
            out.append(1)
            placed = True
        if not placed and type(c) is int and pos < index < pos + abs(c):
            k = index - pos
            sign = 1 if c > 0 else -1
            out += [sign * k, 1, sign * (abs(c) - k)]
            placed = True
            pos += abs(c)
            continue
        out.append(c)
        if type(c) is int:
            pos += abs(c)
    if not placed:
        out.append(1)
    return out


@FAST
@given(doc_and_op(), st.integers(0, 30), st.booleans())
def test_transform_index_follows_a_marked_character(
    case: tuple[str, list], index: int, own: bool
) -> None:
    text, op = case
    index = min(index, len(text))
    marked = text[:index] + "\0" + text[index:]
    for form in (op, ot.check(op)):  # normalising may move a cursor next to a replaced span
        expected = ot.apply(marked, with_cursor(form, index, own)).index("\0")
        assert ot.transform_index(index, form, own=own) == expected


def test_transform_index_around_a_replaced_span() -> None:
    # Replacing "c" of "abcd" by "X": the order of the two components decides on
    # which side of "X" a cursor right after "c" ends up (diff_to_op inserts first).
    assert ot.transform_index(3, [2, "X", -1, 1]) == 3
    assert ot.transform_index(3, [2, -1, "X", 1]) == 2


@FAST
@given(texts, texts)
def test_diff_to_op(old: str, new: str) -> None:
    op = ot.diff_to_op(old, new)
    assert ot.apply(old, op) == new
    assert is_normal(op)
    assert len([c for c in op if type(c) is not int or c < 0]) <= 2


# -- OTClient ---------------------------------------------------------------------


def test_client_states() -> None:
    c = OTClient(5, "me")
    assert c.state == "synchronized" and c.pending() is None
    assert c.apply_client([1, "a"]) is True
    assert c.state == "awaiting_confirm"
    assert c.pending() == (5, [1, "a"], 1)
    assert c.apply_client([2, "b"]) is False
    assert c.apply_client([3, "c"]) is False
    assert c.state == "awaiting_with_buffer" and c.buffer == [2, "bc"]
    assert c.is_own("me", 1) and not c.is_own("me", 2) and not c.is_own("you", 1)
    assert c.server_ack(seq=7) is None  # not ours: ignored
    assert c.rev == 5
    assert c.server_ack(1) == [2, "bc"]
    assert c.rev == 6 and c.pending() == (6, [2, "bc"], 2)
    assert c.resend() == c.pending()
    assert c.server_ack() is None
    assert c.state == "synchronized" and c.rev == 7
    assert c.server_ack() is None and c.rev == 7  # stray ack: ignored


def test_client_puts_its_own_pending_edits_first_on_a_tie() -> None:
    # Local "x" -> "xL" pending, "!" buffered; the server first applied another's "xS".
    c = OTClient(0, "me")
    local = "x"
    op = [1, "L"]
    local = ot.apply(local, op)
    c.apply_client(op)
    c.apply_client([2, "!"])
    local = ot.apply(local, [2, "!"])
    server_op = c.apply_server([1, "S"])
    local = ot.apply(local, server_op)
    # ot.js's rule: our ops reach the server after "S", so on the tie they go first.
    assert local == "xL!S"
    assert c.rev == 1 and c.outstanding == [1, "L", 1] and c.buffer == [2, "!", 1]
    # ... and the server, transforming our op over "S" when it arrives, agrees.
    server = ot.apply("x", [1, "S"])
    server = ot.apply(server, ot.transform([1, "L"], [1, "S"])[0])
    assert ot.apply(server, c.buffer) == local
    # server text "xS": a cursor at 1 stays before our "L", one at its end follows "L!"
    assert c.transform_cursor(1) == 1 and c.transform_cursor(2) == 4


def test_client_keeps_its_ops_in_normal_form() -> None:
    c = OTClient(0, "me")
    c.apply_client([1, -1, "x", 1])
    assert c.outstanding == [1, "x", -1, 1]
    with pytest.raises(OTError):
        c.apply_client([0])


def test_client_without_id_never_owns() -> None:
    c = OTClient()
    c.apply_client(["a"])
    assert not c.is_own(None, 1)
