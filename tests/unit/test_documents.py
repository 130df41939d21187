"""realtime.documents: submit over the log, dedupe, errors, snapshots, and a
simulated server with 2-5 clients whose messages arrive in random order."""

from __future__ import annotations

from collections import deque
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from realtime import ot
from realtime.documents import (
    DocumentState,
    LogEntry,
    SnapshotError,
    SubmitResult,
    valid_doc_id,
)
from realtime.ot import OTClient
from realtime.protocol import ProtocolError
from realtime.units import CODEPOINT, UTF16, TextUnits

from .test_ot import ops_on
from .test_units import from_js, js_op


def state_of(doc: DocumentState) -> dict[str, Any]:
    return doc.to_snapshot()


def make_doc(**limits: Any) -> DocumentState:
    doc = DocumentState("doc", **limits)
    doc.submit(0, ["hello"], "a", 1)  # rev 1: "hello"
    doc.submit(1, [5, " world"], "b", 1)  # rev 2: "hello world"
    return doc


# -- doc ids -------------------------------------------------------------------


@pytest.mark.parametrize("doc_id", ["a", "A-z_09", "x" * 64, "notes-2024_v2"])
def test_valid_doc_ids(doc_id: str) -> None:
    assert valid_doc_id(doc_id)


@pytest.mark.parametrize(
    "doc_id", ["", "x" * 65, "a b", "a/b", "..", "é", "a\n", "a.b", None, 12, b"ab"]
)
def test_invalid_doc_ids(doc_id: object) -> None:
    assert not valid_doc_id(doc_id)


def test_constructor_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="document id"):
        DocumentState("a/b")
    with pytest.raises(ValueError, match="lone surrogates"):
        DocumentState("d", "\ud800")
    with pytest.raises(ValueError, match="revision"):
        DocumentState("d", "", -1)
    with pytest.raises(ValueError, match="limits"):
        DocumentState("d", max_log=-1)


# -- submit --------------------------------------------------------------------


def test_submit_at_current_rev() -> None:
    doc = DocumentState("doc", "a😀b")
    result = doc.submit(0, [1, -1, "🎉", 1], "c1", 1)
    assert result == SubmitResult(1, [1, "🎉", -1, 1], False)  # in normal form: insert first
    assert doc.text == "a🎉b" and doc.rev == 1
    assert doc.log == [LogEntry(1, [1, "🎉", -1, 1], "c1", 1)]


def test_submit_transforms_over_the_log() -> None:
    doc = make_doc()
    # Based on rev 1 ("hello"): insert "!" at the end, where " world" went first.
    # The incoming insert goes first on the tie (ot.js and ShareDB's rule:
    # transform(incoming, logged)).
    result = doc.submit(1, [5, "!"], "a", 2)
    assert result.rev == 3 and result.op == [5, "!", 6]
    assert doc.text == "hello! world"
    # Based on rev 0 (""): it goes before every logged insert at 0.
    result = doc.submit(0, ["X"], "c", 1)
    assert result.op == ["X", 12] and doc.text == "Xhello! world"


def test_submit_normalizes_the_op() -> None:
    doc = DocumentState("doc", "abc")
    assert doc.submit(0, [1, 1, -1, "x", "y"]).op == [2, "xy", -1]  # merged, insert first


def test_noop_is_applied_and_counted() -> None:
    doc = make_doc()
    assert doc.submit(2, [11]) == SubmitResult(3, [11], False)
    assert doc.text == "hello world"


def test_duplicate_returns_original_rev_and_changes_nothing() -> None:
    doc = make_doc()
    before = state_of(doc)
    result = doc.submit(0, ["hello"], "a", 1)
    assert result == SubmitResult(1, ["hello"], True)
    assert state_of(doc) == before
    # Based on another rev, even one out of the window, it is still the same op.
    assert doc.submit(2, [11, "?"], "b", 1) == SubmitResult(2, [5, " world"], True)


def test_late_resend_of_an_older_seq_is_a_duplicate() -> None:
    doc = make_doc()
    doc.submit(2, [11, "!"], "a", 2)
    before = state_of(doc)
    # seq 1 of "a" arrives again (from a dead connection) after seq 2 was applied
    assert doc.submit(0, ["hello"], "a", 1) == SubmitResult(1, ["hello"], True)
    assert state_of(doc) == before


def test_late_resend_out_of_the_window_is_a_conflict() -> None:
    doc = make_doc(max_log=1)
    doc.submit(2, [11, "!"], "a", 2)
    before = state_of(doc)
    with pytest.raises(ProtocolError, match="no longer in the log") as info:
        doc.submit(0, ["hello"], "a", 1)
    assert info.value.code == "conflict" and state_of(doc) == before


def test_duplicate_of_an_op_out_of_the_window_has_no_op() -> None:
    doc = make_doc(max_log=1)
    assert doc.submit(0, ["hello"], "a", 1) == SubmitResult(1, None, True)


def test_ops_without_client_are_never_duplicates() -> None:
    doc = DocumentState("doc")
    doc.submit(0, ["a"])
    doc.submit(1, [1, "a"])
    assert doc.text == "aa" and doc.rev == 2


def test_prepare_changes_nothing() -> None:
    doc = make_doc()
    before = state_of(doc)
    assert doc.prepare(1, [5, "!"], "a", 2) == SubmitResult(3, [5, "!", 6], False)
    assert state_of(doc) == before


@pytest.mark.parametrize(
    "args, code, words",
    [
        ((-1, [11]), "bad_message", "rev must be"),
        ((True, [11]), "bad_message", "rev must be"),
        (("2", [11]), "bad_message", "rev must be"),
        ((2, [11], "", 1), "bad_message", "client id"),
        ((2, [11], 7, 1), "bad_message", "client id"),
        ((2, [11], "c", -1), "bad_message", "seq"),
        ((2, [11], "c", True), "bad_message", "seq"),
        ((2, "hi"), "bad_message", "must be a list"),
        ((2, [11, 0]), "bad_message", "component 1 is 0"),
        ((2, [11, "\udc00"]), "bad_message", "lone surrogate"),
        ((2, [10]), "bad_message", "document of 10 characters"),
        ((2, [12]), "bad_message", "document of 12 characters"),
        ((1, [4, "x"]), "bad_message", "does not fit rev 1"),
        ((0, [1]), "bad_message", "does not fit rev 0"),
        ((3, [11]), "conflict", "newer than the document"),
        ((2, [11, "x"], "a", 0), "conflict", "seq 0 is older than this client's last"),
        ((2, [11, "x" * 11]), "too_large", "inserts 11 characters"),
        ((2, [11, "x" * 10]), "too_large", "would have 21 characters"),
    ],
)
def test_errors_leave_the_document_unchanged(args: tuple, code: str, words: str) -> None:
    doc = make_doc(max_op_size=10, max_doc_size=20)
    before = state_of(doc)
    with pytest.raises(ProtocolError, match=words) as info:
        doc.submit(*args)
    assert info.value.code == code and info.value.message == str(info.value)
    assert code in repr(info.value)
    assert state_of(doc) == before


def test_too_old_base_is_a_conflict() -> None:
    doc = make_doc(max_log=1)
    assert doc.log_start == 1
    before = state_of(doc)
    with pytest.raises(ProtocolError, match="too old") as info:
        doc.submit(0, ["x"], "c", 1)
    assert info.value.code == "conflict"
    assert state_of(doc) == before
    assert doc.submit(1, [5, "!"]).op == [5, "!", 6]  # rev 1 is still in the window... was
    assert doc.log_start == 2


def test_shrinking_an_oversized_document_is_allowed() -> None:
    doc = DocumentState("doc", "x" * 30, max_doc_size=20)
    assert doc.submit(0, [-5, 25]).rev == 1
    with pytest.raises(ProtocolError) as info:
        doc.submit(1, ["y", 25])
    assert info.value.code == "too_large"


def test_log_window_is_trimmed() -> None:
    doc = DocumentState("doc", max_log=3)
    for i in range(10):
        doc.submit(i, ["x", i] if i else ["x"])
    assert doc.rev == 10 and len(doc.log) == 3
    assert [e.rev for e in doc.log] == [8, 9, 10]
    assert doc.log_start == 7


def test_ops_since() -> None:
    doc = make_doc()
    assert doc.ops_since(2) == []
    assert doc.ops_since(1) == [LogEntry(2, [5, " world"], "b", 1)]
    assert [e.rev for e in doc.ops_since(0) or []] == [1, 2]
    assert doc.ops_since(3) is None
    assert doc.ops_since(-1) is None
    assert doc.ops_since(True) is None  # type: ignore[arg-type]
    small = make_doc(max_log=1)
    assert small.ops_since(0) is None and small.ops_since(1) is not None


def test_transform_cursor() -> None:
    doc = make_doc()
    doc.submit(2, ["> ", 11])  # rev 3: "> hello world"
    assert doc.transform_cursor(3, 4) == 4
    assert doc.transform_cursor(2, 5) == 7
    assert doc.transform_cursor(1, 5) == 7  # " world" inserted at the cursor goes after it
    assert doc.transform_cursor(0, 0) == 0  # every insert at 0 went after the cursor
    assert doc.transform_cursor(4, 0) is None
    assert make_doc(max_log=1).transform_cursor(0, 0) is None
    for rev, index in [(3, 14), (1, 6), (1, -1), (2, "1")]:
        with pytest.raises(ProtocolError) as info:
            doc.transform_cursor(rev, index)  # type: ignore[arg-type]
        assert info.value.code == "bad_message"


def test_apply_entry() -> None:
    doc = make_doc()
    doc.apply_entry(3, [11, "!"], "z", 4)
    assert doc.text == "hello world!" and doc.rev == 3
    assert doc.submit(3, [12], "z", 4).duplicate
    before = state_of(doc)
    cases: list[tuple[tuple[Any, ...], str]] = [
        ((5, [12]), "conflict"),
        ((3, [12]), "conflict"),
        ((4, [11]), "bad_message"),
        ((4, [12, 0]), "bad_message"),
        ((4, [12], "", 1), "bad_message"),
    ]
    for args, code in cases:
        with pytest.raises(ProtocolError) as info:
            doc.apply_entry(*args)
        assert info.value.code == code
        assert state_of(doc) == before


def test_dedupe_table_is_bounded() -> None:
    doc = DocumentState("doc", max_clients=2)
    doc.submit(0, ["a"], "c1", 1)
    doc.submit(1, ["b", 1], "c2", 1)
    doc.submit(2, ["c", 2], "c3", 1)
    assert set(doc.to_snapshot()["clients"]) == {"c2", "c3"}
    assert not doc.submit(3, [3], "c1", 1).duplicate  # forgotten


# -- snapshots -------------------------------------------------------------------


def test_snapshot_round_trip() -> None:
    doc = make_doc()
    doc.submit(1, ["😀", 5], "a", 2)
    snap = doc.to_snapshot()
    assert snap["format"] == 1 and snap["rev"] == 3 and snap["text"] == "😀hello world"
    again = DocumentState.from_snapshot(snap)
    assert again.to_snapshot() == snap
    assert again.doc_id == "doc" and again.log == doc.log and again.log_start == 0
    # It behaves the same: dedupe and transform from an old rev both work.
    assert again.submit(1, ["😀", 5], "a", 2) == SubmitResult(3, ["😀", 11], True)
    assert again.submit(0, ["!"]).op == ["!", 12]  # the incoming insert at 0 goes first


def test_snapshot_without_log_or_older_fields() -> None:
    doc = make_doc()
    bare = DocumentState.from_snapshot(doc.to_snapshot(include_log=False))
    assert bare.text == doc.text and bare.rev == 2 and bare.log == [] and bare.log_start == 2
    assert bare.submit(0, ["a"], "a", 1).duplicate  # dedupe state survives
    minimal = DocumentState.from_snapshot({"format": 1, "doc_id": "d", "rev": 4, "text": "x"})
    assert minimal.rev == 4 and minimal.text == "x" and minimal.ops_since(4) == []


def test_snapshot_log_is_trimmed_to_max_log() -> None:
    snap = make_doc().to_snapshot()
    doc = DocumentState.from_snapshot(snap, max_log=1)
    assert [e.rev for e in doc.log] == [2]
    assert DocumentState.from_snapshot(snap, max_log=0).log == []


def test_snapshot_errors() -> None:
    good = make_doc().to_snapshot()

    def broken(**changes: Any) -> dict[str, Any]:
        return {**good, **changes}

    for data, words in [
        ([], "must be a dict"),
        (broken(format=2), "unsupported snapshot format 2"),
        ({k: v for k, v in good.items() if k != "format"}, "format None"),
        (broken(doc_id="a b"), "document id"),
        (broken(rev="2"), "revision"),
        (broken(text=5), "str"),
        (broken(log={}), "log must be a list"),
        (broken(log=good["log"] * 2), "longer than its revision"),
        (broken(log=[[2, [5, " world"], "b"]]), r"\[rev, op, client_id, seq\]"),
        (broken(log=[[1, [5, " world"], "b", 1]]), "not contiguous"),
        (broken(log=[[2, [5, 0], "b", 1]]), "bad snapshot log entry for rev 2"),
        (broken(log=[[2, [5, " world"], 3, 1]]), "bad snapshot log entry"),
        (broken(log=[[2, [5, " word"], "b", 1]]), "does not fit the text"),
        (broken(log=[[1, ["abcd"], "a", 1], [2, [5, " world"], "b", 1]]), "rev 1 does not fit"),
        (broken(clients=[]), "clients must be a dict"),
        (broken(clients={"a": [1]}), "dedupe entry for client 'a'"),
        (broken(clients={"a": [1, "2"]}), "dedupe entry"),
        (broken(clients={"": [1, 1]}), "client id"),
    ]:
        with pytest.raises(SnapshotError, match=words):
            DocumentState.from_snapshot(data)  # type: ignore[arg-type]


def test_snapshot_clients_are_trimmed() -> None:
    snap = make_doc().to_snapshot()
    assert list(DocumentState.from_snapshot(snap, max_clients=1).to_snapshot()["clients"]) == ["b"]


# -- clients counting UTF-16 code units -----------------------------------------------


def test_utf16_submit_is_converted_at_the_current_text() -> None:
    doc = DocumentState("doc", "a😀b")
    assert doc.length16 == 4
    result = doc.submit(0, [1, -2, "🎉", 1], "js", 1, units=UTF16)  # JS: delete the 2 units of 😀
    assert result == SubmitResult(1, [1, "🎉", -1, 1], False) and result.op16 == [1, "🎉", -2, 1]
    assert doc.text == "a🎉b" and doc.length16 == 4
    assert doc.ops_since(0, UTF16) == [LogEntry(1, [1, "🎉", -2, 1], "js", 1)]
    assert doc.ops_since(0) == [LogEntry(1, [1, "🎉", -1, 1], "js", 1)]


def test_utf16_op_is_transformed_in_utf16_units() -> None:
    doc = DocumentState("doc", "😀")
    doc.submit(0, ["👍🏽", 1], "py", 1)  # a code-point client prepends 2 characters, 4 units
    result = doc.submit(0, [2, "!"], "js", 1, units=UTF16)  # based on rev 0: after 😀 (2 units)
    assert result.op == [3, "!"] and result.op16 == [6, "!"]
    assert doc.text == "👍🏽😀!"
    # a tie in UTF-16 units (at the end of rev 1, where "!" went): the incoming op goes first
    result = doc.submit(1, [6, "X"], "js", 2, units=UTF16)
    assert doc.text == "👍🏽😀X!" and result.op16 == [6, "X", 1] and result.op == [3, "X", 1]


@pytest.mark.parametrize(
    "args, code, words",
    [
        ((0, [1, "x", 3]), "bad_message", "would split a character: UTF-16 position 1 is inside '😀'"),
        ((0, [-1, 3]), "bad_message", "would split a character"),
        ((0, [3]), "bad_message", "document of 3 UTF-16 code units, but rev 0 has 4"),
        ((0, [5]), "bad_message", "document of 5 UTF-16 code units"),
        ((0, [4, "😀😀😀"]), "too_large", "inserts 6 UTF-16 code units; the limit is 5"),
        ((0, [4, "x"]), "too_large", "would have 5 UTF-16 code units; the limit is 4"),
        ((1, [4]), "conflict", "newer than the document"),
    ],
)
def test_utf16_errors(args: tuple, code: str, words: str) -> None:
    doc = DocumentState("doc", "😀ab", max_op_size=5, max_doc_size=4)
    before = state_of(doc)
    with pytest.raises(ProtocolError, match=words) as info:
        doc.submit(*args, units=UTF16)
    assert info.value.code == code and state_of(doc) == before


def test_utf16_after_a_split_pair_was_deleted_concurrently() -> None:
    # The op splits 😀 at rev 0, but by the time it is applied 😀 is gone: nothing to split.
    doc = DocumentState("doc", "😀")
    doc.submit(0, [-1], "py", 1)
    assert doc.submit(0, [1, "x", 1], "js", 1, units=UTF16).op == ["x"]
    assert doc.text == "x"


def test_utf16_forms_survive_a_snapshot() -> None:
    doc = DocumentState("doc", "😀")
    doc.submit(0, [1, "a"], "py", 1)
    doc.submit(1, [-1, 1], "py", 2)  # rev 2: "a"; deleted the emoji
    doc.submit(2, [1, "b"], "py", 3)  # rev 3: "ab"; nothing astral left
    snap = doc.to_snapshot(include_log=False)
    assert snap["utf16"] == {"from": 0, "ops": [[1, [2, "a"]], [2, [-2, 1]]]}
    # the log is stored elsewhere (the editing service keeps it in op rows)
    again = DocumentState.from_snapshot({**snap, "log": doc.to_snapshot()["log"]})
    assert again.ops_since(0, UTF16) == doc.ops_since(0, UTF16)
    assert again.submit(0, [2, "!"], "js", 1, units=UTF16).op == ["!", 2]  # after the pair that went
    assert again.to_snapshot()["utf16"]["from"] == 0


def test_utf16_forms_unknown_after_an_older_snapshot() -> None:
    doc = DocumentState("doc", "😀")
    doc.submit(0, [1, "a"], "py", 1)
    old = {k: v for k, v in doc.to_snapshot().items() if k != "utf16"}
    again = DocumentState.from_snapshot(old)
    assert again.ops_since(0) is not None and again.ops_since(0, UTF16) is None
    assert again.ops_since(1, UTF16) == []
    with pytest.raises(ProtocolError, match="too old to merge in UTF-16 units") as info:
        again.submit(0, [2, "!"], "js", 1, units=UTF16)
    assert info.value.code == "conflict"
    again.submit(1, [3, "!"], "js", 1, units=UTF16)  # from the reload on, they are known
    assert again.to_snapshot()["utf16"]["from"] == 1


def test_snapshot_utf16_errors() -> None:
    doc = DocumentState("doc", "😀")
    doc.submit(0, [1, "a"], "py", 1)
    good = doc.to_snapshot()
    for utf16, words in [
        ([], "snapshot utf16 must be"),
        ({"from": "0", "ops": []}, "snapshot utf16 must be"),
        ({"from": 0, "ops": [[1]]}, r"must be \[rev, op\]"),
        ({"from": 0, "ops": [[1, [0]]]}, "bad snapshot utf16 entry for rev 1"),
        ({"from": 0, "ops": [[1, [1, "a"]]]}, "rev 1 does not fit the log"),
        ({"from": 0, "ops": [[1, [2, "b"]]]}, "rev 1 does not fit the log"),
        ({"from": 0, "ops": []}, "rev 1 does not fit the log"),  # not listed: same as [1, "a"]
    ]:
        with pytest.raises(SnapshotError, match=words):
            DocumentState.from_snapshot({**good, "utf16": utf16})


def test_unknown_units_are_a_programming_error() -> None:
    with pytest.raises(ValueError, match="units"):
        DocumentState("doc").submit(0, [], units="bytes")


# -- a server and several clients, messages in random order ------------------------


class SimClient:
    """One editor: its OTClient, its text, and its connections' message queues.

    A client with ``units="utf16"`` counts UTF-16 code units, as ot.js does: its
    text and ops are in the JavaScript view of tests/unit/test_units.py (where
    ``len`` counts code units), and only the inserted strings are converted on
    the way to and from the server.
    """

    def __init__(self, index: int, record: bool, units: str = CODEPOINT) -> None:
        self.id = f"c{index}"
        self.units = units
        self.ot = OTClient(0, self.id)
        self.text = ""
        self.conn = 0
        self.up: dict[int, deque] = {0: deque()}  # per connection: Pending ops in flight
        self.down: deque = deque()  # current connection only
        self.trace: list[list] | None = [] if record else None

    def call(self, method: str, *args: Any) -> Any:
        result = getattr(self.ot, method)(*args)
        if self.trace is not None:
            ot_client = self.ot
            state = [
                ot_client.rev,
                ot_client.outstanding,
                ot_client.outstanding_seq,
                ot_client.buffer,
                ot_client.next_seq,
            ]
            shown = list(result) if isinstance(result, tuple) else result
            self.trace.append([method, list(args), shown, state])
        return result

    def send(self, pending: ot.Pending | None) -> None:
        if pending is not None:
            self.up[self.conn].append(pending)

    def receive(self, msg: tuple) -> None:
        if msg[0] == "ack":
            if self.call("server_ack", msg[1]) is not None:
                self.send(self.call("pending"))
            return
        _, op, client_id, seq = msg
        if self.call("is_own", client_id, seq):
            if self.call("server_ack", seq) is not None:
                self.send(self.call("pending"))
        else:
            self.apply_server(op)

    def apply_server(self, op: list) -> None:
        """Apply a server op (in this client's units, inserts as sent)."""
        if self.units == UTF16:
            op = js_op(op)
        self.text = ot.apply(self.text, self.call("apply_server", op))

    @property
    def real_text(self) -> str:
        return from_js(self.text) if self.units == UTF16 else self.text


class Simulation:
    """A DocumentState as the server, SimClients, and lossless ordered connections."""

    def __init__(self, n_clients: int, record: bool = False, units: list[str] | None = None) -> None:
        self.doc = DocumentState("sim", max_log=100_000)
        units = units or [CODEPOINT] * n_clients
        self.clients = [SimClient(i, record, units[i]) for i in range(n_clients)]

    def edit(self, client: SimClient, op: list) -> None:
        """A local edit; ``op`` counts code points of the client's real text."""
        if client.units == UTF16:
            op = js_op(TextUnits(client.real_text).op_to_utf16(ot.check(op)))
        client.text = ot.apply(client.text, op)
        if client.call("apply_client", op):
            client.send(client.call("pending"))

    def deliver_up(self, client: SimClient, conn: int) -> None:
        pending = client.up[conn].popleft()
        op = js_op(pending.op, from_js) if client.units == UTF16 else pending.op
        result = self.doc.submit(pending.rev, op, client.id, pending.seq, units=client.units)
        if conn == client.conn:  # replies to a dead connection are lost
            client.down.append(("ack", pending.seq))
        if result.duplicate:
            return
        for other in self.clients:
            if other is not client or other.conn != conn:
                sent = result.op16 if other.units == UTF16 else result.op
                other.down.append(("op", sent, client.id, pending.seq))

    def reconnect(self, client: SimClient, keep_in_flight: bool) -> None:
        """Drop the connection, open a new one, catch up, resend."""
        client.down.clear()
        if not keep_in_flight:
            client.up[client.conn].clear()
        client.conn += 1
        client.up[client.conn] = deque()
        entries = self.doc.ops_since(client.ot.rev, client.units)
        assert entries is not None
        for entry in entries:
            if client.call("is_own", entry.client_id, entry.seq):
                client.call("server_ack", entry.seq)  # what follows is sent by resend()
            else:
                client.apply_server(entry.op)
        client.send(client.call("resend"))

    def drain(self) -> None:
        busy = True
        while busy:
            busy = False
            for client in self.clients:
                for conn, queue in list(client.up.items()):
                    while queue:
                        self.deliver_up(client, conn)
                        busy = True
                while client.down:
                    client.receive(client.down.popleft())
                    busy = True

    def assert_converged(self) -> None:
        for client in self.clients:
            assert client.ot.state == "synchronized"
            assert client.ot.rev == self.doc.rev
            assert client.real_text == self.doc.text


def run_simulation(data: st.DataObject, record: bool = False) -> Simulation:
    """2-5 clients, each counting code points or UTF-16 units, in a random interleaving."""
    n = data.draw(st.integers(2, 5), label="clients")
    units = data.draw(st.lists(st.sampled_from([CODEPOINT, UTF16]), min_size=n, max_size=n), label="units")
    sim = Simulation(n, record, units)
    # One draw per step (who, what): hypothesis draws cost more than the step itself.
    kinds = ["edit", "edit", "edit", "up", "up", "down", "down", "down", "reconnect"]
    steps = st.tuples(st.integers(0, len(sim.clients) - 1), st.sampled_from(kinds))
    for _ in range(data.draw(st.integers(0, 40), label="steps")):
        who, action = data.draw(steps)
        client = sim.clients[who]
        if action == "edit":
            sim.edit(client, data.draw(ops_on(len(client.real_text))))
        elif action == "up":
            busy = [conn for conn, queue in client.up.items() if queue]
            if busy:
                sim.deliver_up(client, data.draw(st.sampled_from(busy)))
        elif action == "down":
            if client.down:
                client.receive(client.down.popleft())
        else:
            sim.reconnect(client, keep_in_flight=data.draw(st.booleans()))
    sim.drain()
    sim.assert_converged()
    return sim


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_clients_converge_whatever_the_delivery_order(data: st.DataObject) -> None:
    run_simulation(data)


def test_simulation_example_with_concurrent_inserts() -> None:
    sim = Simulation(2)
    a, b = sim.clients
    sim.edit(a, ["A"])
    sim.edit(b, ["B"])
    sim.edit(a, [1, "a"])  # buffered
    sim.deliver_up(b, 0)  # B reaches the server first ...
    sim.deliver_up(a, 0)  # ... so A, submitted later, goes first on the tie at 0
    sim.drain()
    sim.assert_converged()
    assert sim.doc.text == "AaB"


def test_simulation_resend_after_lost_ack_is_not_applied_twice() -> None:
    sim = Simulation(2)
    a, _ = sim.clients
    sim.edit(a, ["x"])
    sim.deliver_up(a, 0)  # applied; the ack is in a.down ...
    sim.reconnect(a, keep_in_flight=False)  # ... and lost: the catch-up acks it
    assert a.ot.state == "synchronized"
    sim.edit(a, [1, "y"])
    sim.reconnect(a, keep_in_flight=True)  # old connection still delivers "y"
    sim.drain()
    sim.assert_converged()
    assert sim.doc.text == "xy" and sim.doc.rev == 2


def test_simulation_late_resend_from_a_dead_connection() -> None:
    # Found by a long hypothesis run: seq 1 is sent on three connections; the
    # first copy is applied, then seq 2, then the copy on connection 1 arrives.
    sim = Simulation(2)
    a, _ = sim.clients
    sim.edit(a, ["a"])
    sim.reconnect(a, keep_in_flight=True)
    sim.edit(a, [-1])
    sim.reconnect(a, keep_in_flight=True)
    sim.deliver_up(a, 0)  # seq 1 applied; a learns it from the broadcast, sends seq 2
    a.receive(a.down.popleft())
    sim.deliver_up(a, 2)  # the resend of seq 1: duplicate
    sim.deliver_up(a, 2)  # seq 2
    sim.deliver_up(a, 1)  # the copy of seq 1 from connection 1: still a duplicate
    sim.drain()
    sim.assert_converged()
    assert sim.doc.text == "" and sim.doc.rev == 2


def test_rollback_undoes_the_tail_and_the_dedupe_of_its_ops() -> None:
    doc = DocumentState("d", "ab", max_log=10)
    doc.submit(0, [2, "c"], "c-one1", 1)  # rev 1: abc
    doc.submit(1, [3, "😀"], "c-two2", 1)  # rev 2: abc😀
    doc.submit(2, [1, -1, 2], "c-one1", 2)  # rev 3: ac😀
    undone = doc.rollback(1, "abc")
    assert [(e.rev, e.client_id, e.seq) for e in undone] == [(2, "c-two2", 1), (3, "c-one1", 2)]
    assert (doc.rev, doc.text, doc.length16) == (1, "abc", 3)
    assert not doc.seen("c-one1", 2) and doc.seen("c-one1", 1) and not doc.seen("c-two2", 1)
    # What another node appended instead goes on, then ours again (transformed by the caller).
    doc.apply_entry(2, ["x", 3], "c-far3", 1)
    assert doc.submit(2, [4, "!"], "c-two2", 1).rev == 3 and doc.text == "xabc!"
    with pytest.raises(ProtocolError):
        doc.rollback(-1, "")
