"""Cluster mode when Redis, or a node's connections to it, go away (issue 9).

Each test starts a real redis-server (AOF, appendfsync always) and server.py
nodes on free ports, talks to them with the `websockets` library and stops
everything it started (the fixtures in tests/cluster/conftest.py)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
from typing import Any

import pytest
import websockets

from tests.clients import Client
from tests.cluster.test_chat_cluster import chat, hang_up, http, join, run
from tests.redis_server import RedisServer
from tests.servers import free_port, healthz, start_server
from tests.waiting import until, until_sync

pytestmark = pytest.mark.cluster

KEY = "outage-test-ingest-key"


def redis_client(redis: RedisServer) -> Any:
    import redis as sync_redis

    return sync_redis.Redis.from_url(redis.url)


def counter(port: int, name: str) -> float:
    text = http(port, "/metrics")[1]
    found = re.search(r"^%s (\S+)$" % re.escape(name), text, re.M)
    assert found is not None, "%s is not in /metrics" % name
    return float(found.group(1))


async def status_is(port: int, want: int) -> bool:
    return (await asyncio.to_thread(healthz, port)) == want


async def open_editor(port: int, doc: str) -> tuple[Any, dict[str, Any]]:
    ws = await websockets.connect("ws://127.0.0.1:%d/ws/edit/%s?name=ann" % (port, doc))
    while True:
        msg = json.loads(await ws.recv())
        if msg["type"] == "snapshot":
            return ws, msg


async def reply(ws: Any, *types: str) -> dict[str, Any]:
    """The next message of one of ``types`` (cursors, peers and the like skipped)."""
    while True:
        msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if msg["type"] in types:
            return msg


async def ann_and_bob_in_the_lobby(a: int, b: int) -> tuple[Client, Client]:
    """Ann on node ``a`` and Bob on node ``b``, both in the lobby."""
    ann, bob = await chat(a), await chat(b, "name=bob")
    await join(ann)
    await join(bob)
    return ann, bob


async def until_answered(c: Client, msg: dict[str, Any], answer: str) -> dict[str, Any]:
    """Send ``msg`` until it gets ``answer`` rather than ``unavailable``, as a client
    retries (a connection that Redis closed fails one command, once)."""
    for _ in range(5):
        c.send(msg)
        got = await c.recv()
        while got is not None and got["type"] not in (answer, "error"):
            got = await c.recv()
        assert got is not None
        if got["type"] == answer:
            return got
        assert got["code"] == "unavailable", got
        await asyncio.sleep(0.2)
    raise AssertionError("%r got no %s" % (msg, answer))


def test_a_dropped_subscription_is_filled_from_the_stream_with_no_gap_and_no_double(cluster: Any,
                                                                                   redis: RedisServer) -> None:
    a, b = cluster(2)

    async def main() -> None:
        ann, bob = await ann_and_bob_in_the_lobby(a, b)
        # Redis drops every node's subscription (as a network blip would); what is said
        # meanwhile is stored, but pub/sub does not deliver it to a node that is not subscribed.
        killed = await asyncio.to_thread(lambda: redis_client(redis).client_kill_filter(_type="pubsub"))
        assert killed >= 2
        for i in range(30):
            await ann.send({"type": "say", "room": "lobby", "text": "m%d" % i, "cid": "k%d" % i})
            assert (await ann.expect("ack"))["seq"] == i + 1
        got = [await bob.expect("message", timeout=10) for _ in range(30)]
        assert [m["seq"] for m in got] == list(range(1, 31))
        assert [m["text"] for m in got] == ["m%d" % i for i in range(30)]
        await bob.nothing_before_pong("message")  # and nothing twice
        await hang_up(ann, bob)

    run(main())
    assert counter(b, "realtime_backplane_resyncs_total") >= 1


def test_a_publish_that_fails_once_does_not_leave_the_node_degraded(cluster: Any, redis: RedisServer) -> None:
    a, b = cluster(2)

    async def main() -> None:
        ann, bob = await ann_and_bob_in_the_lobby(a, b)
        # A publish (a typing hint) is in flight when Redis closes the nodes' command
        # connections (the subscriptions stay): it fails, and the node says 503 for a moment.
        admin = redis_client(redis)
        await asyncio.to_thread(admin.execute_command, "CLIENT", "PAUSE", "3000", "WRITE")  # PUBLISH waits
        try:
            ann.send({"type": "typing", "room": "lobby"})
            await asyncio.sleep(0.3)
            await asyncio.to_thread(lambda: admin.client_kill_filter(_type="normal", skipme=True))
        finally:
            await asyncio.to_thread(admin.execute_command, "CLIENT", "UNPAUSE")
        await until(lambda: status_is(a, 503), timeout=5, interval=0.02, what="node A degraded")
        await until(lambda: status_is(a, 200), timeout=5, interval=0.1, what="node A healthy again")
        # It serves as before: a message said on A reaches B, a new room can be joined.
        ack = await until_answered(ann, {"type": "say", "room": "lobby", "text": "after", "cid": "after"}, "ack")
        assert ack["seq"] == 1  # the same cid each time: stored once
        assert (await bob.expect("message", timeout=10))["text"] == "after"
        assert (await until_answered(ann, {"type": "join", "room": "another"}, "joined"))["room"] == "another"
        assert await status_is(a, 200)
        await hang_up(ann, bob)

    run(main())


def test_while_redis_is_down_readings_and_edits_are_refused_the_sockets_stay_open_and_nothing_refused_is_stored(
        cluster: Any, redis: RedisServer) -> None:
    a, b = cluster(2, "--ingest_key=" + KEY, "--simulated_sensors=", "--host_metrics=false")
    auth = {"Authorization": "Bearer " + KEY}

    async def main() -> None:
        ann = await chat(a)
        await join(ann)
        await ann.send({"type": "say", "room": "lobby", "text": "kept", "cid": "c1"})
        assert (await ann.expect("ack"))["seq"] == 1
        editor, hello = await open_editor(a, "notes")
        await editor.send(json.dumps({"type": "op", "rev": hello["rev"], "op": ["x"], "seq": 1}))
        assert (await reply(editor, "ack"))["rev"] == 1
        status, _ = await asyncio.to_thread(http, a, "/api/sensors/boiler/readings", b"20.5", auth)
        assert status == 200

        redis.kill()  # SIGKILL: the AOF has everything acknowledged so far
        await until(lambda: status_is(a, 503), timeout=5, interval=0.1, what="node A degraded")
        await ann.send({"type": "say", "room": "lobby", "text": "refused", "cid": "never-retried"})
        assert (await ann.expect("error", timeout=15))["code"] == "unavailable"
        status, body = await asyncio.to_thread(http, a, "/api/sensors/boiler/readings", b"21.5", auth)
        assert (status, body["error"]) == (503, "unavailable")
        await editor.send(json.dumps({"type": "op", "rev": 1, "op": [1, "y"], "seq": 2}))
        refused = await reply(editor, "error", "ack")
        assert (refused["type"], refused["code"], refused["seq"]) == ("error", "unavailable", 2)

        redis.start()  # the same port and directory
        await until(lambda: status_is(a, 200), timeout=10, interval=0.1, what="node A healthy again")
        # Both sockets stayed open: the editor resends the same op, as docs/PROTOCOL.md says.
        await editor.send(json.dumps({"type": "op", "rev": 1, "op": [1, "y"], "seq": 2}))
        while True:
            got = await reply(editor, "error", "ack")
            if got["type"] == "ack":
                break
            assert got["code"] == "unavailable", got  # the document is still being reloaded: resend
            await asyncio.sleep(0.2)
            await editor.send(json.dumps({"type": "op", "rev": 1, "op": [1, "y"], "seq": 2}))
        assert got["rev"] == 2
        status, _ = await asyncio.to_thread(http, a, "/api/sensors/boiler/readings", b"22.5", auth)
        assert status == 200
        await ann.send({"type": "say", "room": "lobby", "text": "later", "cid": "c2"})
        assert (await ann.expect("ack"))["seq"] == 2
        await editor.close()
        await hang_up(ann)
        await until(lambda: status_is(b, 200), timeout=10, interval=0.1, what="node B healthy again")

    run(main())
    page = http(b, "/api/rooms/lobby/messages")[1]
    assert [m["text"] for m in page["messages"]] == ["kept", "later"]  # the refused one is not there
    doc = http(b, "/api/docs/notes")
    assert doc[0] == 200 and doc[1]["text"] == "xy", doc
    points = http(b, "/api/sensors/boiler/readings")[1]["points"]
    assert [v for _, v in points] == [20.5, 22.5]


def test_typing_crosses_nodes_and_a_node_started_later_backfills_readings_from_redis(cluster: Any) -> None:
    a, b = cluster(2, "--ingest_key=" + KEY, "--simulated_sensors=", "--host_metrics=false")
    auth = {"Authorization": "Bearer " + KEY}

    async def main() -> None:
        ann, bob = await ann_and_bob_in_the_lobby(a, b)
        bob.send({"type": "typing", "room": "lobby"})
        typing = await ann.expect("typing", skip=("presence",))
        assert typing["user"]["name"] == "bob"
        await hang_up(ann, bob)
        for v in (1.0, 2.0, 3.0):
            status, _ = await asyncio.to_thread(http, a, "/api/sensors/tank/readings", str(v).encode(), auth)
            assert status == 200

    run(main())
    (c,) = cluster(1, "--ingest_key=" + KEY, "--simulated_sensors=", "--host_metrics=false")

    async def viewer() -> None:
        v = await Client.open("ws://127.0.0.1:%d/ws/sensors" % c, timeout=5.0)
        await v.expect("welcome")
        v.send({"type": "subscribe", "sensors": ["tank"], "max_hz": 10, "backfill": 60})
        back = await v.expect("backfill", skip=("subscribed", "sensor_added"))
        assert [p[1] for p in back["points"]] == [1.0, 2.0, 3.0]
        v.close()
        await v.closed()

    run(viewer())


def test_readings_committed_while_a_node_resubscribes_reach_it_once(cluster: Any, redis: RedisServer) -> None:
    a, b = cluster(2, "--ingest_key=" + KEY, "--simulated_sensors=", "--host_metrics=false")
    auth = {"Authorization": "Bearer " + KEY}

    async def main() -> None:
        viewer = await Client.open("ws://127.0.0.1:%d/ws/sensors" % b, timeout=5.0)
        await viewer.expect("welcome")
        viewer.send({"type": "subscribe", "sensors": ["*"], "max_hz": 10, "backfill": 0})
        await viewer.expect("subscribed", skip=("readings", "backfill"))
        status, _ = await asyncio.to_thread(http, a, "/api/sensors/tank/readings", b"1.0", auth)
        assert status == 200
        # Redis drops the subscriptions; a reading committed on A before B has resubscribed is
        # stored but not delivered to B by pub/sub: B reads it from Redis once it is back.
        await asyncio.to_thread(lambda: redis_client(redis).client_kill_filter(_type="pubsub"))
        status, _ = await asyncio.to_thread(http, a, "/api/sensors/tank/readings", b"2.0", auth)
        assert status == 200

        async def both() -> bool:
            points = (await asyncio.to_thread(http, b, "/api/sensors/tank/readings"))[1]["points"]
            return len(points) >= 2

        await until(both, timeout=5, interval=0.1, what="B holds both readings")
        status, _ = await asyncio.to_thread(http, a, "/api/sensors/tank/readings", b"3.0", auth)
        seen: list[float] = []
        while len(seen) < 3:
            msg = await viewer.expect("readings", skip=("subscribed", "backfill", "sensor_added"))
            seen += [v for _, v in msg["points"].get("tank", [])]
        assert seen == [1.0, 2.0, 3.0]
        viewer.close()
        await viewer.closed()

    run(main())
    assert [v for _, v in http(b, "/api/sensors/tank/readings")[1]["points"]] == [1.0, 2.0, 3.0]


GLOBAL_KEYS = re.compile(r"^rt:(rooms|docs|sensors|secret:[a-z_]+|lease:.+)$")  # one key each, single-key commands
TAGGED = re.compile(r"^rt:(room|doc|sensor):\{([^{}]+)\}:[a-z]+$")


def test_every_key_is_hash_tagged_per_room_document_and_sensor(cluster: Any, redis: RedisServer) -> None:
    """What a Redis Cluster needs to shard them: each script and MULTI touches the keys of one
    room, document or sensor, and those share a hash tag (so one slot); the rest are single keys."""
    (a,) = cluster(1, "--ingest_key=" + KEY, "--presence_ttl=3")

    async def main() -> None:
        ann = await chat(a)
        await join(ann)
        await ann.send({"type": "say", "room": "lobby", "text": "hi", "cid": "c1"})
        await ann.expect("ack")
        ann.send({"type": "create", "room": "team", "members": ["g-0123456789ab"]})
        await ann.expect("created")
        await join(ann, "team")
        editor, hello = await open_editor(a, "notes")
        await editor.send(json.dumps({"type": "op", "rev": hello["rev"], "op": ["x"], "seq": 1}))
        await reply(editor, "ack")
        status, _ = await asyncio.to_thread(http, a, "/api/sensors/tank/readings", b"1.0",
                                            {"Authorization": "Bearer " + KEY})
        assert status == 200
        await editor.close()
        await hang_up(ann)

    run(main())
    from redis.crc import key_slot

    keys = sorted(k.decode() for k in redis_client(redis).scan_iter("rt:*"))
    slots: dict[str, set[int]] = {}
    for key in keys:
        tagged = TAGGED.match(key)
        assert tagged or GLOBAL_KEYS.match(key), "%s has no hash tag" % key
        if tagged:
            slots.setdefault(tagged.group(1) + ":" + tagged.group(2), set()).add(key_slot(key.encode()))
    assert {"room:lobby", "room:team", "doc:notes", "sensor:tank"} <= set(slots), keys
    assert all(len(s) == 1 for s in slots.values()), slots


def children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in os.listdir("/proc/%d/task" % pid):
        with open("/proc/%d/task/%s/children" % (pid, task)) as f:
            found |= {int(c) for c in f.read().split()}
    return found


def test_processes_runs_n_workers_and_the_parent_replaces_one_killed_with_sigkill(tmp_path: Any,
                                                                                  redis: RedisServer) -> None:
    port = free_port()
    seen: set[int] = set()
    with start_server(port, tmp_path / "n", "--backplane=" + redis.url, "--processes=2") as proc:
        try:
            def workers(without: int = 0) -> set[int] | None:
                now = children(proc.pid)
                seen.update(now)
                return now if len(now) == 2 and without not in now else None

            first = until_sync(workers, timeout=10, what="two workers")
            assert first is not None
            victim = min(first)
            os.kill(victim, signal.SIGKILL)
            again = until_sync(lambda: workers(without=victim), timeout=10, what="a worker in place of the killed one")
            assert again is not None and len(again & first) == 1
            for _ in range(6):  # whichever worker takes the connection answers
                assert healthz(port) == 200
            assert proc.stop(15) == 0  # SIGTERM reaches every worker; the parent exits 0 once they are gone
            assert not any(os.path.exists("/proc/%d" % w) for w in again)
        finally:
            for pid in seen:  # the parent's kill -9 (on a failure) would leave them serving
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def test_workers_stop_when_their_parent_is_killed_with_sigkill(tmp_path: Any, redis: RedisServer) -> None:
    """kill -9 of the --processes parent (no handler runs) must not leave its
    workers serving unsupervised: each gets SIGTERM, stops, and the port is free."""
    port = free_port()
    seen: set[int] = set()
    with start_server(port, tmp_path / "n", "--backplane=" + redis.url, "--processes=2") as proc:
        try:
            def workers() -> set[int] | None:
                now = children(proc.pid)
                seen.update(now)
                return now if len(now) == 2 else None

            both = until_sync(workers, timeout=10, what="two workers")
            assert both is not None
            assert healthz(port) == 200
            os.kill(proc.pid, signal.SIGKILL)
            until_sync(lambda: not any(_alive(w) for w in both), timeout=10, what="the workers gone")
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", port))  # nobody listens there any more
        finally:
            for pid in seen:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _alive(pid: int) -> bool:
    """Running, not a zombie (an orphan is reaped by init, but not at once)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
