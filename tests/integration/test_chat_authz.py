"""Private rooms, direct messages and moderation over real sockets (token mode: roles come from tokens)."""

from __future__ import annotations

import json

import pytest
from tornado.httpclient import AsyncHTTPClient

from realtime.chat import dm_room

SECRET = "s" * 40
TOKEN_MODE = {"auth": "token", "jwt_secret": SECRET}


def token(app, sub, roles=()):
    return app.ctx.auth.make_token(sub, sub.capitalize(), list(roles))


async def person(connect, app, sub, *roles):
    c = await connect("/ws/chat", token=token(app, sub, roles))
    c.welcome = await c.expect("welcome")
    return c


async def expect_any(client, types, timeout=3.0):
    """The next message of one of ``types``; chat traffic in between is skipped."""
    while True:
        msg = await client.recv(timeout)
        assert msg is not None, "closed (%s)" % client.conn.close_code
        if msg["type"] in types:
            return msg
        assert msg["type"] in ("presence", "typing", "message", "member", "deleted", "left"), msg


async def ask(client, msg, reply="joined"):
    """Send ``msg``; the reply of type ``reply`` or the error."""
    client.send(msg)
    return await expect_any(client, (reply, "error"))


async def saw(client, mtype, **match):
    """The first message of ``mtype`` (with the ``match`` fields) this client
    received, read before or now."""
    def matches(m):
        return m["type"] == mtype and all(m.get(k) == v for k, v in match.items())

    while True:
        for m in client.seen:
            if matches(m):
                return m
        await client.recv()


async def http_get(port, path, app=None, sub=None, roles=()):
    headers = {"Authorization": "Bearer " + token(app, sub, roles)} if sub else {}
    resp = await AsyncHTTPClient().fetch("http://127.0.0.1:%d%s" % (port, path), headers=headers,
                                         raise_error=False)
    return resp.code, json.loads(resp.body)


async def say(client, room, text, cid):
    client.send({"type": "say", "room": room, "text": text, "cid": cid})
    ack = await expect_any(client, ("ack", "error"))
    assert ack["type"] == "ack", ack
    return ack["seq"]


@pytest.mark.gen_test
@pytest.mark.parametrize("app_options", [TOKEN_MODE])
async def test_a_private_room_is_read_by_its_members_only(connect, app, http_port):
    ann = await person(connect, app, "ann")
    bob = await person(connect, app, "bob")
    carl = await person(connect, app, "carl")
    created = await ask(ann, {"type": "create", "room": "ops", "members": ["bob"], "ref": 1}, "created")
    assert created == {"type": "created", "room": "ops", "kind": "private", "owner": "ann", "ref": 1,
                       "members": [{"id": "ann", "role": "owner"}, {"id": "bob", "role": "member"}]}
    j = await ask(ann, {"type": "join", "room": "ops"})
    assert j["kind"] == "private" and j["messages"] == []
    await say(ann, "ops", "the launch code is 1234", "a1")
    # The name is taken: by this private room, for everyone.
    assert (await ask(carl, {"type": "create", "room": "ops"}, "created"))["code"] == "conflict"
    # carl is not a member: forbidden on join (no history), on say, and over HTTP.
    refused = await ask(carl, {"type": "join", "room": "ops", "ref": 2})
    assert (refused["type"], refused["code"], refused["ref"]) == ("error", "forbidden", 2)
    assert (await ask(carl, {"type": "say", "room": "ops", "text": "hi"}, "ack"))["code"] == "not_found"
    assert await http_get(http_port, "/api/rooms/ops/messages", app, "carl") == (
        403, {"error": "forbidden", "message": "room ops is private: only its members may read it"})
    code, body = await http_get(http_port, "/api/rooms", app, "carl")
    assert code == 200 and "ops" not in [r["room"] for r in body["rooms"]]
    # bob is: he reads the history, live and over HTTP, and sees the room listed.
    jb = await ask(bob, {"type": "join", "room": "ops"})
    assert [m["text"] for m in jb["messages"]] == ["the launch code is 1234"]
    code, body = await http_get(http_port, "/api/rooms/ops/messages", app, "bob")
    assert code == 200 and [m["text"] for m in body["messages"]] == ["the launch code is 1234"]
    code, body = await http_get(http_port, "/api/rooms", app, "bob")
    assert "ops" in [r["room"] for r in body["rooms"]]
    # Nothing said in ops ever reached carl.
    await carl.nothing_before_pong("message", after=(ann, bob))
    assert not any(m.get("room") == "ops" and m["type"] == "message" for m in carl.seen)


@pytest.mark.gen_test
@pytest.mark.parametrize("app_options", [TOKEN_MODE])
async def test_direct_messages_exist_implicitly_and_only_the_two_read_them(connect, app, http_port):
    ann = await person(connect, app, "ann")
    bob = await person(connect, app, "bob")
    carl = await person(connect, app, "carl")
    name = dm_room("ann", "bob")
    assert name == dm_room("bob", "ann") and name.startswith("dm-")
    # Before either asks for it, the room does not exist: a plain join cannot create it.
    assert (await ask(carl, {"type": "join", "room": name}))["code"] == "not_found"
    j = await ask(ann, {"type": "join", "with": "bob"})
    assert (j["room"], j["kind"], j["with"]) == (name, "dm", "bob")
    await say(ann, name, "psst", "a1")
    jb = await ask(bob, {"type": "join", "with": "ann"})
    assert jb["room"] == name and [m["text"] for m in jb["messages"]] == ["psst"]
    await say(bob, name, "hi ann", "b1")
    assert (await ann.expect("message"))["text"] == "psst"
    assert (await ann.expect("message"))["text"] == "hi ann"
    for attempt in ({"type": "join", "room": name}, {"type": "join", "with": "ann"}):
        reply = await ask(carl, attempt)
        # carl may have his own room with ann, but never ann and bob's.
        assert reply["type"] == "error" and reply["code"] == "forbidden" or reply["room"] != name
    assert (await http_get(http_port, "/api/rooms/%s/messages" % name, app, "carl"))[0] == 403
    assert (await http_get(http_port, "/api/rooms/%s/messages" % name))[0] == 401  # token mode: a token first
    assert name not in [r["room"] for r in (await http_get(http_port, "/api/rooms", app, "carl"))[1]["rooms"]]
    assert name in [r["room"] for r in (await http_get(http_port, "/api/rooms", app, "bob"))[1]["rooms"]]
    # Its members cannot change, not even by an admin.
    admin = await person(connect, app, "root", "admin")
    for op in ("add_member", "remove_member"):
        assert (await ask(admin, {"type": op, "room": name, "user": "bob"}, "ack"))["code"] == "forbidden"
    assert (await ask(ann, {"type": "join", "with": "ann"}))["code"] == "bad_message"
    assert (await ask(ann, {"type": "create", "room": "dm-mine"}, "created"))["code"] == "bad_message"


@pytest.mark.gen_test
@pytest.mark.parametrize("app_options", [TOKEN_MODE])
async def test_a_moderator_deletes_a_message_every_member_sees_the_tombstone_in_seq_order(connect, app, http_port):
    ann = await person(connect, app, "ann")
    bob = await person(connect, app, "bob")
    mod = await person(connect, app, "mo", "moderator")
    epoch = [(await ask(c, {"type": "join", "room": "lobby"}))["epoch"] for c in (ann, bob, mod)][0]
    s1 = await say(bob, "lobby", "nice day", "b1")
    s2 = await say(bob, "lobby", "buy cheap pills", "b2")
    for c in (ann, mod):
        assert [(await c.expect("message"))["seq"] for _ in range(2)] == [s1, s2]
    # Not a moderator: forbidden, and nothing changes.
    assert (await ask(ann, {"type": "delete", "room": "lobby", "seq": s2, "ref": 9}, "ack"))["code"] == "forbidden"
    ack = await ask(mod, {"type": "delete", "room": "lobby", "seq": s2, "ref": 3}, "ack")
    assert ack == {"type": "ack", "room": "lobby", "seq": s2 + 1, "target": s2, "ref": 3}
    tomb = {"type": "deleted", "room": "lobby", "seq": s2 + 1, "target": s2, "by": {"id": "mo", "name": "Mo"}}
    for c in (ann, bob, mod):
        got = await saw(c, "deleted")
        assert {k: v for k, v in got.items() if k != "ts"} == tomb
    # A retried delete is the same tombstone; a tombstone or a missing seq is not a message.
    again = await ask(mod, {"type": "delete", "room": "lobby", "seq": s2}, "ack")
    assert (again["seq"], again["duplicate"]) == (s2 + 1, True)
    assert (await ask(mod, {"type": "delete", "room": "lobby", "seq": s2 + 1}, "ack"))["code"] == "not_found"
    await ann.nothing_before_pong("deleted", skip=("presence", "message", "deleted"), after=(mod,))
    assert [m["seq"] for m in ann.seen if m["type"] == "deleted"] == [s2 + 1]
    # Later reads: a fresh join, a resume, HTTP, all show the message deleted and the tombstone after it.
    dave = await person(connect, app, "dave")
    hist = (await ask(dave, {"type": "join", "room": "lobby"}))["messages"]
    assert [(m["seq"], m["type"], m.get("deleted", False), m.get("text")) for m in hist] == [
        (s1, "message", False, "nice day"), (s2, "message", True, ""), (s2 + 1, "deleted", False, None)]
    ann2 = await person(connect, app, "ann")
    resumed = await ask(ann2, {"type": "join", "room": "lobby", "since": s1, "epoch": epoch})
    assert resumed["recovered"] and [m["seq"] for m in resumed["messages"]] == [s2, s2 + 1]
    assert resumed["messages"][0]["deleted"] and resumed["messages"][0]["text"] == ""
    code, body = await http_get(http_port, "/api/rooms/lobby/messages", app, "ann")
    assert body["messages"] == hist
    assert "buy cheap pills" not in json.dumps(body)
    # bob's retry of the deleted message is acknowledged as the original, not posted again.
    bob.send({"type": "say", "room": "lobby", "text": "buy cheap pills", "cid": "b2"})
    retry = await bob.expect("ack", skip=("presence", "message", "deleted"))
    assert (retry["seq"], retry["duplicate"]) == (s2, True)


@pytest.mark.gen_test
@pytest.mark.parametrize("app_options", [TOKEN_MODE])
async def test_removing_a_member_takes_its_connections_out_of_the_room(connect, app, http_port):
    ann = await person(connect, app, "ann")
    bob = await person(connect, app, "bob")
    bob2 = await person(connect, app, "bob")  # a second tab
    carl = await person(connect, app, "carl")
    await ask(ann, {"type": "create", "room": "ops", "members": ["bob", "carl"]}, "created")
    for c in (ann, bob, bob2, carl):
        await ask(c, {"type": "join", "room": "ops"})
    # A member who is not the owner (nor a moderator) manages nothing.
    assert (await ask(carl, {"type": "remove_member", "room": "ops", "user": "bob"}, "ack"))["code"] == "forbidden"
    assert (await ask(carl, {"type": "add_member", "room": "ops", "user": "eve"}, "ack"))["code"] == "forbidden"
    assert (await ask(bob, {"type": "remove_member", "room": "ops", "user": "ann"}, "ack"))["code"] == "forbidden"
    ack = await ask(ann, {"type": "remove_member", "room": "ops", "user": "bob"}, "ack")
    event = {"type": "member", "room": "ops", "seq": ack["seq"], "event": "removed", "user": "bob",
             "by": {"id": "ann", "name": "Ann"}}
    for c in (ann, carl, bob, bob2):
        got = await saw(c, "member", event="removed")
        assert {k: v for k, v in got.items() if k != "ts"} == event
    for c in (bob, bob2):
        assert await saw(c, "left") == {"type": "left", "room": "ops", "reason": "removed"}
    await say(ann, "ops", "bob is gone", "a1")
    assert (await saw(carl, "message", text="bob is gone"))["seq"] == ack["seq"] + 1
    await bob.nothing_before_pong("message", after=(ann,))
    assert (await ask(bob, {"type": "say", "room": "ops", "text": "x"}, "ack"))["code"] == "not_found"
    assert (await ask(bob, {"type": "join", "room": "ops"}))["code"] == "forbidden"
    assert (await http_get(http_port, "/api/rooms/ops/messages", app, "bob"))[0] == 403
    # The owner can add him back; a member may leave for good by removing itself.
    await ask(ann, {"type": "add_member", "room": "ops", "user": "bob"}, "ack")
    assert (await ask(bob, {"type": "join", "room": "ops"}))["type"] == "joined"
    assert (await ask(carl, {"type": "remove_member", "room": "ops", "user": "carl"}, "ack"))["type"] == "ack"
    listed = await ask(ann, {"type": "members", "room": "ops"}, "member_list")
    assert listed["members"] == [{"id": "ann", "role": "owner"}, {"id": "bob", "role": "member"}]
    assert (await ask(carl, {"type": "members", "room": "ops"}, "member_list"))["code"] == "forbidden"


@pytest.mark.gen_test
@pytest.mark.parametrize("app_options", [TOKEN_MODE])
async def test_moderators_remove_users_from_public_rooms_until_added_back(connect, app, http_port):
    eve = await person(connect, app, "eve")
    ann = await person(connect, app, "ann")
    mod = await person(connect, app, "mo", "moderator")
    admin = await person(connect, app, "root", "admin")
    for c in (eve, ann, mod):
        await ask(c, {"type": "join", "room": "lobby"})
    assert (await ask(ann, {"type": "remove_member", "room": "lobby", "user": "eve"}, "ack"))["code"] == "forbidden"
    await ask(mod, {"type": "remove_member", "room": "lobby", "user": "eve"}, "ack")
    assert (await saw(eve, "left"))["reason"] == "removed"
    refused = await ask(eve, {"type": "join", "room": "lobby"})
    assert (refused["code"], refused["message"]) == ("forbidden", "you were removed from room lobby")
    assert (await http_get(http_port, "/api/rooms/lobby/messages", app, "eve"))[0] == 403
    assert (await http_get(http_port, "/api/rooms/lobby/messages", app, "ann"))[0] == 200
    assert (await ask(mod, {"type": "remove_member", "room": "lobby", "user": "eve"}, "ack"))["code"] == "conflict"
    listed = await ask(mod, {"type": "members", "room": "lobby"}, "member_list")
    assert listed["members"] == [{"id": "eve", "role": "banned"}]
    assert (await ask(ann, {"type": "members", "room": "lobby"}, "member_list"))["code"] == "forbidden"
    # An admin is a moderator too, and may manage any private room's members without being in it.
    await ask(admin, {"type": "add_member", "room": "lobby", "user": "eve"}, "ack")
    assert (await ask(eve, {"type": "join", "room": "lobby"}))["type"] == "joined"
    await ask(ann, {"type": "create", "room": "ann-only"}, "created")
    assert (await ask(admin, {"type": "join", "room": "ann-only"}))["code"] == "forbidden"
    await ask(admin, {"type": "add_member", "room": "ann-only", "user": "eve"}, "ack")
    assert (await ask(eve, {"type": "join", "room": "ann-only"}))["type"] == "joined"
    # A moderator who is not a member of a private room can neither read it nor delete in it.
    await ask(ann, {"type": "join", "room": "ann-only"})
    seq = await say(ann, "ann-only", "mine", "a1")
    assert (await ask(mod, {"type": "delete", "room": "ann-only", "seq": seq}, "ack"))["code"] == "forbidden"
    assert (await ask(admin, {"type": "delete", "room": "ann-only", "seq": seq}, "ack"))["code"] == "forbidden"


@pytest.mark.gen_test
async def test_open_mode_guests_keep_private_rooms_by_their_session(connect, http_port):
    ann = await connect("/ws/chat", name="ann")
    w = await ann.expect("welcome")
    bob = await connect("/ws/chat", name="bob")
    wb = await bob.expect("welcome")
    created = await ask(ann, {"type": "create", "room": "den", "members": [wb["user"]["id"]]}, "created")
    assert created["owner"] == w["user"]["id"]
    await ask(ann, {"type": "join", "room": "den"})
    await say(ann, "den", "guests only", "a1")
    http = AsyncHTTPClient()
    url = "http://127.0.0.1:%d/api/rooms/den/messages" % http_port
    anon = await http.fetch(url, raise_error=False)
    assert anon.code == 403
    mine = await http.fetch(url + "?session=" + wb["session"], raise_error=False)
    assert mine.code == 200 and json.loads(mine.body)["messages"][0]["text"] == "guests only"
    listed = await http.fetch("http://127.0.0.1:%d/api/rooms" % http_port)
    assert "den" not in [r["room"] for r in json.loads(listed.body)["rooms"]]
    carl = await connect("/ws/chat", name="carl")
    await carl.expect("welcome")
    assert (await ask(carl, {"type": "join", "room": "den"}))["code"] == "forbidden"
    # Moderation needs a role, which guests never have.
    assert (await ask(ann, {"type": "delete", "room": "den", "seq": 1}, "ack"))["code"] == "forbidden"
