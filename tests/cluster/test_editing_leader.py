"""A leader per document (cluster mode): the node that holds a document's
lease orders its edits, the others forward theirs; when the leader goes away
another node takes over and nothing acknowledged, or sent, is lost.

Each test opens the document on node A first (so A leads it) and edits
through node B (so B's edits are forwarded), then takes A away."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from typing import Any

import pytest
import websockets

from tests.clients import request
from tests.cluster.test_chat_cluster import http, run
from tests.cluster.test_editing_cluster import metric

pytestmark = pytest.mark.cluster


class Typist:
    """A `websockets` editor that makes one insert at a time and waits for its ack."""

    def __init__(self, ws: Any, hello: dict[str, Any]) -> None:
        self.ws, self.rev, self.text, self.seq = ws, hello["rev"], hello["text"], 0

    @classmethod
    async def open(cls, port: int, doc: str) -> "Typist":
        ws = await websockets.connect("ws://127.0.0.1:%d/ws/edit/%s" % (port, doc))
        while True:
            msg = json.loads(await ws.recv())
            if msg["type"] == "snapshot":
                return cls(ws, msg)

    async def insert(self, s: str, timeout: float) -> float:
        """Append ``s``; seconds until its ack."""
        self.seq += 1
        op = ([len(self.text)] if self.text else []) + [s]
        started = time.monotonic()
        await self.ws.send(json.dumps({"type": "op", "rev": self.rev, "op": op, "seq": self.seq}))
        async with asyncio.timeout(timeout):
            while True:
                msg = json.loads(await self.ws.recv())
                if msg["type"] == "error":
                    raise AssertionError(msg)
                if msg["type"] == "op":  # nobody else types here
                    raise AssertionError("unexpected op %r" % msg)
                if msg["type"] == "ack" and msg["seq"] == self.seq:
                    self.rev, self.text = msg["rev"], self.text + s
                    return time.monotonic() - started


def metrics(port: int) -> dict[str, float]:
    text = request(port, "/metrics").body
    return {n: metric(text, "realtime_doc_%s_total" % n) for n in ("forwarded_ops", "ops_for_others", "leader_changes")}


def test_when_the_leader_is_killed_another_node_takes_over_and_the_edits_sent_meanwhile_land(cluster: Any) -> None:
    a, b = cluster(2, "--doc_leader_ttl=1")

    async def main() -> None:
        ann = await Typist.open(a, "killed")  # A loads it first: A leads
        bob = await Typist.open(b, "killed")
        for s in "abc":
            await bob.insert(s, timeout=5)
        assert metrics(b)["forwarded_ops"] == 3 and metrics(a)["ops_for_others"] == 3
        cluster.procs[0].kill()  # no goodbye: its lease runs out
        await ann.ws.close()
        # Sent while nobody leads: resent until B holds the lease (about 1 s), then applied once.
        took = await bob.insert("d", timeout=10)
        assert took < 5, took
        await bob.insert("e", timeout=5)  # and B goes on leading it
        assert (await asyncio.to_thread(http, b, "/api/docs/killed"))[1]["text"] == "abcde"
        assert metrics(b)["leader_changes"] >= 1
        await bob.ws.close()

    run(main())


@pytest.mark.parametrize("how", ["sigterm", "unloaded"])
def test_a_leader_that_lets_go_hands_over_at_once(cluster: Any, how: str) -> None:
    """A leader that stops (SIGTERM, a rolling restart) or unloads the
    document (its last editor left) gives up the lease and says so: the
    other node leads at once, not a lease lifetime (here 60 s) later."""
    a, b = cluster(2, "--doc_leader_ttl=60", "--doc_idle_seconds=0.3")

    async def main() -> None:
        ann = await Typist.open(a, "handover")
        await ann.insert("x", timeout=5)
        bob = await Typist.open(b, "handover")
        await bob.insert("y", timeout=5)
        assert metrics(a)["ops_for_others"] == 1
        await ann.ws.close()
        if how == "sigterm":
            cluster.procs[0].send_signal(signal.SIGTERM)
            await asyncio.to_thread(cluster.procs[0].wait, 15)
        else:
            deadline = time.monotonic() + 10  # A unloads the document once its editor left
            while request(a, "/metrics").body.find("realtime_docs_open 0.0") < 0:
                assert time.monotonic() < deadline, "node A never unloaded the document"
                await asyncio.sleep(0.05)
        took = await bob.insert("z", timeout=10)
        assert took < 5, took  # not the 60 s of the lease
        assert metrics(b)["leader_changes"] == 1  # ("z" may have gone to A first, and been applied by B)
        assert (await asyncio.to_thread(http, b, "/api/docs/handover"))[1]["text"] == "xyz"
        await bob.ws.close()

    run(main())
