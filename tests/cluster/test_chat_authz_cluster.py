"""Private rooms, tombstones and removals across nodes: what one node stores, every node enforces."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest

from realtime.chat import dm_room
from tests.clients import Client
from tests.cluster.test_chat_cluster import chat, http, join, run

pytestmark = pytest.mark.cluster

SECRET = "cluster-secret-" + "x" * 32
TOKEN_ARGS = ("--auth=token", "--jwt_secret=" + SECRET)
ANY = ("presence", "typing", "message", "member", "deleted", "left", "ack", "created", "error")


def token(sub: str, *roles: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "name": sub, "roles": list(roles), "iat": now, "exp": now + 600}, SECRET,
                      algorithm="HS256")


def bearer(sub: str) -> dict[str, str]:
    return {"Authorization": "Bearer " + token(sub)}


async def person(port: int, sub: str, *roles: str) -> Client:
    return await chat(port, "token=" + token(sub, *roles))


async def until(c: Client, mtype: str) -> dict[str, Any]:
    """The next message of ``mtype``, whatever comes before it (chat messages are kept for later)."""
    return await c.expect(mtype, skip=ANY)


async def ask(c: Client, msg: dict[str, Any], reply: str) -> dict[str, Any]:
    """Send ``msg``: its reply of type ``reply``, or its error."""
    c.send({**msg, "ref": "q"})
    skip = tuple(t for t in ANY if t != "error" or reply == "error")  # an unexpected error fails at once
    return await c.expect(reply, skip=skip, where=lambda m: m.get("ref") == "q")


def test_a_tombstone_and_a_removal_made_on_one_node_hold_on_the_others(cluster: Any) -> None:
    a, b = cluster(2, *TOKEN_ARGS)

    async def main() -> None:
        ann = await person(a, "ann")
        mod = await person(a, "mo", "moderator")
        bob = await person(b, "bob")
        carl = await person(b, "carl")
        await ask(ann, {"type": "create", "room": "ops", "members": ["bob", "mo"]}, "created")
        for c in (ann, mod, bob):
            await join(c, "ops")
        assert (await ask(carl, {"type": "join", "room": "ops"}, "error"))["code"] == "forbidden"
        bob.send({"type": "say", "room": "ops", "text": "secret plan", "cid": "b1"})
        seq = (await until(bob, "ack"))["seq"]
        assert (await ann.expect("message"))["seq"] == seq
        # Deleted on node A: bob on node B sees the tombstone, and a join on B sees the message deleted.
        mod.send({"type": "delete", "room": "ops", "seq": seq})
        tomb = await until(bob, "deleted")
        assert (tomb["target"], tomb["seq"]) == (seq, seq + 1)
        bob2 = await person(b, "bob")
        hist = (await join(bob2, "ops"))["messages"]
        assert [(m["seq"], m.get("deleted"), m.get("text")) for m in hist] == [(seq, True, ""), (seq + 1, None, None)]
        status, body = http(b, "/api/rooms/ops/messages", headers=bearer("bob"))
        assert status == 200 and "secret plan" not in str(body)
        # Removed on node A: both of bob's connections on node B leave the room.
        ann.send({"type": "remove_member", "room": "ops", "user": "bob"})
        for c in (bob, bob2):
            assert (await until(c, "member"))["event"] == "removed"
            assert (await until(c, "left"))["reason"] == "removed"
        ann.send({"type": "say", "room": "ops", "text": "after bob", "cid": "a2"})
        await until(ann, "ack")
        assert (await ask(bob, {"type": "join", "room": "ops"}, "error"))["code"] == "forbidden"
        assert http(b, "/api/rooms/ops/messages", headers=bearer("bob"))[0] == 403
        for c in (ann, mod, bob, bob2, carl):
            c.close()

    run(main())


def test_a_direct_message_room_is_the_same_room_on_every_node_and_no_one_else_lists_it(cluster: Any) -> None:
    a, b = cluster(2, *TOKEN_ARGS)

    async def main() -> None:
        ann = await person(a, "ann")
        bob = await person(b, "bob")
        j = await join(ann, **{"with": "bob"})
        assert j["room"] == dm_room("ann", "bob") and j["kind"] == "dm"
        jb = await join(bob, **{"with": "ann"})
        assert jb["room"] == j["room"] and jb["epoch"] == j["epoch"]
        ann.send({"type": "say", "room": j["room"], "text": "hi bob", "cid": "a1"})
        await until(ann, "ack")
        assert (await bob.expect("message"))["text"] == "hi bob"
        for port in (a, b):
            _, rooms = http(port, "/api/rooms", headers=bearer("carl"))
            assert j["room"] not in [r["room"] for r in rooms["rooms"]]
            _, rooms = http(port, "/api/rooms", headers=bearer("bob"))
            assert j["room"] in [r["room"] for r in rooms["rooms"]]
        for c in (ann, bob):
            c.close()

    run(main())
