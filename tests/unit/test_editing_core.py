"""realtime.editing without sockets: storage functions on an in-memory SQLite,
the subscriber filter, and the commit pipeline over a store whose commits the
test decides (acks only after commit, in rev order; a failed commit closes the
peers and never leaves a gap)."""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import dataclass, field
from typing import Any

import pytest
import ujson
from hypothesis import given, settings
from hypothesis import strategies as st

from realtime import editing, ot
from realtime.auth import Identity
from realtime.backplane.memory import MemoryBackplane
from realtime.documents import DocumentState, SnapshotError
from realtime.editing import (
    EditingService,
    Peer,
    build_state,
    move_positions,
    pick_color,
    valid_client_id,
)
from realtime.hub import Hub
from realtime.limits import TokenBucket
from realtime.ot import OTClient
from realtime.protocol import Outgoing, ProtocolError
from realtime.storage import sqlite_repos as repos
from realtime.storage.base import Loaded, LogGap, StoreBusy, StoredOp, TooManyDocuments
from realtime.storage.sqlite import SQLiteStore
from realtime.storage.sqlite_repos import DOCS_SCHEMA, SQLiteDocumentLog
from realtime.units import CODEPOINT, UTF16, TextUnits

from .test_units import from_js, js_op

# -- small pure helpers ------------------------------------------------------------


def test_client_ids() -> None:
    for _ in range(20):
        assert valid_client_id(editing.new_client_id())
    for bad in ["", "c-", "c-abc", "x-abcdef", "c-abc def", "c-" + "a" * 41, None, 5, "c-ab/cd"]:
        assert not valid_client_id(bad)
    assert valid_client_id("c-abcd") and valid_client_id("c-" + "a" * 40)


def test_pick_color_prefers_the_least_used() -> None:
    assert pick_color(iter([])) == 0
    assert pick_color(iter([0, 1, 2])) == 3
    assert pick_color(iter(range(8))) == 0
    assert pick_color(iter([0, 0, 1, 1, 2, 3, 4, 5, 6, 7])) == 2


def doc_with(*ops: list[Any], text: str = "") -> DocumentState:
    doc = DocumentState("d", text, max_log=10)
    for i, op in enumerate(ops):
        doc.submit(doc.rev, op, "c-test", i + 1)
    return doc


def test_move_positions_through_the_log() -> None:
    doc = doc_with(["hello world"], ["¡", 11], [7, -5, "there"])  # rev 3: "¡hello there"
    assert doc.text == "¡hello there"
    assert doc.log[-1].op == [7, "there", -5]  # normal form: the insert goes first
    # Text inserted exactly at a position goes after it: (0 stays before "¡").
    assert move_positions(doc, 1, (0, 1, 11), 3) == (0, 2, 12)
    # Inside the replaced "world": at the end of "there", which was inserted before it
    assert move_positions(doc, 1, (6, 9), 3) == (7, 12)
    assert move_positions(doc, 1, (6,), 2) == (7,)  # only up to rev 2
    assert move_positions(doc, 3, (12,), 3) == (12,)
    with pytest.raises(ProtocolError) as e:
        move_positions(doc, 1, (12,), 3)
    assert e.value.code == "bad_message"
    with pytest.raises(ProtocolError):
        move_positions(doc, 3, (-1,), 3)
    with pytest.raises(ProtocolError):
        move_positions(doc, 3, (True,), 3)  # type: ignore[arg-type]
    assert move_positions(doc, 4, (0,), 4) is None  # from the future
    small = DocumentState("d", max_log=1)
    small.submit(0, ["a"], "c-x", 1)
    small.submit(1, [1, "b"], "c-x", 2)
    assert move_positions(small, 0, (0,), 2) is None  # older than the log


# -- storage functions ------------------------------------------------------------------


@pytest.fixture
def conn() -> sqlite3.Connection:
    c = sqlite3.connect(":memory:", isolation_level=None)
    SQLiteStore._migrate(c, [DOCS_SCHEMA])
    return c


def rows_for(doc: DocumentState, first: int) -> list[StoredOp]:
    return [StoredOp(e.rev, ujson.dumps(e.op), e.client_id, e.seq, "u1") for e in doc.log if e.rev >= first]


def test_load_creates_once_and_respects_max_docs(conn: sqlite3.Connection) -> None:
    assert repos.load_doc_rows("d", False, 10, 5, conn) is None
    loaded = repos.load_doc_rows("d", True, 10, 5, conn)
    assert loaded is not None and (loaded.rev, loaded.snapshot, loaded.ops) == (0, None, [])
    assert repos.load_doc_rows("d", True, 1, 5, conn).rev == 0  # type: ignore[union-attr]  # exists: fine
    with pytest.raises(TooManyDocuments):
        repos.load_doc_rows("e", True, 1, 5, conn)
    assert repos.load_doc_rows("e", True, 0, 5, conn) is not None  # 0 = no limit


def test_write_refuses_a_gap_and_snapshots_trim_the_log(conn: sqlite3.Connection) -> None:
    repos.load_doc_rows("d", True, 0, 3, conn)
    doc = doc_with(*([["x"]] + [[i, "y"] for i in range(1, 10)]))  # rev 10
    with pytest.raises(LogGap):
        repos.write_doc_ops("d", rows_for(doc, 2), 10, 1, [], 3, conn)  # rev 1 is missing
    repos.write_doc_ops("d", rows_for(doc, 1)[:6], 6, 1, [(6, '{"rev": 6}')], 3, conn)
    assert [r[0] for r in conn.execute("SELECT rev FROM doc_ops")] == [4, 5, 6]  # 3 before rev 6
    repos.write_doc_ops("d", rows_for(doc, 7), 10, 2, [], 3, conn)
    assert [r[0] for r in conn.execute("SELECT rev FROM doc_ops")] == [4, 5, 6, 7, 8, 9, 10]
    assert conn.execute("SELECT rev, length, updated FROM docs").fetchone() == (10, 10, 2)
    assert not repos.write_doc_snapshot("d", 9, "{}", 3, conn)  # not the stored rev: refused
    assert repos.write_doc_snapshot("d", 10, "{}", 3, conn)
    assert [r[0] for r in conn.execute("SELECT rev FROM doc_snapshots")] == [10]
    assert [r[0] for r in conn.execute("SELECT rev FROM doc_ops")] == [8, 9, 10]


def test_build_state_round_trip(conn: sqlite3.Connection) -> None:
    repos.load_doc_rows("d", True, 0, 4, conn)
    doc, log = _replay(12)
    state9, _ = _replay(9)
    rows = [StoredOp(r, ujson.dumps(op), c, s, "u-" + c) for r, op, c, s in log]
    repos.write_doc_ops("d", rows[:5], 5, 1, [], 4, conn)
    snapshot = ujson.dumps(state9.to_snapshot(include_log=False), ensure_ascii=False)
    repos.write_doc_ops("d", rows[5:9], 9, 1, [(9, snapshot)], 4, conn)
    repos.write_doc_ops("d", rows[9:], 12, 1, [], 4, conn)
    loaded = repos.load_doc_rows("d", False, 0, 4, conn)
    assert loaded is not None and loaded.snapshot is not None and loaded.snapshot[0] == 9
    assert [op[0] for op in loaded.ops] == [6, 7, 8, 9, 10, 11, 12]  # 4 before the snapshot, all after
    state, snap_rev, owners = build_state("d", loaded, max_log=4)
    assert (state.rev, state.text, snap_rev) == (doc.rev, doc.text, 9)
    assert [e.rev for e in state.log] == [9, 10, 11, 12]
    assert state.to_snapshot()["clients"] == doc.to_snapshot()["clients"]
    assert owners == {"c-0": "u-c-0", "c-1": "u-c-1", "c-2": "u-c-2"}
    # The dedupe table survived: a resend of the last op is a duplicate.
    last = log[-1]
    assert state.submit(last[0] - 1, last[1], last[2], last[3]).duplicate


def _replay(n: int) -> tuple[DocumentState, list[tuple[int, list[Any], str, int]]]:
    doc = DocumentState("d", max_log=100)
    for i in range(n):
        doc.submit(doc.rev, [len(doc.text), "😀%d" % i] if doc.text else ["😀0"], "c-%d" % (i % 3), i // 3 + 1)
    return doc, [(e.rev, e.op, e.client_id, e.seq) for e in doc.log]  # type: ignore[misc]


def test_build_state_refuses_inconsistent_data() -> None:
    ops: list[Any] = [(1, '["ab"]', "c-a", 1, "u"), (3, '[2, "c"]', "c-a", 2, "u")]
    with pytest.raises(SnapshotError, match="does not replay"):
        build_state("d", Loaded(3, 0, None, ops))
    with pytest.raises(SnapshotError, match="ends at rev 1"):
        build_state("d", Loaded(2, 0, None, ops[:1]))
    with pytest.raises(SnapshotError, match="format"):
        build_state("d", Loaded(1, 0, (1, 99, "{}"), []))
    with pytest.raises(SnapshotError, match="does not match"):
        build_state("d", Loaded(1, 0, (1, 1, '{"rev": 2}'), []))


# -- the subscriber filter ----------------------------------------------------------------


@dataclass
class FakeMember:
    user: Identity = field(default_factory=lambda: Identity("u1", "ann", frozenset({"edit"})))
    got: list[dict[str, Any]] = field(default_factory=list)
    closed_with: tuple[int | None, str | None] | None = None
    outs: list[Outgoing] = field(default_factory=list)

    def deliver(self, out: Outgoing) -> None:
        self.got.append(ujson.loads(out.text))
        self.outs.append(out)

    def send(self, obj: dict[str, Any]) -> None:
        self.deliver(Outgoing(obj))

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        self.closed_with = (code, reason)

    def types(self) -> list[str]:
        return [m["type"] for m in self.got]


def published(m: dict[str, Any]) -> Outgoing:
    """As the service publishes it: the rev as seq and the client travel beside the payload."""
    return Outgoing(m, seq=m.get("rev"), client=m.get("client"))


def test_peer_holds_then_filters() -> None:
    member = FakeMember()
    live = editing.LiveDoc(DocumentState("d"), 0, {}, 0)
    peer = Peer(member, live, "c-mine", 0, TokenBucket(0, 1))
    msgs: list[dict[str, Any]] = [
        {"type": "op", "rev": 1, "op": ["a"], "client": "c-other", "seq": 1},
        {"type": "op", "rev": 2, "op": [1, "b"], "client": "c-other", "seq": 2},
        {"type": "op", "rev": 3, "op": [2, "c"], "client": "c-mine", "seq": 1},
        {"type": "cursor", "rev": 0, "client": "c-other", "anchor": 0, "head": 0},
        {"type": "cursor", "rev": 1, "client": "c-other", "anchor": 0, "head": 0},
        {"type": "peer_joined", "client": "c-mine"},
        {"type": "peer_left", "client": "c-third"},
    ]
    for m in msgs:
        (peer.deliver_op if m["type"] == "op" else peer.deliver)(published(m))
    assert member.got == []  # held until the snapshot is out
    peer.after_rev = 1
    peer.release()
    assert [(m["type"], m.get("rev")) for m in member.got] == [("op", 2), ("cursor", 1), ("peer_left", None)]
    peer.deliver_op(published({"type": "op", "rev": 4, "op": [3, "d"], "client": "c-other", "seq": 3}))
    assert member.got[-1]["rev"] == 4
    # An op straight from the hub (another node's, not yet applied here) never reaches the client.
    peer.deliver(published({"type": "op", "rev": 5, "op": [4, "e"], "client": "c-other", "seq": 4}))
    assert member.got[-1]["rev"] == 4


# -- the commit pipeline, with commits decided by the test ----------------------------------


class ManualStore:
    """``write(fn)`` runs ``fn`` on an in-memory SQLite when the test says so."""

    def __init__(self) -> None:
        self.conn = sqlite3.connect(":memory:", isolation_level=None)
        SQLiteStore._migrate(self.conn, [DOCS_SCHEMA])
        self.queue: list[tuple[Any, asyncio.Future[Any]]] = []
        self.pending = 0
        self.max_pending = 1000
        self.busy = False

    def write(self, fn: Any) -> asyncio.Future[Any]:
        if self.busy:
            raise StoreBusy("busy")
        fut = asyncio.get_running_loop().create_future()
        self.queue.append((fn, fut))
        return fut

    async def read(self, fn: Any) -> Any:
        return fn(self.conn)

    async def commit(self, n: int | None = None, *, fail: bool = False) -> None:
        """Run (or fail) the next ``n`` queued writes, then let the callbacks run."""
        n = len(self.queue) if n is None else n
        batch, self.queue = self.queue[:n], self.queue[n:]
        for fn, fut in batch:
            if fail:
                fut.set_exception(sqlite3.OperationalError("disk full"))
                continue
            try:
                self.conn.execute("SAVEPOINT w")
                fut.set_result(fn(self.conn))
                self.conn.execute("RELEASE w")
            except Exception as e:
                self.conn.execute("ROLLBACK TO w")
                self.conn.execute("RELEASE w")
                fut.set_exception(e)
        for _ in range(3):
            await asyncio.sleep(0)


def service(store: ManualStore, **kw: Any) -> EditingService:
    return EditingService(SQLiteDocumentLog(store), Hub(MemoryBackplane()), edit_rate=0, **kw)  # type: ignore[arg-type]


async def joined(svc: EditingService, store: ManualStore, name: str, uid: str | None = None,
                 units: str = CODEPOINT, since: int | None = None) -> tuple[Peer, FakeMember]:
    member = FakeMember(Identity(uid or "u-" + name, name, frozenset({"edit"})))
    task = asyncio.ensure_future(svc.attach(member, "d", units=units))
    for _ in range(3):
        await asyncio.sleep(0)
    if not task.done():
        await store.commit()  # the create/load write
    peer = await task
    await svc.welcome(peer, since)
    return peer, member


def test_acks_and_broadcasts_only_after_commit_in_rev_order() -> None:
    async def main() -> None:
        store = ManualStore()
        svc = service(store)
        ann, ann_m = await joined(svc, store, "ann")
        bob, bob_m = await joined(svc, store, "bob")
        assert ann_m.types() == ["snapshot", "peer_joined"] and bob_m.types() == ["snapshot"]
        svc.submit(ann, 0, ["a"], 1)
        svc.submit(bob, 0, ["b"], 1)  # concurrent: transformed over ann's, goes first on the tie
        await asyncio.sleep(0)
        assert len(store.queue) == 1 and ann_m.types()[-1] == "peer_joined"  # nothing acked yet
        svc.submit(ann, 1, [1, "c"], 2)  # while the first write is with the store: next batch
        await asyncio.sleep(0.01)
        assert len(store.queue) == 1
        await store.commit()
        assert [m for m in ann_m.got[2:]] == [
            {"type": "ack", "rev": 1, "seq": 1},
            {"type": "op", "rev": 2, "op": ["b", 1], "client": bob.client_id, "seq": 1},
        ]
        assert bob_m.got[1:] == [
            {"type": "op", "rev": 1, "op": ["a"], "client": ann.client_id, "seq": 1},
            {"type": "ack", "rev": 2, "seq": 1},
        ]
        await asyncio.sleep(0.01)
        assert len(store.queue) == 1  # the op that waited is written now
        await store.commit()
        assert ann_m.got[-1] == {"type": "ack", "rev": 3, "seq": 2}
        assert svc.docs["d"].committed_rev == 3
        # A resend is acknowledged again (its rev has committed) and not applied.
        svc.submit(ann, 1, [1, "c"], 2)
        assert ann_m.got[-1] == {"type": "ack", "rev": 3, "seq": 2, "duplicate": True}
        assert svc.docs["d"].state.text == "bac" and not store.queue

    asyncio.run(main())


def test_a_joiner_gets_only_committed_state() -> None:
    async def main() -> None:
        store = ManualStore()
        svc = service(store)
        ann, _ = await joined(svc, store, "ann")
        svc.submit(ann, 0, ["x"], 1)
        await asyncio.sleep(0)
        member = FakeMember(Identity("u-carl", "carl", frozenset({"edit"})))
        peer = await svc.attach(member, "d")
        welcome = asyncio.ensure_future(svc.welcome(peer))
        await asyncio.sleep(0.01)
        assert member.got == []  # rev 1 is applied but not committed: wait
        # A duplicate of an uncommitted op is acknowledged only after the commit, too.
        svc.submit(ann, 0, ["x"], 1)
        await store.commit()
        await welcome
        assert member.got[0]["type"] == "snapshot" and (member.got[0]["rev"], member.got[0]["text"]) == (1, "x")
        assert all(m["type"] != "op" for m in member.got)  # rev 1 is in the snapshot, not sent again

    asyncio.run(main())


@pytest.mark.expect_error_log
def test_a_failed_commit_closes_the_peers_and_drops_the_document() -> None:
    async def main() -> None:
        store = ManualStore()
        svc = service(store)
        ann, ann_m = await joined(svc, store, "ann")
        bob, bob_m = await joined(svc, store, "bob")
        svc.submit(ann, 0, ["lost"], 1)
        await asyncio.sleep(0)
        await store.commit(fail=True)
        assert ann_m.closed_with is not None and ann_m.closed_with[0] == 1011
        assert bob_m.closed_with is not None and bob_m.closed_with[0] == 1011
        assert "d" not in svc.docs and svc.commit_failures == 1
        assert not any(m["type"] in ("ack", "op") for m in ann_m.got + bob_m.got)
        with pytest.raises(ProtocolError) as e:
            svc.submit(ann, 0, ["again"], 2)
        assert e.value.code == "unavailable"
        # Reopened from the store: rev 0, and the client's resend applies.
        carl, carl_m = await joined(svc, store, "carl")
        assert carl_m.got[0]["rev"] == 0 and carl_m.got[0]["text"] == ""
        svc.submit(carl, 0, ["kept"], 1)
        await asyncio.sleep(0)
        await store.commit()
        assert carl_m.got[-1] == {"type": "ack", "rev": 1, "seq": 1}

    asyncio.run(main())


def test_store_busy_is_refused_before_anything_changes() -> None:
    async def main() -> None:
        store = ManualStore()
        svc = service(store)
        ann, _ = await joined(svc, store, "ann")
        store.pending = store.max_pending
        with pytest.raises(ProtocolError) as e:
            svc.submit(ann, 0, ["x"], 1)
        assert e.value.code == "unavailable" and svc.docs["d"].state.rev == 0

    asyncio.run(main())


def test_client_ids_are_reused_only_by_their_user_and_colors_differ() -> None:
    async def main() -> None:
        store = ManualStore()
        svc = service(store)
        ann, ann_m = await joined(svc, store, "ann")
        bob, _ = await joined(svc, store, "bob")
        assert ann.color != bob.color
        other = FakeMember(Identity("u-eve", "eve", frozenset({"edit"})))
        stolen = await svc.attach(other, "d", ann.client_id)
        assert stolen.client_id != ann.client_id and ann_m.closed_with is None
        again = FakeMember(Identity(ann.user.id, "ann", frozenset({"edit"})))
        resumed = await svc.attach(again, "d", ann.client_id)
        assert resumed.client_id == ann.client_id
        assert ann_m.closed_with is not None and ann_m.closed_with[0] == 1008 and ann.gone

    asyncio.run(main())


def test_limits_on_peers_and_cursors() -> None:
    async def main() -> None:
        store = ManualStore()
        svc = service(store, max_peers=1, cursor_interval=0.05)
        ann, ann_m = await joined(svc, store, "ann")
        with pytest.raises(ProtocolError) as e:
            await svc.attach(FakeMember(), "d")
        assert e.value.code == "unavailable" and e.value.close == 1013
        svc.max_peers = 5
        bob, bob_m = await joined(svc, store, "bob")
        svc.submit(ann, 0, ["hello"], 1)
        await asyncio.sleep(0)
        await store.commit()
        with pytest.raises(ProtocolError) as e:
            svc.cursor(bob, 2, 0, 0)
        assert e.value.code == "conflict"
        with pytest.raises(ProtocolError) as e:
            svc.cursor(bob, 1, 0, 6)
        assert e.value.code == "bad_message"
        svc.cursor(bob, 1, 1, 1)
        svc.cursor(bob, 1, 2, 2)
        svc.cursor(bob, 1, 3, 4)
        cursors = [m for m in ann_m.got if m["type"] == "cursor"]
        assert [(m["anchor"], m["head"]) for m in cursors] == [(1, 1)]
        await asyncio.sleep(0.08)
        cursors = [m for m in ann_m.got if m["type"] == "cursor"]
        assert [(m["anchor"], m["head"]) for m in cursors] == [(1, 1), (3, 4)]
        assert cursors[0]["user"] == {"id": "u-bob", "name": "bob"} and cursors[0]["rev"] == 1
        svc.leave(bob)
        assert ann_m.got[-1] == {"type": "peer_left", "client": bob.client_id, "user": {"id": "u-bob", "name": "bob"}}

    asyncio.run(main())


def test_peers_get_their_units_and_each_unit_is_encoded_once() -> None:
    async def main() -> None:
        store = ManualStore()
        svc = service(store, cursor_interval=0)
        ann, ann_m = await joined(svc, store, "ann")
        cat, cat_m = await joined(svc, store, "cat")
        bob, bob_m = await joined(svc, store, "bob", units=UTF16)
        eve, eve_m = await joined(svc, store, "eve", units=UTF16)
        assert bob_m.got[0]["units"] == "utf16" and ann_m.got[0]["units"] == "codepoint"
        assert bob_m.outs[-1] is ann_m.outs[-1]  # eve's peer_joined: one encoding for everyone
        svc.submit(ann, 0, ["😀x"], 1)
        await asyncio.sleep(0)
        await store.commit()
        svc.submit(bob, 1, [2, "!", 1], 1)  # UTF-16: after the emoji's two units
        await asyncio.sleep(0)
        await store.commit()
        assert svc.docs["d"].state.text == "😀!x"
        assert cat_m.got[-1]["op"] == [1, "!", 1] and ann_m.got[-1]["op"] == [1, "!", 1]
        assert eve_m.got[-1]["op"] == [2, "!", 1] and bob_m.got[-1] == {"type": "ack", "rev": 2, "seq": 1}
        assert ann_m.outs[-1] is cat_m.outs[-1]  # one encoding per unit, not per peer
        assert bob_m.got[-2]["op"] == ["😀x"] and bob_m.outs[-2] is eve_m.outs[-2]
        # cursors: sent in the sender's units, relayed in each receiver's
        svc.cursor(bob, 2, 3, 4)  # "x" selected: 😀 is units 0-1, "!" 2, "x" 3
        assert (ann_m.got[-1]["anchor"], ann_m.got[-1]["head"]) == (2, 3)
        assert (eve_m.got[-1]["anchor"], eve_m.got[-1]["head"]) == (3, 4)
        svc.cursor(ann, 2, 1, 1)
        assert (eve_m.got[-1]["anchor"], bob_m.got[-1]["anchor"]) == (2, 2)
        with pytest.raises(ProtocolError, match="the cursor would split a character") as e:
            svc.cursor(eve, 2, 1, 1)
        assert e.value.code == "bad_message"
        with pytest.raises(ProtocolError, match=r"outside the text at rev 2 \(4 UTF-16 code units\)"):
            svc.cursor(eve, 2, 5, 5)
        # a UTF-16 op that splits the pair is refused, nothing changes
        with pytest.raises(ProtocolError, match="would split a character") as de:
            svc.submit(eve, 2, [1, -1, 2], 1)
        assert de.value.code == "bad_message" and svc.docs["d"].state.rev == 2
        # joining: the others' cursors and the catch-up come in the joiner's units
        zed, zed_m = await joined(svc, store, "zed", units=UTF16)
        cursors = {p["user"]["name"]: p["cursor"] for p in zed_m.got[0]["peers"] if "cursor" in p}
        assert cursors == {"bob": {"anchor": 3, "head": 4}, "ann": {"anchor": 2, "head": 2}}
        _, late_m = await joined(svc, store, "late", units=UTF16, since=1)
        assert late_m.got[0]["type"] == "ops" and late_m.got[0]["ops"][0]["op"] == [2, "!", 1]
        _, old_m = await joined(svc, store, "old", since=1)
        assert old_m.got[0]["ops"][0]["op"] == [1, "!", 1]

    asyncio.run(main())


# -- random interleavings of edits, deliveries and commits converge ----------------------------


class SimClient:
    """A client with the OT discipline, reading its member's messages when told to.

    One that counts UTF-16 units keeps its text in the JavaScript view of
    tests/unit/test_units.py, as an ot.js client would.
    """

    def __init__(self, svc: EditingService, peer: Peer, member: FakeMember) -> None:
        snap = member.got[0]
        self.svc, self.peer, self.member = svc, peer, member
        self.utf16 = snap["units"] == UTF16
        self.ot = OTClient(snap["rev"], snap["client"])
        self.text = js_op([snap["text"]])[0] if self.utf16 else snap["text"]
        self.read = 1

    @property
    def real_text(self) -> str:
        return from_js(self.text) if self.utf16 else self.text

    def edit(self, op: list[Any]) -> None:
        """``op`` counts code points of the real text."""
        if self.utf16:
            op = js_op(TextUnits(self.real_text).op_to_utf16(op))
        self.text = ot.apply(self.text, op)
        if self.ot.apply_client(op):
            self.send()

    def send(self) -> None:
        p = self.ot.pending()
        assert p is not None
        self.svc.submit(self.peer, p.rev, js_op(p.op, from_js) if self.utf16 else p.op, p.seq)

    def receive_one(self) -> bool:
        if self.read >= len(self.member.got):
            return False
        msg = self.member.got[self.read]
        self.read += 1
        if msg["type"] == "ack":
            if self.ot.server_ack(msg["seq"]) is not None:
                self.send()
            assert self.ot.rev == msg["rev"]
        elif msg["type"] == "op":
            assert msg["client"] != self.ot.client_id
            op = js_op(msg["op"]) if self.utf16 else msg["op"]
            self.text = ot.apply(self.text, self.ot.apply_server(op))
            assert self.ot.rev == msg["rev"]
        return True


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_random_interleavings_of_edits_deliveries_and_commits_converge(data: st.DataObject) -> None:
    async def main() -> None:
        store = ManualStore()
        svc = service(store)
        clients = []
        for i in range(3):
            units = data.draw(st.sampled_from([CODEPOINT, UTF16]), label="units")
            peer, member = await joined(svc, store, "u%d" % i, units=units)
            clients.append(SimClient(svc, peer, member))
        for _ in range(data.draw(st.integers(5, 40), label="steps")):
            c = data.draw(st.sampled_from(clients))
            action = data.draw(st.sampled_from(["edit", "edit", "receive", "commit", "tick"]))
            if action == "edit":
                size = len(c.real_text)
                pos = data.draw(st.integers(0, size))
                if size > pos and data.draw(st.booleans()):
                    k = data.draw(st.integers(1, size - pos))
                    op: list[Any] = [pos, -k, size - pos - k]
                else:
                    op = [pos, data.draw(st.sampled_from(["a", "bc", "😀", "👍🏽", "\n"])), size - pos]
                c.edit(ot.check([x for x in op if x != 0]))
            elif action == "receive":
                c.receive_one()
            elif action == "commit":
                await store.commit(data.draw(st.integers(0, 2)))
            else:
                await asyncio.sleep(0)
        for _ in range(200):  # drain: commit everything, deliver everything
            await asyncio.sleep(0)
            await store.commit()
            moved = any([c.receive_one() for c in clients])
            if not moved and not store.queue and all(c.ot.state == "synchronized" for c in clients):
                break
        doc = svc.docs["d"]
        assert doc.committed_rev == doc.state.rev
        assert {c.real_text for c in clients} == {doc.state.text}
        assert all(c.ot.rev == doc.state.rev for c in clients)

    asyncio.run(main())
