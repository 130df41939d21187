"""Chat over real sockets: the documented protocol, end to end."""

from __future__ import annotations

import asyncio
import json
import sqlite3

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from tests.waiting import until


async def joined(client, room="lobby", **extra):
    client.send({"type": "join", "room": room, **extra})
    return await client.expect("joined")


async def user(connect, name, room="lobby", **params):
    c = await connect("/ws/chat", name=name, **params)
    welcome = await c.expect("welcome")
    c.welcome = welcome
    if room:
        c.joined = await joined(c, room)
    return c


@pytest.mark.gen_test
async def test_welcome_names_the_user_and_a_session_keeps_identity(connect):
    ann = await connect("/ws/chat", name="ann")
    w = await ann.expect("welcome")
    assert w["user"]["name"] == "ann" and w["user"]["id"]
    assert w["limits"]["max_text"] == 2000
    again = await connect("/ws/chat", session=w["session"])
    w2 = await again.expect("welcome")
    assert w2["user"] == w["user"]


@pytest.mark.gen_test
async def test_say_is_acked_and_broadcast_to_every_member(connect):
    ann = await user(connect, "ann")
    bob = await user(connect, "bob")
    assert bob.joined["member_count"] == 2
    ann.send({"type": "say", "room": "lobby", "text": "hello <b>bob</b>", "cid": "c-1"})
    ack = await ann.expect("ack")
    assert ack == {"type": "ack", "room": "lobby", "seq": 1, "cid": "c-1"}
    for c in (ann, bob):
        m = await c.expect("message")
        assert m["seq"] == 1 and m["text"] == "hello <b>bob</b>" and m["name"] == "ann"
        assert m["user"] == ann.welcome["user"]["id"] and m["cid"] == "c-1" and m["ts"] > 0


@pytest.mark.gen_test
async def test_retry_with_same_cid_is_acked_again_not_stored_twice(connect, http_port):
    ann = await user(connect, "ann")
    bob = await user(connect, "bob")
    for _ in range(3):
        ann.send({"type": "say", "room": "lobby", "text": "once", "cid": "same"})
    acks = [await ann.expect("ack", skip=("presence", "message")) for _ in range(3)]
    assert {a["seq"] for a in acks} == {1}
    assert sum(1 for a in acks if a.get("duplicate")) == 2
    assert (await bob.expect("message"))["seq"] == 1
    await bob.nothing_before_pong("message")  # the acked retries were not broadcast
    # Another user may use the same cid: it is theirs, not a retry.
    bob.send({"type": "say", "room": "lobby", "text": "mine", "cid": "same"})
    assert (await bob.expect("ack", skip=("presence", "message")))["seq"] == 2
    resp = await AsyncHTTPClient().fetch("http://127.0.0.1:%d/api/rooms/lobby/messages" % http_port)
    body = json.loads(resp.body)
    assert [m["text"] for m in body["messages"]] == ["once", "mine"]


@pytest.mark.gen_test
async def test_reconnect_with_since_gets_exactly_what_was_missed(connect):
    ann = await user(connect, "ann")
    bob = await user(connect, "bob")
    epoch = ann.joined["epoch"]
    bob.send({"type": "say", "room": "lobby", "text": "m1", "cid": "1"})
    assert (await bob.expect("ack", skip=("presence", "message")))["seq"] == 1
    assert (await ann.expect("message"))["seq"] == 1
    ann.close()
    for i in range(2, 6):
        bob.send({"type": "say", "room": "lobby", "text": "m%d" % i, "cid": str(i)})
        await bob.expect("ack", skip=("presence", "message"))
    ann2 = await user(connect, "ann", room=None)
    back = await joined(ann2, since=1, epoch=epoch)
    assert back["recovered"] is True
    assert [m["seq"] for m in back["messages"]] == [2, 3, 4, 5]
    assert back["seq"] == 5
    bob.send({"type": "say", "room": "lobby", "text": "live", "cid": "6"})
    assert (await ann2.expect("message"))["seq"] == 6


@pytest.mark.gen_test
async def test_resume_with_a_foreign_epoch_or_future_seq_is_not_recovered(connect):
    ann = await user(connect, "ann")
    for i in range(3):
        ann.send({"type": "say", "room": "lobby", "text": "m%d" % i, "cid": str(i)})
        await ann.expect("ack", skip=("presence", "message"))
    bob = await user(connect, "bob", room=None)
    r = await joined(bob, since=1, epoch="not-the-epoch")
    assert r["recovered"] is False and [m["seq"] for m in r["messages"]] == [1, 2, 3]
    carl = await user(connect, "carl", room=None)
    r = await joined(carl, since=99, epoch=ann.joined["epoch"])
    assert r["recovered"] is False


@pytest.mark.gen_test(timeout=20)
@pytest.mark.parametrize("app_options", [{"rate_limit": 0, "max_connections_per_ip": 0}])
async def test_no_message_lost_or_doubled_at_the_join_seam(connect, app_options):
    """Joins with `since` race a stream of messages: history + live must be
    exactly every seq after `since`, once, in order."""
    talker = await user(connect, "talker")
    epoch = talker.joined["epoch"]
    total = 150

    async def talk():
        for i in range(total):
            talker.send({"type": "say", "room": "lobby", "text": "n%d" % i, "cid": "t%d" % i})
            if i % 10 == 9:  # in bursts of ten, each burst stored before the next: joins land in between
                await talker.expect("ack", skip=("presence", "typing", "message"),
                                    where=lambda a, i=i: a["cid"] == "t%d" % i)

    talking = asyncio.ensure_future(talk())
    checked = 0
    since = 0
    while not talking.done() or checked < 3:
        c = await user(connect, "joiner", room=None)
        r = await joined(c, since=since, epoch=epoch)
        seqs = [m["seq"] for m in r["messages"]]
        assert r["recovered"] is True
        assert seqs == list(range(since + 1, r["seq"] + 1))
        want = r["seq"] + 1
        # then live ones continue exactly where history stopped
        for _ in range(3):
            if want > total:
                break
            m = await c.expect("message", skip=("presence", "typing", "ack"))
            assert m["seq"] == want
            want += 1
        c.close()
        since = max(0, r["seq"] - 5)
        checked += 1
        if checked > 40:
            break
    await talking


@pytest.mark.gen_test
async def test_membership_rules(connect):
    ann = await user(connect, "ann")
    ann.send({"type": "say", "room": "elsewhere", "text": "x"})
    assert (await ann.expect("error"))["code"] == "not_found"
    ann.send({"type": "join", "room": "lobby", "ref": 7})
    err = await ann.expect("error")
    assert err["code"] == "conflict" and err["ref"] == 7
    ann.send({"type": "leave", "room": "lobby"})
    assert (await ann.expect("left"))["room"] == "lobby"
    ann.send({"type": "say", "room": "lobby", "text": "x"})
    assert (await ann.expect("error"))["code"] == "not_found"
    ann.send({"type": "join", "room": "bad room!"})
    assert (await ann.expect("error"))["code"] == "bad_message"


@pytest.mark.gen_test
@pytest.mark.parametrize("app_options", [{"max_rooms": 2}])
async def test_rooms_per_connection_are_capped(connect, app_options):
    ann = await user(connect, "ann", room=None)
    await joined(ann, "a")
    await joined(ann, "b")
    ann.send({"type": "join", "room": "c"})
    assert (await ann.expect("error"))["code"] == "too_large"


BAD = [
    ("{not json", "bad_json"),
    ('{"type":"say","room":"lobby","text":NaN}', "bad_message"),
    ('{"type":"say","room":"lobby","text":"\\ud800"}', "bad_json"),
    ("[1,2,3]", "bad_message"),
    ('{"type":"fly"}', "unknown_type"),
    ('{"type":"say","room":"lobby","text":""}', "bad_message"),
    ('{"type":"say","room":"lobby","text":"ding\\u0007"}', "bad_message"),
    ('{"type":"say","room":"lobby","text":"%s"}' % ("x" * 2001), "too_large"),
    ('{"type":"say","room":"lobby","text":42}', "bad_message"),
    ('{"type":"say","room":"lobby","text":"hi","cid":7}', "bad_message"),
    ('{"type":"join","room":"lobby2","since":-1}', "bad_message"),
    ('{"type":"join"}', "bad_message"),
]


@pytest.mark.gen_test
async def test_bad_input_gets_an_error_and_the_connection_stays_open(connect):
    ann = await user(connect, "ann")
    for raw, code in BAD:
        ann.send(raw)
        err = await ann.expect("error")
        assert err["code"] == code, (raw, err)
        assert err["message"]
    ann.send({"type": "say", "room": "lobby", "text": "still here", "cid": "ok"})
    assert (await ann.expect("ack"))["seq"] == 1


@pytest.mark.gen_test
async def test_binary_frame_closes_1003(connect):
    ann = await user(connect, "ann")
    ann.send(b"\x00\x01")
    assert await ann.closed() == 1003


@pytest.mark.gen_test
async def test_oversize_frame_closes_1009(connect):
    ann = await user(connect, "ann")
    ann.send(json.dumps({"type": "say", "room": "lobby", "text": "x" * 70000}))
    assert await ann.closed() == 1009


@pytest.mark.gen_test
@pytest.mark.parametrize("app_options", [{"rate_limit": 5, "rate_burst": 5, "flood_strikes": 10}])
async def test_rate_limit_then_flood_close(connect, app_options):
    ann = await user(connect, "ann")
    for i in range(8):
        ann.send({"type": "ping", "ref": i})
    replies = [await ann.recv() for _ in range(8)]
    kinds = [r["type"] for r in replies]
    assert kinds.count("pong") in (4, 5, 6) and "error" in kinds  # 5 (join used one) then rate_limited
    refused = [r for r in replies if r["type"] == "error"]
    assert all(r["code"] == "rate_limited" for r in refused)
    assert [r["ref"] for r in refused] == list(range(8))[-len(refused):]  # which ones to resend
    for _ in range(30):
        ann.send({"type": "ping"})
    assert await ann.closed() == 1008


@pytest.mark.gen_test
@pytest.mark.parametrize("app_options", [{"max_connections_per_ip": 2}])
async def test_connections_per_ip_are_capped(connect, app, app_options):
    a = await connect("/ws/chat")
    b = await connect("/ws/chat")
    with pytest.raises(HTTPClientError) as e:
        await connect("/ws/chat")
    assert e.value.code == 429
    a.close()
    await a.closed()
    await until(lambda: app.ctx.conn_limit.count("127.0.0.1") == 1)  # the server has seen it go
    c = await connect("/ws/chat")
    assert (await c.expect("welcome"))["type"] == "welcome"
    assert b


@pytest.mark.gen_test
async def test_cross_origin_handshake_is_refused(connect, http_port):
    with pytest.raises(HTTPClientError) as e:
        await connect("/ws/chat", headers={"Origin": "http://evil.example"})
    assert e.value.code == 403
    same = await connect("/ws/chat", headers={"Origin": "http://127.0.0.1:%d" % http_port})
    assert (await same.expect("welcome"))["type"] == "welcome"


@pytest.mark.gen_test
@pytest.mark.parametrize("app_options", [{"allowed_origins": ["https://app.example, https://b.example"]}])
async def test_allowed_origins_exact_match(connect, app_options):
    ok = await connect("/ws/chat", headers={"Origin": "https://b.example"})
    assert (await ok.expect("welcome"))["type"] == "welcome"
    with pytest.raises(HTTPClientError) as e:
        await connect("/ws/chat", headers={"Origin": "https://app.example.evil"})
    assert e.value.code == 403


@pytest.mark.gen_test
async def test_presence_counts_tabs_once_and_announces_leave(connect, app):
    ann = await user(connect, "ann")
    ann_tab2 = await user(connect, "ann", session=ann.welcome["session"])
    assert ann_tab2.joined["member_count"] == 1
    bob = await user(connect, "bob")
    assert bob.joined["member_count"] == 2
    names = {m["name"] for m in bob.joined["members"]}
    assert names == {"ann", "bob"}
    await bob.expect("presence", skip=(), where=lambda m: m["member_count"] == 2)  # bob's own join
    ann.close()
    await until(lambda: len(app.ctx.connections) == 2)  # the server has closed ann's first tab
    # Carl joins after that: the next presence bob hears announces carl alone.  Had the first
    # tab's close been announced, it would come before carl's join, or in the same diff.
    carl = await user(connect, "carl")
    ev = await bob.expect("presence", skip=())
    assert (ev["event"], ev["user"]["name"], ev["member_count"]) == ("join", "carl", 3)  # ann still has a tab
    ann_tab2.close()
    ev = await bob.expect("presence", skip=())
    assert ev["event"] == "leave" and ev["user"]["name"] == "ann" and ev["member_count"] == 2
    assert carl


@pytest.mark.gen_test(timeout=20)
@pytest.mark.parametrize("app_options", [{"presence_window": 0.2, "max_connections_per_ip": 0}])
async def test_mass_join_presence_is_coalesced(connect, app_options):
    watcher = await user(connect, "watcher")
    await watcher.expect("presence", skip=())  # its own join, announced alone
    crowd = []
    for i in range(40):
        crowd.append(await user(connect, "u%d" % i))
    presence = []
    while not presence or presence[-1]["member_count"] < 41:  # until everyone's join is announced
        presence.append(await watcher.expect("presence", skip=()))
    assert 1 <= len(presence) <= 5, [p["event"] for p in presence]
    assert presence[-1]["member_count"] == 41


@pytest.mark.gen_test
async def test_typing_reaches_others_and_is_throttled(connect):
    ann = await user(connect, "ann")
    bob = await user(connect, "bob")
    for _ in range(5):
        ann.send({"type": "typing", "room": "lobby"})
    t = await bob.expect("typing", skip=("presence",))
    assert t["user"]["name"] == "ann"
    await bob.nothing_before_pong("typing", after=(ann,))  # the other four were dropped


@pytest.mark.gen_test
async def test_shutdown_closes_sockets_with_1001(connect, app):
    ann = await user(connect, "ann")
    await app.shutdown(1.0)
    assert await ann.closed() == 1001


@pytest.mark.expect_error_log
@pytest.mark.gen_test
async def test_a_storage_failure_is_an_error_not_a_lost_ack(connect, app):
    """If the commit fails, the sender hears `unavailable` (and may retry with its
    cid); nothing is broadcast, and the connection stays open."""
    ann = await user(connect, "ann")
    bob = await user(connect, "bob")
    store = app.ctx.store
    real_write = store.write

    def failing_write(fn):
        def boom(conn):
            raise sqlite3.OperationalError("disk I/O error")
        return real_write(boom)

    store.write = failing_write
    ann.send({"type": "say", "room": "lobby", "text": "lost?", "cid": "x1", "ref": 3})
    err = await ann.expect("error", skip=("presence",))
    assert err["code"] == "unavailable" and err["ref"] == 3
    await bob.nothing_before_pong("message")  # nothing was broadcast
    store.write = real_write
    ann.send({"type": "say", "room": "lobby", "text": "lost?", "cid": "x1"})
    assert (await ann.expect("ack", skip=("presence", "message")))["seq"] == 1
