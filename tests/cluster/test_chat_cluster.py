"""Several server.py processes on one Redis behave as one server.

Each test starts a real redis-server (AOF, appendfsync always) and server
processes on free ports, talks to them with the `websockets` library (a
client nobody here wrote), and stops everything it started."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Any

import pytest

from tests.clients import Client, request
from tests.redis_server import RedisServer
from tests.servers import ROOT, free_port, healthz, start_server
from tests.waiting import until, until_sync

pytestmark = pytest.mark.cluster


def http(port: int, path: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    reply = request(port, path, "GET" if data is None else "POST", data, headers)
    return reply.status, reply.body


async def chat(port: int, query: str = "name=ann") -> Client:
    """A chat client (the ``websockets`` library) on a node, its welcome read.
    Chat messages that arrive while it waits for something else are kept for
    a later ``expect("message")``."""
    c = await Client.open("ws://127.0.0.1:%d/ws/chat?%s" % (port, query), timeout=5.0, hold=("message",))
    c.welcome = await c.expect("welcome")
    return c


async def join(c: Client, room: str = "lobby", **kw: Any) -> dict[str, Any]:
    c.send({"type": "join", "room": room, **kw})
    return await c.expect("joined")


async def hang_up(*clients: Client) -> None:
    for c in clients:
        c.close()
    for c in clients:
        await c.closed()


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_a_message_said_on_one_node_reaches_members_on_the_others_once_in_order(cluster: Any) -> None:
    a, b, c = cluster(3)

    async def main() -> None:
        ann, bob, cy = await chat(a), await chat(b, "name=bob"), await chat(c, "name=cy")
        for x in (ann, bob, cy):
            await join(x)
        for i in range(20):
            sayer = (ann, bob, cy)[i % 3]
            await sayer.send({"type": "say", "room": "lobby", "text": "m%d" % i, "cid": "k%d" % i})
            await sayer.expect("ack")
        for x in (ann, bob, cy):
            got = [await x.expect("message") for _ in range(20)]
            assert [m["seq"] for m in got] == list(range(1, 21))
            assert [m["text"] for m in got] == ["m%d" % i for i in range(20)]
        # A retry through another node is acknowledged with the first seq, not stored again.
        again = await chat(b, "session=" + ann.welcome["session"])
        await join(again)
        await again.send({"type": "say", "room": "lobby", "text": "m0", "cid": "k0"})
        ack = await again.expect("ack")
        assert ack["seq"] == 1 and ack["duplicate"] is True
        await hang_up(ann, bob, cy, again)

    run(main())
    pages = [http(p, "/api/rooms/lobby/messages?limit=100")[1] for p in (a, b, c)]
    assert all(p == pages[0] for p in pages) and pages[0]["seq"] == 20
    rooms = [http(p, "/api/rooms")[1]["rooms"] for p in (a, b, c)]
    assert all([r["room"] for r in x] == ["lobby"] for x in rooms)


def test_a_session_from_one_node_is_accepted_by_another_and_resume_works_across_nodes(cluster: Any) -> None:
    a, b = cluster(2)

    async def main() -> None:
        ann = await chat(a)
        joined = await join(ann)
        for i in range(5):
            await ann.send({"type": "say", "room": "lobby", "text": "x%d" % i, "cid": "c%d" % i})
            await ann.expect("ack")
        await hang_up(ann)
        # Reconnect to the other node with the session and resume from seq 2.
        back = await chat(b, "session=" + ann.welcome["session"])
        assert back.welcome["user"] == ann.welcome["user"]
        resumed = await join(back, since=2, epoch=joined["epoch"])
        assert resumed["recovered"] is True and [m["seq"] for m in resumed["messages"]] == [3, 4, 5]
        await hang_up(back)

    run(main())


def test_device_readings_posted_to_one_node_reach_viewers_on_another(cluster: Any, redis: RedisServer,
                                                                     tmp_path: Any) -> None:
    a, b = cluster(2)
    keys = {open(os.path.join(tmp_path, d, "ingest_key")).read().strip() if os.path.exists(
        os.path.join(tmp_path, d, "ingest_key")) else None for d in ("node0", "node1")}
    assert keys == {None}  # the key is the cluster's (in Redis), not a file per node

    async def flow() -> None:
        viewer = await Client.open("ws://127.0.0.1:%d/ws/sensors" % b, timeout=5.0)
        await viewer.expect("welcome")
        viewer.send({"type": "subscribe", "sensors": ["*"], "max_hz": 10, "backfill": 0})
        await viewer.expect("subscribed", skip=("readings", "backfill"))
        key = await asyncio.to_thread(_ingest_key_from_redis, cluster)
        status, body = await asyncio.to_thread(
            http, a, "/api/sensors/boiler/readings", b"21.5", {"Authorization": "Bearer " + key})
        assert status == 200 and body["stored"] == 1, body
        msg = await viewer.expect("readings", where=lambda m: "boiler" in m["points"],
                                  skip=("backfill", "sensor_added"))
        assert msg["points"]["boiler"][-1][1] == 21.5
        await hang_up(viewer)

    run(flow())
    listed = {s["id"] for s in http(b, "/api/sensors")[1]["sensors"]}
    assert "boiler" in listed


def _redis_get(cluster: Any, key: str) -> str | None:
    import redis as sync_redis

    url = next(a for a in cluster.procs[0].args if a.startswith("--backplane=")).split("=", 1)[1]
    client = sync_redis.Redis.from_url(url)
    try:
        value = client.get(key)
        return value.decode() if isinstance(value, bytes) else None
    finally:
        client.close()


def _ingest_key_from_redis(cluster: Any) -> str:
    key = _redis_get(cluster, "rt:secret:ingest_key")
    assert key, "no ingest key in Redis"
    return key


def test_redis_down_nothing_is_acked_health_says_503_and_it_carries_on_when_back(cluster: Any,
                                                                                 redis: RedisServer) -> None:
    a, b = cluster(2)

    async def main() -> None:
        ann, bob = await chat(a), await chat(b, "name=bob")
        await join(ann)
        await join(bob)
        await ann.send({"type": "say", "room": "lobby", "text": "before", "cid": "b1"})
        assert (await ann.expect("ack"))["seq"] == 1
        assert (await bob.expect("message"))["text"] == "before"
        redis.kill()
        await ann.send({"type": "say", "room": "lobby", "text": "during", "cid": "d1"})
        err = await ann.expect("error", timeout=15)
        assert err["code"] == "unavailable"
        await ann.send({"type": "join", "room": "elsewhere", "ref": 9})  # a room this node must subscribe to
        err = await ann.expect("error", timeout=15)
        assert (err["code"], err["ref"]) == ("unavailable", 9)  # an answer, and the connection stays

        async def degraded() -> Any:
            status, health = await asyncio.to_thread(http, a, "/healthz")
            return health if status == 503 else None

        health = await until(degraded, timeout=5, interval=0.1)
        assert health["status"] == "degraded" and health["reason"]
        redis.start()  # the same port and directory: the AOF has what was acked

        async def healthy(port: int) -> bool:
            return (await asyncio.to_thread(healthz, port)) == 200

        await until(lambda: healthy(a), timeout=10, interval=0.1)
        await until(lambda: healthy(b), timeout=10, interval=0.1)
        await ann.send({"type": "say", "room": "lobby", "text": "during", "cid": "d1"})  # the retry
        assert (await ann.expect("ack"))["seq"] == 2
        got = await bob.expect("message", timeout=10)
        assert (got["seq"], got["text"]) == (2, "during")
        await hang_up(ann, bob)

    run(main())
    page = http(b, "/api/rooms/lobby/messages")[1]
    assert [m["text"] for m in page["messages"]] == ["before", "during"]


def test_acked_messages_survive_kill_9_of_redis(cluster: Any, redis: RedisServer) -> None:
    (a,) = cluster(1)

    async def main() -> None:
        ann = await chat(a)
        await join(ann)
        for i in range(30):
            await ann.send({"type": "say", "room": "lobby", "text": "m%d" % i, "cid": "c%d" % i})
        acked = [await ann.expect("ack") for _ in range(30)]
        assert sorted(x["seq"] for x in acked) == list(range(1, 31))
        await hang_up(ann)

    run(main())
    redis.kill()  # SIGKILL, right after the acks
    redis.start()

    def history() -> Any:
        status, page = http(a, "/api/rooms/lobby/messages?limit=100")
        return page if status == 200 else None

    page = until_sync(history, timeout=10, what="the history once Redis is back")
    assert [m["text"] for m in page["messages"]] == ["m%d" % i for i in range(30)]


def test_processes_fork_workers_that_share_the_port_and_stop_on_sigterm(tmp_path: Any, redis: RedisServer) -> None:
    port = free_port()
    async def main() -> None:
        ann = await chat(port)
        await join(ann)
        await ann.send({"type": "say", "room": "lobby", "text": "hi", "cid": "c"})
        assert (await ann.expect("ack"))["seq"] == 1
        await hang_up(ann)

    with start_server(port, tmp_path / "n", "--backplane=" + redis.url, "--processes=2") as proc:
        run(main())
        assert proc.stop(15) == 0  # SIGTERM: every worker stops, the parent exits 0


def test_more_than_one_process_needs_redis() -> None:
    out = subprocess.run([sys.executable, "server.py", "--processes=2", "--port=%d" % free_port()],
                         cwd=ROOT, capture_output=True, text=True, timeout=20)
    assert out.returncode == 2
    assert "needs a shared backplane" in out.stderr and "Traceback" not in out.stderr


def test_an_unreachable_redis_at_start_is_one_clear_line(tmp_path: Any) -> None:
    url = "redis://127.0.0.1:%d/0" % free_port()
    out = subprocess.run([sys.executable, "server.py", "--backplane=" + url, "--port=%d" % free_port(),
                          "--data_dir=%s" % tmp_path], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "cannot reach Redis" in out.stderr and "Traceback" not in out.stderr


def test_presence_is_cluster_wide_and_a_dead_nodes_members_leave_within_the_ttl(cluster: Any) -> None:
    a, b = cluster(2, "--presence_ttl=2")

    async def main() -> None:
        ann = await chat(a)
        first = await join(ann)
        assert [m["name"] for m in first["members"]] == ["ann"] and first["member_count"] == 1
        bob = await chat(b, "name=bob")
        joined = await join(bob)
        assert sorted(m["name"] for m in joined["members"]) == ["ann", "bob"] and joined["member_count"] == 2
        seen = await ann.expect("presence", timeout=10, where=lambda m: m.get("member_count") == 2)
        # Changes within one presence window are coalesced (ann's own join may share it).
        names = [seen["user"]["name"]] if seen["event"] == "join" else [u["name"] for u in seen["joined"]]
        assert "bob" in names, seen
        # Ann's second tab, on node B: still one ann.
        tab = await chat(b, "session=" + ann.welcome["session"])
        again = await join(tab)
        assert again["member_count"] == 2
        # Node B dies with bob and ann's second tab: bob leaves, ann (still on A) stays.
        cluster.procs[1].kill()
        left = await ann.expect("presence", timeout=10, where=lambda m: m.get("member_count") == 1)
        assert left["event"] == "leave" and left["user"]["name"] == "bob"
        await hang_up(ann)

    run(main())


SENSOR_NOISE = ("subscribed", "backfill", "sensor_added", "sensor_updated", "sensor_removed")


async def watch_points(port: int, sensor: str, got: dict[float, float]) -> None:
    """Add ``t -> v`` of ``sensor`` to ``got`` as a viewer on ``port`` receives it, until cancelled."""
    viewer = await Client.open("ws://127.0.0.1:%d/ws/sensors" % port, timeout=10.0)
    try:
        await viewer.expect("welcome")
        viewer.send({"type": "subscribe", "sensors": [sensor], "max_hz": 10, "backfill": 0})
        while True:
            msg = await viewer.expect("readings", skip=SENSOR_NOISE)
            got.update((t, v) for t, v in msg["points"].get(sensor, []))
    finally:
        viewer.close()


async def points_until(ports: tuple[int, ...], sensor: str, enough: Any, timeout: float = 15.0) -> list[dict]:
    """What viewers of ``sensor`` on each of ``ports`` receive, once ``enough(*received)`` holds."""
    got: list[dict[float, float]] = [{} for _ in ports]
    tasks = [asyncio.ensure_future(watch_points(p, sensor, g)) for p, g in zip(ports, got)]

    def done() -> bool:
        for t in tasks:
            if t.done():
                t.result()  # a viewer that failed fails the test
        return bool(enough(*got))

    try:
        await until(done, timeout=timeout, interval=0.05, what="enough %s points on %s" % (sensor, ports))
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return got


def test_simulated_sensors_run_once_for_the_cluster_and_another_node_takes_over(cluster: Any) -> None:
    a, b = cluster(1, "--node_name=alpha") + cluster(1, "--node_name=beta")

    async def main() -> None:
        on_a, on_b = await points_until((a, b), "sim.vibration", lambda x, y: len(set(x) & set(y)) >= 10)
        common = set(on_a) & set(on_b)  # 10 Hz: the same points reach both nodes
        assert all(on_a[t] == on_b[t] for t in common)  # one source, not two simulations

        # Each machine's metrics under its own name, visible from either node.
        async def both_hosts() -> bool:
            listed = (await asyncio.to_thread(http, b, "/api/sensors"))[1]["sensors"]
            return {"host.alpha.cpu", "host.beta.cpu"} <= {s["id"] for s in listed}

        await until(both_hosts, timeout=5, interval=0.1)
        # The node that runs them dies; the other takes over within the lease's ttl (3 s).
        holder = await asyncio.to_thread(_redis_get, cluster, "rt:lease:sim")
        nodes = [(await asyncio.to_thread(http, p, "/healthz"))[1]["node"] for p in (a, b)]
        dead = nodes.index(holder)
        loop = asyncio.get_running_loop()
        killed = loop.time()
        cluster.procs[dead].kill()

        async def taken_over() -> bool:
            return await asyncio.to_thread(_redis_get, cluster, "rt:lease:sim") == nodes[1 - dead]

        await until(taken_over, timeout=10, interval=0.1)
        assert loop.time() - killed < 4.5, "the lease outlived its ttl"
        (later,) = await points_until(((a, b)[1 - dead],), "sim.vibration", lambda x: len(x) >= 10)
        assert len(later) >= 10

    run(main())


def test_a_rooms_messages_go_only_to_the_other_nodes_with_members_in_it(cluster: Any, redis: RedisServer) -> None:
    """Routing: a room whose members are all on one node publishes nothing;
    with a member on a second node, each message is published once, to that
    node's own channel, never back to the node it was said on."""
    import redis.asyncio as aioredis

    a, b = cluster(2)

    async def main() -> None:
        spy = aioredis.from_url(redis.url, decode_responses=True)
        sub = spy.pubsub()
        await sub.psubscribe("rt:ch:*")
        published: list[tuple[str, str]] = []

        async def listen() -> None:
            async for m in sub.listen():
                if m["type"] == "pmessage" and '"message"' in m["data"]:
                    published.append((m["channel"], m["data"]))

        async def routed() -> set[str]:  # the nodes the room's messages go to
            return {str(n) for n in await spy.zrange("rt:room:{lobby}:nodes", 0, -1)}

        reader = asyncio.ensure_future(listen())
        ann = await chat(a)
        await join(ann)
        (node_a,) = await routed()
        for i in range(5):
            await ann.send({"type": "say", "room": "lobby", "text": "alone %d" % i})
            await ann.expect("ack")
        assert [m["text"] for m in [await ann.expect("message") for _ in range(5)]][-1] == "alone 4"
        await asyncio.sleep(0.3)
        assert published == []  # nobody else to tell

        bob = await chat(b, "name=bob")
        await join(bob)
        (node_b,) = await routed() - {node_a}
        for i in range(5):
            await ann.send({"type": "say", "room": "lobby", "text": "to bob %d" % i})
            await ann.expect("ack")
        got = [await bob.expect("message") for _ in range(5)]
        assert [m["text"] for m in got] == ["to bob %d" % i for i in range(5)]
        await until(lambda: len(published) >= 5, timeout=5, what="5 publishes")
        await asyncio.sleep(0.3)
        assert [ch for ch, _ in published] == ["rt:ch:_node:" + node_b] * 5
        reader.cancel()
        await sub.aclose()
        await spy.aclose()
        await hang_up(ann, bob)

    run(main())


def test_a_node_that_stalled_past_the_ttl_catches_up_what_its_members_missed(cluster: Any) -> None:
    """A node frozen (SIGSTOP) longer than --presence_ttl stops being routed
    the room's messages; when it runs again it listens again and reads what it
    missed from the stream, even if nothing more is said."""
    import signal

    a, b = cluster(2, "--presence_ttl=1")

    async def main() -> None:
        ann, bob = await chat(a), await chat(b, "name=bob")
        await join(ann)
        await join(bob)
        node_b = cluster.procs[1].pid
        os.kill(node_b, signal.SIGSTOP)
        try:
            await asyncio.sleep(1.5)  # b's route expires
            for i in range(3):
                await ann.send({"type": "say", "room": "lobby", "text": "while b slept %d" % i, "cid": "s%d" % i})
                await ann.expect("ack")
        finally:
            os.kill(node_b, signal.SIGCONT)
        got = [await bob.expect("message", timeout=10) for _ in range(3)]
        assert [m["text"] for m in got] == ["while b slept %d" % i for i in range(3)]
        assert [m["seq"] for m in got] == [1, 2, 3]
        await hang_up(ann, bob)

    run(main())
