"""Editing one document through several nodes: one order for the cluster,
every copy converges, nobody is disconnected for it.

Clients are `websockets` connections running the OT client state machine
(realtime.ot.OTClient, the same rules ot.js follows); each node holds its own
copy of the document and appends to the one log in Redis."""

from __future__ import annotations

import asyncio
import json
import random
import re
from typing import Any

import pytest
import websockets

from realtime import ot
from tests.clients import request
from tests.cluster.test_chat_cluster import http, run
from tests.waiting import until

pytestmark = pytest.mark.cluster
# A small burst, so that fast acks (a quick machine) make the editors meet edit_rate and resend,
# as every client must; on a slow machine ops compose while they wait and fewer are sent.
EXTRA: tuple[str, ...] = ("--edit_burst=5",)


class Editor:
    def __init__(self, ws: Any, hello: dict[str, Any]) -> None:
        self.ws = ws
        self.text = hello["text"]
        self.client = ot.OTClient(hello["rev"], hello["client"])
        self.closed_with: int | None = None
        self.throttled = 0  # rate_limited refusals of our op (resent, as docs/PROTOCOL.md says)

    @classmethod
    async def open(cls, port: int, doc: str, name: str) -> "Editor":
        ws = await websockets.connect("ws://127.0.0.1:%d/ws/edit/%s?name=%s" % (port, doc, name))
        while True:
            msg = json.loads(await ws.recv())
            if msg["type"] == "snapshot":
                return cls(ws, msg)

    async def edit(self, rng: random.Random) -> None:
        n = len(self.text)
        pos = rng.randint(0, n)
        if n and rng.random() < 0.3:
            k = rng.randint(1, min(3, n - pos) or 1) if pos < n else 0
            op: list[Any] = ([pos] if pos else []) + ([-k] if k else []) + ([n - pos - k] if n - pos - k else [])
            if not k:
                return
        else:
            s = rng.choice(["a", "b", "é", "中", "😀", " "])
            op = ([pos] if pos else []) + [s] + ([n - pos] if n - pos else [])
        self.text = ot.apply(self.text, op)
        if self.client.apply_client(op):
            await self.send_pending()

    async def send_pending(self) -> None:
        p = self.client.pending()
        if p is not None:
            await self.ws.send(json.dumps({"type": "op", "rev": p.rev, "op": p.op, "seq": p.seq}))

    async def pump(self, until: float) -> None:
        """Read what the server sends until ``until`` (loop time)."""
        loop = asyncio.get_running_loop()
        while loop.time() < until:
            try:
                raw = await asyncio.wait_for(self.ws.recv(), max(0.01, until - loop.time()))
            except asyncio.TimeoutError:
                return
            except websockets.ConnectionClosed as e:
                self.closed_with = e.rcvd.code if e.rcvd else 1006
                return
            msg = json.loads(raw)
            if msg["type"] == "op":
                self.text = ot.apply(self.text, self.client.apply_server(msg["op"]))
            elif msg["type"] == "ack":
                if self.client.server_ack(msg["seq"]) is not None:
                    await self.send_pending()
            elif msg["type"] == "error":
                # The one error a fast typist may see: over edit_rate, the same op (same seq) is
                # resent a little later, as static/js/editing.js does. Anything else fails the test.
                if msg["code"] != "rate_limited" or msg.get("seq") != self.client.outstanding_seq:
                    raise AssertionError(msg)
                self.throttled += 1
                await asyncio.sleep(0.2)
                await self.send_pending()


def metric(text: str, name: str) -> float:
    found = re.search(r"^%s (\S+)$" % re.escape(name), text, re.M)
    assert found is not None, "%s is not in /metrics" % name
    return float(found.group(1))


@pytest.mark.parametrize("leader", ["leader", "no_leader"])
def test_editors_on_two_nodes_type_at_once_and_every_copy_converges(cluster: Any, leader: str) -> None:
    """With a leader per document (the default), one node orders the edits and
    the other forwards its editors' edits to it; with ``--doc_leader_ttl=0``
    both append, racing for each revision and rebasing when they lose."""
    a, b = cluster(2, *EXTRA, *(() if leader == "leader" else ("--doc_leader_ttl=0",)))

    async def main() -> None:
        rng = random.Random(7)
        editors = [await Editor.open(p, "shared", n) for p, n in ((a, "ann"), (b, "bob"), (a, "cy"), (b, "dee"))]
        loop = asyncio.get_running_loop()
        pumps = [asyncio.ensure_future(e.pump(loop.time() + 60)) for e in editors]
        for _ in range(40):
            for e in editors:
                await e.edit(rng)
            await asyncio.sleep(0.02)  # pacing: the edits of the four interleave with the traffic

        # Quiet: every op acknowledged, every copy at the revision both nodes serve.
        async def converged() -> bool:
            for p in pumps:
                if p.done():  # a pump that stopped (a close, an error) ends the wait: the asserts say why
                    p.result()
                    return True
            if not all(e.client.state == "synchronized" for e in editors):
                return False
            revs = {e.client.rev for e in editors}
            served = {(await asyncio.to_thread(http, p, "/api/docs/shared"))[1]["rev"] for p in (a, b)}
            return len(revs) == 1 and revs == served

        await until(converged, timeout=20, interval=0.05)
        for p in pumps:
            p.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        assert [e.closed_with for e in editors] == [None] * 4  # nobody was disconnected
        assert all(e.client.state == "synchronized" for e in editors)
        served = [(await asyncio.to_thread(http, p, "/api/docs/shared"))[1] for p in (a, b)]
        assert served[0]["text"] == served[1]["text"] and served[0]["rev"] == served[1]["rev"]
        assert [e.text for e in editors] == [served[0]["text"]] * 4
        assert served[0]["rev"] >= 50  # many ops, not a few composed ones (a busy machine composes more)
        for e in editors:
            await e.ws.close()

    run(main())
    seen = {}
    for port in (a, b):
        text = request(port, "/metrics").body
        seen[port] = {name: metric(text, "realtime_doc_%s_total" % name)
                      for name in ("remote_ops", "rebases", "forwarded_ops", "ops_for_others")}
        print("node %d: %s" % (port, seen[port]))
    if leader == "leader":  # one node led; the other's edits reached the log through it
        follower, led = sorted((a, b), key=lambda p: seen[p]["ops_for_others"])
        assert seen[follower]["forwarded_ops"] > 0 and seen[led]["ops_for_others"] > 0, seen
        assert seen[follower]["remote_ops"] > 0 and seen[led]["forwarded_ops"] == 0, seen
    else:  # both nodes appended, and each applied the other's edits
        assert all(seen[p]["remote_ops"] > 0 and seen[p]["forwarded_ops"] == 0 for p in (a, b)), seen


def test_the_peer_list_spans_nodes(cluster: Any) -> None:
    a, b = cluster(2, *EXTRA)

    async def main() -> None:
        ann = await websockets.connect("ws://127.0.0.1:%d/ws/edit/peers?name=ann" % a)
        hello = json.loads(await ann.recv())
        while hello["type"] != "snapshot":
            hello = json.loads(await ann.recv())
        bob = await websockets.connect("ws://127.0.0.1:%d/ws/edit/peers?name=bob" % b)
        names: set[str] = set()
        async with asyncio.timeout(10):
            while "ann" not in names:  # in bob's snapshot, or announced right after it
                msg = json.loads(await bob.recv())
                if msg["type"] == "snapshot":
                    names.update(p["user"]["name"] for p in msg["peers"])
                elif msg["type"] == "peer_joined":
                    names.add(msg["user"]["name"])
        async with asyncio.timeout(10):  # and ann, on the other node, hears of bob
            while True:
                msg = json.loads(await ann.recv())
                if msg["type"] == "peer_joined" and msg["user"]["name"] == "bob":
                    break
        await bob.close()
        async with asyncio.timeout(10):
            while True:
                msg = json.loads(await ann.recv())
                if msg["type"] == "peer_left" and msg["user"]["name"] == "bob":
                    break
        await ann.close()

    run(main())


async def _snapshot(port: int, doc: str, query: str) -> tuple[Any, dict[str, Any]]:
    ws = await websockets.connect("ws://127.0.0.1:%d/ws/edit/%s?%s" % (port, doc, query))
    while True:
        msg = json.loads(await ws.recv())
        if msg["type"] == "snapshot":
            return ws, msg


async def _next(ws: Any, mtype: str, where: Any = lambda m: True) -> dict[str, Any]:
    async with asyncio.timeout(10):
        while True:
            msg = json.loads(await ws.recv())
            if msg["type"] == mtype and where(msg):
                return msg


def test_a_peer_on_another_node_shows_its_cursor_to_those_who_join_later(cluster: Any) -> None:
    """Others' selections span nodes from the first moment: a node that
    loads the document learns them with the peer list (peer_joined, then its
    cursor), and one that has it loaded puts them in the next snapshot, in the
    joiner's units."""
    a, b = cluster(2, *EXTRA)

    async def main() -> None:
        ann, hello = await _snapshot(a, "sel", "name=ann")
        await ann.send(json.dumps({"type": "op", "rev": hello["rev"], "op": ["😀 hello world"], "seq": 1}))
        ack = await _next(ann, "ack")
        await ann.send(json.dumps({"type": "cursor", "rev": ack["rev"], "anchor": 2, "head": 7}))
        await asyncio.sleep(0.3)  # relayed to the other nodes (none has the document yet)

        # Node B loads the document for bob: ann arrives as peer_joined, then her selection.
        bob, first = await _snapshot(b, "sel", "name=bob")
        assert first["text"] == "😀 hello world"
        anns = [p for p in first["peers"] if p["user"]["name"] == "ann"]
        if not anns:
            await _next(bob, "peer_joined", lambda m: m["user"]["name"] == "ann")
            sel = await _next(bob, "cursor", lambda m: m["user"]["name"] == "ann")
            assert (sel["anchor"], sel["head"]) == (2, 7)
        else:
            assert anns[0].get("cursor") == {"anchor": 2, "head": 7}

        # Ann moves (node B relays it and keeps it); cy joins on B counting UTF-16: the snapshot has it.
        await ann.send(json.dumps({"type": "cursor", "rev": ack["rev"], "anchor": 1, "head": 8}))
        moved = await _next(bob, "cursor", lambda m: m["user"]["name"] == "ann")
        assert (moved["anchor"], moved["head"]) == (1, 8)
        cy, snap = await _snapshot(b, "sel", "name=cy&units=utf16")
        (ann_there,) = [p for p in snap["peers"] if p["user"]["name"] == "ann"]
        assert ann_there["cursor"] == {"anchor": 2, "head": 9}  # the emoji is two UTF-16 units
        for ws in (ann, bob, cy):
            await ws.close()

    run(main())
