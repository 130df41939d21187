"""Private rooms, tombstones and removals across nodes: what one node stores, every node enforces."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest

from realtime.chat import dm_room
from tests.cluster.test_chat_cluster import Chat, http, run

pytestmark = pytest.mark.cluster

SECRET = "cluster-secret-" + "x" * 32
TOKEN_ARGS = ("--auth=token", "--jwt_secret=" + SECRET)


def token(sub: str, *roles: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "name": sub, "roles": list(roles), "iat": now, "exp": now + 600}, SECRET,
                      algorithm="HS256")


async def person(port: int, sub: str, *roles: str) -> Chat:
    return await Chat.open(port, "token=" + token(sub, *roles))


async def until(chat: Chat, mtype: str, timeout: float = 5.0) -> dict[str, Any]:
    """The next message of ``mtype``, whatever comes before it (kept in the inbox if a chat message)."""
    import asyncio
    import json

    async with asyncio.timeout(timeout):
        while True:
            msg = json.loads(await chat.ws.recv())
            if msg["type"] == mtype:
                return msg
            if msg["type"] == "message":
                chat.inbox.append(msg)


def test_a_tombstone_and_a_removal_made_on_one_node_hold_on_the_others(cluster: Any) -> None:
    a, b = cluster(2, *TOKEN_ARGS)

    async def main() -> None:
        ann = await person(a, "ann")
        mod = await person(a, "mo", "moderator")
        bob = await person(b, "bob")
        carl = await person(b, "carl")
        await ann.send({"type": "create", "room": "ops", "members": ["bob", "mo"]})
        await until(ann, "created")
        for c in (ann, mod, bob):
            await c.join("ops")
        refused = await until_error(carl, {"type": "join", "room": "ops"})
        assert refused["code"] == "forbidden"
        await bob.send({"type": "say", "room": "ops", "text": "secret plan", "cid": "b1"})
        seq = (await bob.expect("ack"))["seq"]
        assert (await ann.expect("message"))["seq"] == seq
        # Deleted on node A: bob on node B sees the tombstone, and a join on B sees the message deleted.
        await mod.send({"type": "delete", "room": "ops", "seq": seq})
        tomb = await until(bob, "deleted")
        assert (tomb["target"], tomb["seq"]) == (seq, seq + 1)
        bob2 = await person(b, "bob")
        hist = (await bob2.join("ops"))["messages"]
        assert [(m["seq"], m.get("deleted"), m.get("text")) for m in hist] == [(seq, True, ""), (seq + 1, None, None)]
        status, body = http(b, "/api/rooms/ops/messages", headers={"Authorization": "Bearer " + token("bob")})
        assert status == 200 and "secret plan" not in str(body)
        # Removed on node A: both of bob's connections on node B leave the room.
        await ann.send({"type": "remove_member", "room": "ops", "user": "bob"})
        for c in (bob, bob2):
            assert (await until(c, "member"))["event"] == "removed"
            assert (await until(c, "left"))["reason"] == "removed"
        await ann.send({"type": "say", "room": "ops", "text": "after bob", "cid": "a2"})
        await until(ann, "ack")
        assert (await until_error(bob, {"type": "join", "room": "ops"}))["code"] == "forbidden"
        status, _ = http(b, "/api/rooms/ops/messages", headers={"Authorization": "Bearer " + token("bob")})
        assert status == 403
        for c in (ann, mod, bob, bob2, carl):
            await c.close()

    run(main())


async def until_error(chat: Chat, msg: dict[str, Any]) -> dict[str, Any]:
    await chat.send(msg)
    return await until(chat, "error")


def test_a_direct_message_room_is_the_same_room_on_every_node_and_no_one_else_lists_it(cluster: Any) -> None:
    a, b = cluster(2, *TOKEN_ARGS)

    async def main() -> None:
        ann = await person(a, "ann")
        bob = await person(b, "bob")
        j = await ann.join(**{"with": "bob"})
        assert j["room"] == dm_room("ann", "bob") and j["kind"] == "dm"
        jb = await bob.join(**{"with": "ann"})
        assert jb["room"] == j["room"] and jb["epoch"] == j["epoch"]
        await ann.send({"type": "say", "room": j["room"], "text": "hi bob", "cid": "a1"})
        await ann.expect("ack")
        assert (await bob.expect("message"))["text"] == "hi bob"
        for port in (a, b):
            _, rooms = http(port, "/api/rooms", headers={"Authorization": "Bearer " + token("carl")})
            assert j["room"] not in [r["room"] for r in rooms["rooms"]]
            _, rooms = http(port, "/api/rooms", headers={"Authorization": "Bearer " + token("bob")})
            assert j["room"] in [r["room"] for r in rooms["rooms"]]
        for c in (ann, bob):
            await c.close()

    run(main())
