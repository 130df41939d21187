"""Collaborative editing over real sockets: the documented protocol, end to end."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from typing import Any

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from realtime import editing, ot
from realtime.ot import OTClient
from realtime.storage import sqlite_repos
from tests.clients import fetch
from tests.waiting import until

NOISE = ("peer_joined", "peer_left", "cursor")


def op_of(*components: Any) -> list[Any]:
    """An op from components, zero retains and empty inserts dropped."""
    return ot.check([c for c in components if c != 0 and c != ""])


class Editor:
    """A socket client keeping the OT discipline (realtime.ot.OTClient), like a browser tab."""

    def __init__(self, client: Any, first: dict[str, Any]) -> None:
        self.c = client
        self.first = first
        self.client_id = first["client"]
        self.text = first["text"]
        self.ot = OTClient(first["rev"], first["client"])
        self.peers = {p["client"]: p for p in first["peers"]}
        self.cursors: dict[str, dict[str, Any]] = {}
        self.errors: list[dict[str, Any]] = []

    # local side
    def edit(self, op: list[Any]) -> None:
        self.text = ot.apply(self.text, op)
        if self.ot.apply_client(op):
            self.send_pending()

    def insert(self, pos: int, s: str) -> None:
        n = len(self.text)
        self.edit(op_of(pos, s, n - pos))

    def send_pending(self) -> None:
        p = self.ot.pending()
        assert p is not None
        self.c.send({"type": "op", "rev": p.rev, "op": p.op, "seq": p.seq})

    # server side
    def handle(self, msg: dict[str, Any]) -> None:
        kind = msg["type"]
        if kind == "ack":
            nxt = self.ot.server_ack(msg["seq"])
            assert self.ot.rev == msg["rev"], (self.ot.rev, msg)
            if nxt is not None:
                self.send_pending()
        elif kind == "op":
            assert msg["client"] != self.client_id, "own op echoed"
            op = self.ot.apply_server(msg["op"])
            assert self.ot.rev == msg["rev"], (self.ot.rev, msg)
            self.text = ot.apply(self.text, op)
        elif kind == "peer_joined":
            self.peers[msg["client"]] = msg
        elif kind == "peer_left":
            self.peers.pop(msg["client"], None)
            self.cursors.pop(msg["client"], None)
        elif kind == "cursor":
            self.cursors[msg["client"]] = msg
        elif kind == "error":
            self.errors.append(msg)
        else:
            raise AssertionError("unexpected %r" % msg)

    async def pump(self, timeout: float = 3.0) -> dict[str, Any]:
        msg = await self.c.recv(timeout)
        assert msg is not None, "closed (%s)" % self.c.conn.close_code
        self.handle(msg)
        return msg

    async def settle(self, rev: int, timeout: float = 5.0) -> None:
        """Process messages until synchronized at ``rev``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not (self.ot.state == "synchronized" and self.ot.rev == rev):
            await self.pump(max(0.01, deadline - loop.time()))
        assert not self.errors, self.errors


async def open_editor(connect, doc: str = "notes", name: str = "ann", **params: Any) -> Editor:
    c = await connect("/ws/edit/" + doc, name=name, **params)
    first = await c.expect("snapshot", skip=NOISE)
    return Editor(c, first)


async def fetch_json(port: int, path: str) -> dict[str, Any]:
    reply = await fetch(port, path)
    assert reply.status == 200, reply
    return reply.body


async def http_status(port: int, path: str) -> tuple[int, dict[str, Any]]:
    reply = await fetch(port, path)
    return reply.status, reply.body


async def seeded(connect, text: str, doc: str = "notes", name: str = "ann", **params: Any) -> Editor:
    ed = await open_editor(connect, doc, name, **params)
    if text:
        ed.edit([len(ed.text), text] if ed.text else [text])
        await ed.settle(ed.ot.rev + 1)
    return ed


# -- opening ---------------------------------------------------------------------


@pytest.mark.gen_test
async def test_first_open_creates_the_document_and_sends_a_snapshot(connect, http_port):
    code, _ = await http_status(http_port, "/api/docs/notes")
    assert code == 404
    ann = await open_editor(connect)
    snap = ann.first
    assert snap["type"] == "snapshot" and snap["doc"] == "notes"
    assert snap["rev"] == 0 and snap["text"] == "" and snap["peers"] == []
    assert editing.valid_client_id(snap["client"])
    assert snap["user"]["name"] == "ann" and snap["readonly"] is False
    assert snap["limits"]["max_doc_size"] == 200_000 and snap["limits"]["max_op_size"] == 10_000
    body = await fetch_json(http_port, "/api/docs/notes")
    assert body["rev"] == 0 and body["text"] == ""


@pytest.mark.gen_test
async def test_op_is_acked_to_the_sender_and_broadcast_to_the_others(connect, http_port):
    ann = await open_editor(connect, name="ann")
    bob = await open_editor(connect, name="bob")
    joined = await ann.c.expect("peer_joined")
    assert joined["client"] == bob.client_id and joined["user"]["name"] == "bob"
    assert bob.first["peers"][0]["client"] == ann.client_id
    ann.c.send({"type": "op", "rev": 0, "op": ["hi 😀"], "seq": 1})
    assert await ann.c.expect("ack") == {"type": "ack", "rev": 1, "seq": 1}
    assert await bob.c.expect("op") == {"type": "op", "rev": 1, "op": ["hi 😀"], "client": ann.client_id,
                                        "seq": 1}
    await ann.c.nothing_before_pong()  # the sender does not get its own op back
    assert (await fetch_json(http_port, "/api/docs/notes"))["text"] == "hi 😀"


@pytest.mark.gen_test
async def test_concurrent_ops_are_transformed_and_converge(connect, http_port):
    ann = await seeded(connect, "hello")
    bob = await open_editor(connect, name="bob")
    await ann.c.expect("peer_joined")
    # Both edit rev 1 at once: ann appends, bob prepends; also both insert at 5.
    ann.edit([5, " world"])
    bob.edit(["oh, ", 5])
    bob.edit([9, "!"])  # buffered behind bob's outstanding op
    await asyncio.gather(ann.settle(4), bob.settle(4))
    server = await fetch_json(http_port, "/api/docs/notes")
    assert ann.text == bob.text == server["text"]
    assert server["rev"] == 4
    assert set(server["text"].split()) == {"oh,", "hello!", "world"} or "world" in server["text"]


@pytest.mark.gen_test(timeout=20)
async def test_many_clients_editing_at_once_converge(connect, http_port):
    rng = random.Random(4)
    eds = [await open_editor(connect, name="u%d" % i) for i in range(6)]
    alphabet = "abc xyz😀👍🏽é\n"

    async def typist(ed: Editor, n: int) -> None:
        for _ in range(n):
            size = len(ed.text)
            if size and rng.random() < 0.3:
                pos = rng.randrange(size)
                k = min(size - pos, rng.randint(1, 3))
                ed.edit(op_of(pos, -k, size - pos - k))
            else:
                pos = rng.randint(0, size)
                s = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 3)))
                ed.edit(op_of(pos, s, size - pos))
            # read whatever has arrived, without waiting for it
            for _ in range(rng.randint(0, 3)):
                try:
                    await ed.pump(0.005)
                except asyncio.TimeoutError:
                    break

    await asyncio.gather(*(typist(ed, 25) for ed in eds))
    # Drain: keep pumping until the server stops moving and everyone is synchronized.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        server = await fetch_json(http_port, "/api/docs/notes")
        if all(ed.ot.state == "synchronized" and ed.ot.rev == server["rev"] for ed in eds):
            break
        assert loop.time() < deadline, [(ed.ot.state, ed.ot.rev, server["rev"]) for ed in eds]
        for ed in eds:
            while True:
                try:
                    await ed.pump(0.01)
                except asyncio.TimeoutError:
                    break
    assert all(not ed.errors for ed in eds), [ed.errors for ed in eds]
    assert {ed.text for ed in eds} == {server["text"]}
    assert server["rev"] >= 6  # ops were composed while waiting for acks, so fewer than 150


# -- resends -----------------------------------------------------------------------


@pytest.mark.gen_test
async def test_resent_op_is_acked_again_and_not_applied_twice(connect, http_port):
    ann = await open_editor(connect, name="ann")
    bob = await open_editor(connect, name="bob")
    for _ in range(3):
        ann.c.send({"type": "op", "rev": 0, "op": ["once"], "seq": 1})
    acks = [await ann.c.expect("ack", skip=NOISE) for _ in range(3)]
    assert [a["rev"] for a in acks] == [1, 1, 1]
    assert [bool(a.get("duplicate")) for a in acks] == [False, True, True]
    assert (await bob.c.expect("op", skip=NOISE))["op"] == ["once"]
    await bob.c.nothing_before_pong("op")  # the acked resends were not broadcast
    assert (await fetch_json(http_port, "/api/docs/notes"))["text"] == "once"


async def session_for(connect, name: str) -> str:
    """A signed guest session (chat's welcome hands it out; every socket shares identities)."""
    c = await connect("/ws/chat", name=name)
    w = await c.expect("welcome")
    c.close()
    return w["session"]


@pytest.mark.gen_test
async def test_resend_after_reconnect_with_client_id_is_recognised(connect, http_port, app):
    session = await session_for(connect, "ann")
    ann = await open_editor(connect, name="ann", session=session)
    old_id = ann.client_id
    ann.edit(["typed before the drop"])
    ann.c.close()  # gone before reading the ack: did the op make it?
    await until(lambda: not app.ctx.connections)  # the server has seen it go
    c = await connect("/ws/edit/notes", session=session, rev=0, client=old_id)
    resume = await c.expect("ops", skip=NOISE)
    assert resume["client"] == old_id and resume["rev"] == 1
    assert resume["ops"] == [{"rev": 1, "op": ["typed before the drop"], "client": old_id, "seq": 1}]
    assert ann.ot.is_own(resume["ops"][0]["client"], resume["ops"][0]["seq"])  # the client's own op: its ack
    # A client that resends anyway (it could not tell) is acknowledged, not applied twice.
    c.send({"type": "op", "rev": 0, "op": ["typed before the drop"], "seq": 1})
    assert await c.expect("ack", skip=NOISE) == {"type": "ack", "rev": 1, "seq": 1, "duplicate": True}
    assert (await fetch_json(http_port, "/api/docs/notes"))["text"] == "typed before the drop"


@pytest.mark.gen_test
async def test_client_id_is_not_handed_to_another_user(connect):
    ann = await open_editor(connect, name="ann")
    mallory = await connect("/ws/edit/notes", name="mallory", client=ann.client_id)
    snap = await mallory.expect("snapshot", skip=NOISE)
    assert snap["client"] != ann.client_id
    await ann.c.expect("peer_joined")
    ann.c.send({"type": "op", "rev": 0, "op": ["still mine"], "seq": 1})
    assert (await ann.c.expect("ack", skip=NOISE))["rev"] == 1  # ann's connection is untouched


@pytest.mark.gen_test
async def test_stale_connection_of_the_same_client_is_replaced(connect):
    session = await session_for(connect, "ann")
    ann = await open_editor(connect, session=session)
    # The same tab reconnects with its id while the old socket still looks open.
    again = await connect("/ws/edit/notes", session=session, client=ann.client_id)
    resume = await again.expect("snapshot", skip=NOISE)
    assert resume["client"] == ann.client_id and resume["peers"] == []
    assert await ann.c.closed() == 1008


# -- reconnect and catch-up ---------------------------------------------------------


@pytest.mark.gen_test
async def test_reconnect_with_rev_gets_exactly_the_missed_ops(connect):
    ann = await seeded(connect, "abc")
    bob = await open_editor(connect, name="bob")
    bob.c.close()
    for s in ("1", "2", "3"):
        ann.edit([len(ann.text), s])
        await ann.settle(ann.ot.rev + 1)
    c = await connect("/ws/edit/notes", name="bob", rev=1)
    msg = await c.expect("ops", skip=NOISE)
    assert msg["rev"] == 4 and [e["rev"] for e in msg["ops"]] == [2, 3, 4]
    assert all(e["client"] == ann.client_id for e in msg["ops"]) and [e["seq"] for e in msg["ops"]] == [2, 3, 4]
    assert msg["peers"][0]["client"] == ann.client_id and "text" not in msg
    up_to_date = await connect("/ws/edit/notes", name="bob", rev=4)
    assert (await up_to_date.expect("ops", skip=NOISE))["ops"] == []
    future = await connect("/ws/edit/notes", name="bob", rev=99)
    snap = await future.expect("snapshot", skip=NOISE)
    assert snap["rev"] == 4 and snap["text"] == "abc123"


@pytest.mark.gen_test
@pytest.mark.parametrize("app_options", [{"doc_log_keep": 2}])
async def test_reconnect_older_than_the_log_gets_a_snapshot(connect, app_options):
    ann = await seeded(connect, "a")
    for s in "bcd":
        ann.edit([len(ann.text), s])
        await ann.settle(ann.ot.rev + 1)
    c = await connect("/ws/edit/notes", name="bob", rev=1)
    snap = await c.expect("snapshot", skip=NOISE)
    assert snap["rev"] == 4 and snap["text"] == "abcd"
    c2 = await connect("/ws/edit/notes", name="bob", rev=2)
    assert [e["rev"] for e in (await c2.expect("ops", skip=NOISE))["ops"]] == [3, 4]


# -- cursors and peers ---------------------------------------------------------------


@pytest.mark.gen_test
async def test_cursor_is_relayed_with_identity_and_transformed(connect):
    ann = await seeded(connect, "hello world")
    bob = await open_editor(connect, name="bob")
    await ann.c.expect("peer_joined")
    # ann inserts at the start; bob's cursor was taken on rev 1, before that.
    ann.edit(["¡¡", 11])
    await ann.settle(2)
    bob.c.send({"type": "cursor", "rev": 1, "anchor": 6, "head": 11})
    cur = await ann.c.expect("cursor")
    assert cur == {"type": "cursor", "client": bob.client_id, "user": bob.first["user"], "color": bob.first["color"],
                   "rev": 2, "anchor": 8, "head": 13}
    await bob.c.nothing_before_pong("cursor", skip=("op",))  # not echoed to its sender
    # A third person sees both, with bob's cursor at the snapshot's revision.
    carol = await open_editor(connect, name="carol")
    listed = {p["client"]: p for p in carol.first["peers"]}
    assert set(listed) == {ann.client_id, bob.client_id}
    assert listed[bob.client_id]["cursor"] == {"anchor": 8, "head": 13}
    assert listed[ann.client_id]["user"]["name"] == "ann"
    assert listed[ann.client_id]["color"] != listed[bob.client_id]["color"]
    carol.c.close()
    left = await ann.c.expect("peer_left", skip=("peer_joined",))
    assert left["client"] == carol.client_id and left["user"]["name"] == "carol"


@pytest.mark.gen_test
@pytest.mark.parametrize("app_options", [{"cursor_interval": 0.2}])
async def test_cursors_are_throttled_and_the_latest_wins(connect, app_options):
    ann = await seeded(connect, "0123456789")
    bob = await open_editor(connect, name="bob")
    await ann.c.expect("peer_joined")
    loop = asyncio.get_running_loop()
    for i in range(4):
        bob.c.send({"type": "cursor", "rev": 1, "anchor": i})
    first = await ann.c.expect("cursor")
    first_at = loop.time()
    assert (first["anchor"], first["head"]) == (0, 0)
    last = await ann.c.expect("cursor", timeout=1)  # the next one ann hears is the latest of the three
    assert (last["anchor"], last["head"]) == (3, 3)
    assert loop.time() - first_at >= 0.1, "the latest cursor came before the interval ended"
    # Nothing else was waiting: the next cursor ann hears is a new one.
    bob.c.send({"type": "cursor", "rev": 1, "anchor": 5})
    again = await ann.c.expect("cursor", timeout=1)
    assert (again["anchor"], again["head"]) == (5, 5)


@pytest.mark.gen_test
async def test_bad_cursors_are_refused(connect):
    ann = await seeded(connect, "abc")
    for msg, code in [
        ({"rev": 1, "anchor": 4}, "bad_message"),
        ({"rev": 1, "anchor": 0, "head": -1}, "bad_message"),
        ({"rev": 1, "anchor": "0"}, "bad_message"),
        ({"rev": 7, "anchor": 0}, "conflict"),
        ({"anchor": 0}, "bad_message"),
    ]:
        ann.c.send({"type": "cursor", "ref": code, **msg})
        err = await ann.c.expect("error")
        assert err["code"] == code and err["ref"] == code, (msg, err)


# -- bad input and limits ------------------------------------------------------------


BAD_OPS = [
    ({"rev": 1, "op": [3, "x"], "seq": 5}, "bad_message", "document of 3"),  # wrong length
    ({"rev": 1, "op": [5, "x", 1], "seq": 5}, "bad_message", "document of 6"),
    ({"rev": 1, "op": [0, 5], "seq": 5}, "bad_message", "component 0"),
    ({"rev": 1, "op": [True, 4], "seq": 5}, "bad_message", "boolean"),
    ({"rev": 1, "op": [1.5, 3.5], "seq": 5}, "bad_message", "float"),
    ({"rev": 1, "op": ["", 5], "seq": 5}, "bad_message", "empty"),
    ({"rev": 1, "op": [None, 5], "seq": 5}, "bad_message", "NoneType"),
    ({"rev": 1, "op": [[1], 5], "seq": 5}, "bad_message", "list"),
    ({"rev": 1, "op": {"retain": 5}, "seq": 5}, "bad_message", "list of components"),
    ({"rev": 1, "op": "hello", "seq": 5}, "bad_message", "list of components"),
    ({"rev": 1, "seq": 5}, "bad_message", "'op' is required"),
    ({"op": [5, "x"], "seq": 5}, "bad_message", "'rev' is required"),
    ({"rev": -1, "op": [5, "x"], "seq": 5}, "bad_message", "'rev'"),
    ({"rev": "1", "op": [5, "x"], "seq": 5}, "bad_message", "'rev'"),
    ({"rev": 1, "op": [5, "x"]}, "bad_message", "'seq' is required"),
    ({"rev": 1, "op": [5, "x"], "seq": -2}, "bad_message", "'seq'"),
    ({"rev": 2, "op": [5, "x"], "seq": 5}, "conflict", "newer than the document"),  # from the future
    ({"rev": 1, "op": [5, "x" * 11], "seq": 5}, "too_large", "inserts 11"),  # op over the size limit
    ({"rev": 1, "op": [5, "x" * 10], "seq": 5}, "too_large", "would have 15"),  # doc over the size limit
]


@pytest.mark.gen_test
@pytest.mark.parametrize("app_options", [{"max_doc_size": 12, "max_op_size": 10}])
async def test_every_bad_op_gets_an_error_and_changes_nothing(connect, http_port, app_options):
    ann = await seeded(connect, "hello")
    bob = await open_editor(connect, name="bob")
    await ann.c.expect("peer_joined")
    for i, (fields, code, text) in enumerate(BAD_OPS):
        ann.c.send({"type": "op", "ref": i, **fields})
        err = await ann.c.expect("error")
        assert err["code"] == code and err["ref"] == i, (fields, err)
        assert text in err["message"], (fields, err)
        if type(fields.get("seq")) is int and fields["seq"] >= 0:
            assert err["seq"] == fields["seq"]
    # Lone surrogates never get past the JSON decoder.
    ann.c.send('{"type":"op","rev":1,"op":[5,"\\ud800"],"seq":1}')
    assert (await ann.c.expect("error"))["code"] == "bad_json"
    await bob.c.nothing_before_pong("op")
    body = await fetch_json(http_port, "/api/docs/notes")
    assert (body["rev"], body["text"]) == (1, "hello")
    # ... and the connection still works.
    ann.c.send({"type": "op", "rev": 1, "op": [5, "!"], "seq": 2})
    assert (await ann.c.expect("ack"))["rev"] == 2
    # An op that only shrinks an oversized document would be allowed; at the limit, growing is not.
    ann.c.send({"type": "op", "rev": 2, "op": [6, "1234567"], "seq": 3})
    assert (await ann.c.expect("error"))["code"] == "too_large"


@pytest.mark.gen_test
@pytest.mark.parametrize("app_options", [{"doc_log_keep": 2}])
async def test_op_older_than_the_log_is_a_conflict(connect, app_options):
    ann = await seeded(connect, "a")
    for s in "bc":
        ann.edit([len(ann.text), s])
        await ann.settle(ann.ot.rev + 1)
    ann.c.send({"type": "op", "rev": 0, "op": ["x"], "seq": 9})
    err = await ann.c.expect("error")
    assert err["code"] == "conflict" and "too old" in err["message"] and err["seq"] == 9


@pytest.mark.gen_test
@pytest.mark.parametrize("app_options", [{"edit_rate": 2.0, "edit_burst": 2.0, "rate_limit": 0}])
async def test_edit_rate_is_limited_per_connection(connect, http_port, app_options):
    ann = await open_editor(connect)
    for seq in range(1, 5):
        ann.c.send({"type": "op", "rev": 0, "op": ["x"], "seq": seq})
    replies = sorted([await ann.c.recv() for _ in range(4)], key=lambda m: m["seq"])
    assert [r["type"] for r in replies] == ["ack", "ack", "error", "error"]
    assert {r["code"] for r in replies[2:]} == {"rate_limited"}
    assert (await fetch_json(http_port, "/api/docs/notes"))["text"] == "xx"


@pytest.mark.gen_test
@pytest.mark.parametrize("path", [
    "/ws/edit/bad.id", "/ws/edit/" + "x" * 65, "/ws/edit/a%20b", "/ws/edit/%C3%A9",
    "/ws/edit/notes?rev=abc", "/ws/edit/notes?rev=-1", "/ws/edit/notes?client=nope",
    "/ws/edit/notes?units=utf8", "/ws/edit/notes?units=UTF16",
])
async def test_bad_urls_are_refused_before_the_upgrade(connect, path):
    with pytest.raises(HTTPClientError) as e:
        await connect(path)
    assert e.value.code == 400


@pytest.mark.gen_test
@pytest.mark.parametrize("app_options", [{"max_peers_per_doc": 1}])
async def test_a_full_document_closes_with_1013(connect, app_options):
    await open_editor(connect, name="ann")
    bob = await connect("/ws/edit/notes", name="bob")
    assert await bob.closed() == 1013
    assert "already has 1 people" in bob.conn.close_reason


@pytest.mark.gen_test
@pytest.mark.parametrize("app_options", [{"max_docs": 1}])
async def test_document_count_is_limited(connect, app_options):
    await open_editor(connect, doc="one")
    await open_editor(connect, doc="one", name="bob")  # existing: fine
    c = await connect("/ws/edit/two")
    assert await c.closed() == 1008
    assert "already holds 1 documents" in c.conn.close_reason


@pytest.mark.gen_test
@pytest.mark.parametrize("app_options", [{"auth": "token", "jwt_secret": "s" * 32}])
async def test_a_user_without_the_edit_role_can_read_but_not_edit(app, connect, app_options):
    token = app.ctx.auth.make_token("u1", "Reader", ["chat"])
    c = await connect("/ws/edit/notes", token=token)
    snap = await c.expect("snapshot")
    assert snap["readonly"] is True
    c.send({"type": "op", "rev": 0, "op": ["x"], "seq": 1})
    err = await c.expect("error")
    assert err["code"] == "forbidden" and err["seq"] == 1


# -- durability inside one process -----------------------------------------------------


@pytest.mark.expect_error_log
@pytest.mark.gen_test
async def test_a_failed_commit_closes_peers_and_the_resend_is_applied_once(connect, http_port, monkeypatch):
    session = await session_for(connect, "ann")
    ann = await seeded(connect, "base", session=session)
    bob = await open_editor(connect, name="bob")
    await ann.c.expect("peer_joined")
    real = sqlite_repos.write_doc_ops
    calls = []

    def failing(*args: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise sqlite3.OperationalError("disk I/O error")
        return real(*args)

    monkeypatch.setattr(sqlite_repos, "write_doc_ops", failing)
    ann.edit([4, " lost?"])
    assert await ann.c.closed() == 1011
    assert await bob.c.closed() == 1011
    # The client resumes from the rev it had (never newer than the store) and resends.
    c = await connect("/ws/edit/notes", session=session, rev=ann.ot.rev, client=ann.client_id)
    resume = await c.expect("ops", skip=NOISE)
    assert resume["ops"] == [] and resume["rev"] == 1
    p = ann.ot.resend()
    c.send({"type": "op", "rev": p.rev, "op": p.op, "seq": p.seq})
    assert await c.expect("ack", skip=NOISE) == {"type": "ack", "rev": 2, "seq": p.seq}
    assert (await fetch_json(http_port, "/api/docs/notes"))["text"] == "base lost?"


@pytest.mark.gen_test(timeout=15)
@pytest.mark.parametrize("app_options", [{"snapshot_every": 3, "doc_log_keep": 2, "doc_idle_seconds": 0.05}])
async def test_snapshots_trim_the_log_and_an_unloaded_document_reloads(app, connect, http_port, app_options):
    session = await session_for(connect, "ann")
    ann = await seeded(connect, "0", session=session)
    for i in range(1, 10):
        ann.edit([len(ann.text), str(i % 10)])
        await ann.settle(ann.ot.rev + 1)
    assert ann.ot.rev == 10

    def rows(conn: sqlite3.Connection) -> tuple[list[int], list[int]]:
        ops = [r[0] for r in conn.execute("SELECT rev FROM doc_ops WHERE doc='notes' ORDER BY rev")]
        snaps = [r[0] for r in conn.execute("SELECT rev FROM doc_snapshots WHERE doc='notes'")]
        return ops, snaps

    ops, snaps = await app.ctx.store.read(rows)
    assert snaps == [9] and ops == [8, 9, 10]  # keep 2 before rev 9, and all after the snapshot
    ann.c.close()
    svc = app.ctx.editing
    await until(lambda: "notes" not in svc.docs)  # unloaded once idle

    async def snapshot_on_unload() -> tuple[list[int], list[int]] | None:
        ops, snaps = await app.ctx.store.read(rows)
        return (ops, snaps) if snaps != [9] else None

    ops, snaps = await until(snapshot_on_unload)
    assert snaps == [10] and ops == [9, 10]
    body = await fetch_json(http_port, "/api/docs/notes")
    assert (body["rev"], body["text"]) == (10, "0123456789")
    c = await connect("/ws/edit/notes", name="bob", rev=8)
    assert [e["rev"] for e in (await c.expect("ops", skip=NOISE))["ops"]] == [9, 10]
    # The dedupe table survived the unload: ann's last op resent is not applied again.
    c2 = await connect("/ws/edit/notes", session=session, client=ann.client_id)
    await c2.expect("snapshot", skip=NOISE)
    c2.send({"type": "op", "rev": 9, "op": [9, "9"], "seq": 10})
    assert (await c2.expect("ack", skip=NOISE)) == {"type": "ack", "rev": 10, "seq": 10, "duplicate": True}


@pytest.mark.gen_test
async def test_a_new_app_on_the_same_data_reads_the_documents(app, connect, http_port):
    ann = await seeded(connect, "kept 👍🏽")
    ann.edit([7, "!"])
    await ann.settle(2)
    import server

    other = server.make_app(data_dir=app.ctx.cfg.data_dir, ping_interval=0)
    await other.start()
    try:
        body = await other.ctx.editing.get_doc("notes")
        assert (body["rev"], body["text"]) == (2, "kept 👍🏽!")
    finally:
        await other.shutdown(0.1)


# -- units ---------------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_utf16_connections_count_code_units_and_the_others_code_points(connect, http_port):
    ann = await seeded(connect, "a😀b")  # code points
    js = await connect("/ws/edit/notes", name="js", units="utf16")
    snap = await js.expect("snapshot", skip=NOISE)
    assert snap["units"] == "utf16" and snap["text"] == "a😀b" and snap["rev"] == 1
    assert ann.first["units"] == "codepoint"
    await ann.c.expect("peer_joined")
    # JavaScript's "a😀b".length is 4: insert after the emoji, at UTF-16 index 3
    js.send({"type": "op", "rev": 1, "op": [3, "中👍🏽", 1], "seq": 1})
    assert await js.expect("ack", skip=NOISE) == {"type": "ack", "rev": 2, "seq": 1}
    msg = await ann.c.expect("op", skip=NOISE)
    assert msg["op"] == [2, "中👍🏽", 1]
    ann.handle(msg)
    assert ann.text == "a😀中👍🏽b"
    # ann (code points) deletes the emoji; js sees the deletion of 2 units
    ann.edit([1, -1, 4])
    await ann.settle(3)
    assert (await js.expect("op", skip=NOISE))["op"] == [1, -2, 6]
    assert (await fetch_json(http_port, "/api/docs/notes"))["text"] == "a中👍🏽b"
    # an op that would split 👍 (units 2-3) is refused; the document is unchanged
    js.send({"type": "op", "rev": 3, "op": [3, "x", 4], "seq": 2, "ref": 9})
    err = await js.expect("error", skip=NOISE)
    assert err["code"] == "bad_message" and err["seq"] == 2 and err["ref"] == 9
    assert "would split a character: UTF-16 position 3 is inside '👍'" in err["message"]
    js.send({"type": "op", "rev": 3, "op": [6], "seq": 2})
    err = await js.expect("error", skip=NOISE)
    assert err["message"] == "the edit is for a document of 6 UTF-16 code units, but rev 3 has 7"
    # cursors: in the sender's units, relayed in each receiver's
    js.send({"type": "cursor", "rev": 3, "anchor": 6, "head": 7})  # "b" selected
    cur = await ann.c.expect("cursor", skip=("peer_joined", "peer_left"))
    assert (cur["anchor"], cur["head"]) == (4, 5)
    ann.c.send({"type": "cursor", "rev": 3, "anchor": 2})
    cur = await js.expect("cursor", skip=("peer_joined", "peer_left"))
    assert (cur["anchor"], cur["head"]) == (2, 2)
    js.send({"type": "cursor", "rev": 3, "anchor": 3})
    err = await js.expect("error", skip=NOISE)
    assert err["code"] == "bad_message" and "the cursor would split a character" in err["message"]
    # reconnecting with ?rev=: the missed ops in UTF-16 units
    again = await connect("/ws/edit/notes", name="js", units="utf16", rev=1)
    ops = (await again.expect("ops", skip=NOISE))["ops"]
    assert [e["op"] for e in ops] == [[3, "中👍🏽", 1], [1, -2, 6]]
    assert (await fetch_json(http_port, "/api/docs/notes"))["text"] == "a中👍🏽b"


@pytest.mark.gen_test
@pytest.mark.parametrize("app_options", [{"max_op_size": 3, "max_doc_size": 6}])
async def test_utf16_limits_count_code_units(connect, app_options):
    js = await connect("/ws/edit/notes", name="js", units="utf16")
    snap = await js.expect("snapshot", skip=NOISE)
    assert snap["limits"]["max_op_size"] == 3 and snap["units"] == "utf16"
    js.send({"type": "op", "rev": 0, "op": ["😀😀"], "seq": 1})  # 2 characters but 4 units
    err = await js.expect("error", skip=NOISE)
    assert err["code"] == "too_large" and "4 UTF-16 code units" in err["message"]
    js.send({"type": "op", "rev": 0, "op": ["😀a"], "seq": 1})
    assert (await js.expect("ack", skip=NOISE))["rev"] == 1


@pytest.mark.gen_test(timeout=15)
@pytest.mark.parametrize("app_options", [{"doc_idle_seconds": 0.05}])
async def test_utf16_catch_up_survives_an_unloaded_document(app, connect, http_port, app_options):
    js = await connect("/ws/edit/notes", name="js", units="utf16")
    await js.expect("snapshot", skip=NOISE)
    js.send({"type": "op", "rev": 0, "op": ["😀"], "seq": 1})
    await js.expect("ack", skip=NOISE)
    js.send({"type": "op", "rev": 1, "op": [2, "!"], "seq": 2})
    await js.expect("ack", skip=NOISE)
    js.close()
    await until(lambda: "notes" not in app.ctx.editing.docs)  # unloaded once idle
    # The snapshot written on unload (at rev 2) has committed.
    await until(lambda: app.ctx.store.read(
        lambda conn: conn.execute("SELECT 1 FROM doc_snapshots WHERE doc='notes' AND rev=2").fetchone()))
    again = await connect("/ws/edit/notes", name="js", units="utf16", rev=1)
    ops = (await again.expect("ops", skip=NOISE))["ops"]
    assert [e["op"] for e in ops] == [[2, "!"]]  # its UTF-16 form came back with the snapshot
    again.send({"type": "op", "rev": 1, "op": ["<", 2], "seq": 1})
    assert (await again.expect("ack", skip=NOISE))["rev"] == 3
    assert (await fetch_json(http_port, "/api/docs/notes"))["text"] == "<😀!"


# -- HTTP ------------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_http_api_lists_and_reads_documents(connect, http_port):
    ann = await seeded(connect, "alpha", doc="alpha")
    await seeded(connect, "beta text", doc="beta", name="bob")
    body = await fetch_json(http_port, "/api/docs")
    docs = {d["id"]: d for d in body["docs"]}
    assert set(docs) == {"alpha", "beta"}
    assert docs["beta"]["rev"] == 1 and docs["beta"]["length"] == 9 and docs["beta"]["peers"] == 1
    assert docs["alpha"]["updated"] >= docs["alpha"]["created"] > 0
    assert body["docs"][0]["id"] == "beta"  # most recently edited first
    one = await fetch_json(http_port, "/api/docs/alpha")
    assert one["id"] == "alpha" and one["text"] == "alpha" and one["rev"] == 1 and one["length"] == 5
    assert await http_status(http_port, "/api/docs/nope") == (404, {"error": "not_found",
                                                                   "message": "no document named nope"})
    code, err = await http_status(http_port, "/api/docs/bad.id")
    assert code == 400 and err["error"] == "bad_message"
    ann.c.close()
    metrics = (await AsyncHTTPClient().fetch("http://127.0.0.1:%d/metrics" % http_port)).body.decode()
    assert "realtime_doc_ops_applied_total 2.0" in metrics and "realtime_docs_open 2.0" in metrics


@pytest.mark.gen_test
async def test_pages(connect, http_port):
    await seeded(connect, "x", doc="listed-doc")
    client = AsyncHTTPClient()
    base = "http://127.0.0.1:%d" % http_port
    page = await client.fetch(base + "/edit/")
    html = page.body.decode()
    assert "listed-doc" in html and "Content-Security-Policy" in page.headers
    resp = await client.fetch(base + "/edit/?doc=fresh-doc", follow_redirects=False, raise_error=False)
    assert resp.code == 302 and resp.headers["Location"] == "/edit/fresh-doc"
    resp = await client.fetch(base + "/edit/?doc=bad+id", raise_error=False)
    assert resp.code == 400 and "letters, digits" in resp.body.decode()
    editor = await client.fetch(base + "/edit/listed-doc")
    assert 'data-doc="listed-doc"' in editor.body.decode()
    missing = await client.fetch(base + "/edit/bad.id", raise_error=False)
    assert missing.code == 404



@pytest.mark.gen_test
async def test_the_worked_tie_example_of_protocol_md_happens_as_written(connect, http_port):
    """docs/PROTOCOL.md, "Writing a client", 4: the document "ab" at rev 4, Ann
    and Bob insert at 1 at once, Bob's op reaches the server first; the op that
    arrived later (Ann's X) goes first: "aXYb" everywhere, with the very
    messages the table shows."""
    ann = await open_editor(connect, doc="tie", name="ann")
    for op in (["a"], [1, "b"], [2, "c"], [2, -1]):  # "ab" at rev 4
        ann.edit(op)
        await ann.settle(ann.ot.rev + 1)
    bob = await open_editor(connect, doc="tie", name="bob")
    assert (bob.first["rev"], bob.first["text"]) == (4, "ab")
    bob.c.send({"type": "op", "rev": 4, "op": [1, "Y", 1], "seq": 8})
    assert (await bob.c.expect("ack", skip=NOISE))["rev"] == 5
    to_ann = await ann.c.expect("op", skip=NOISE)
    assert (to_ann["rev"], to_ann["op"], to_ann["client"]) == (5, [1, "Y", 1], bob.client_id)
    ann.c.send({"type": "op", "rev": 4, "op": [1, "X", 1], "seq": ann.ot.next_seq})  # still based on rev 4
    assert (await ann.c.expect("ack", skip=NOISE))["rev"] == 6
    to_bob = await bob.c.expect("op", skip=NOISE)
    assert (to_bob["rev"], to_bob["op"]) == (6, [1, "X", 2])
    # What each client computes, as the table says: ot.transform(own_pending, server_op).
    assert ot.transform([1, "X", 1], [1, "Y", 1]) == ([1, "X", 2], [2, "Y", 1])
    assert ot.apply("aXb", [2, "Y", 1]) == ot.apply("aYb", [1, "X", 2]) == "aXYb"
    body = await fetch_json(http_port, "/api/docs/tie")
    assert (body["rev"], body["text"]) == (6, "aXYb")
