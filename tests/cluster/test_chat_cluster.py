"""Several server.py processes on one Redis behave as one server.

Each test starts a real redis-server (AOF, appendfsync always) and server
processes on free ports, talks to them with the `websockets` library (a
client nobody here wrote), and stops everything it started."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from typing import Any

import pytest
import websockets

from tests.redis_server import RedisServer
from tests.servers import ROOT, free_port, start_server
from tests.servers import http_json as http

pytestmark = pytest.mark.cluster


class Chat:
    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.inbox: list[dict[str, Any]] = []  # messages that arrived while waiting for something else

    @classmethod
    async def open(cls, port: int, query: str = "name=ann") -> "Chat":
        c = cls(await websockets.connect("ws://127.0.0.1:%d/ws/chat?%s" % (port, query)))
        c.welcome = await c.expect("welcome")
        return c

    async def send(self, obj: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(obj))

    async def expect(self, mtype: str, timeout: float = 5.0) -> dict[str, Any]:
        """The next message of ``mtype``; presence and typing in between are
        skipped, chat messages kept for a later ``expect("message")``."""
        if mtype == "message" and self.inbox:
            return self.inbox.pop(0)
        async with asyncio.timeout(timeout):
            while True:
                msg = json.loads(await self.ws.recv())
                if msg["type"] == mtype:
                    return msg
                if msg["type"] == "message":
                    self.inbox.append(msg)
                    continue
                assert msg["type"] in ("presence", "typing"), msg

    async def join(self, room: str = "lobby", **kw: Any) -> dict[str, Any]:
        await self.send({"type": "join", "room": room, **kw})
        return await self.expect("joined")

    async def close(self) -> None:
        await self.ws.close()


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_a_message_said_on_one_node_reaches_members_on_the_others_once_in_order(cluster: Any) -> None:
    a, b, c = cluster(3)

    async def main() -> None:
        ann, bob, cy = await Chat.open(a), await Chat.open(b, "name=bob"), await Chat.open(c, "name=cy")
        for x in (ann, bob, cy):
            await x.join()
        for i in range(20):
            sayer = (ann, bob, cy)[i % 3]
            await sayer.send({"type": "say", "room": "lobby", "text": "m%d" % i, "cid": "k%d" % i})
            await sayer.expect("ack")
        for x in (ann, bob, cy):
            got = [await x.expect("message") for _ in range(20)]
            assert [m["seq"] for m in got] == list(range(1, 21))
            assert [m["text"] for m in got] == ["m%d" % i for i in range(20)]
        # A retry through another node is acknowledged with the first seq, not stored again.
        again = await Chat.open(b, "session=" + ann.welcome["session"])
        await again.join()
        await again.send({"type": "say", "room": "lobby", "text": "m0", "cid": "k0"})
        ack = await again.expect("ack")
        assert ack["seq"] == 1 and ack["duplicate"] is True
        for x in (ann, bob, cy, again):
            await x.close()

    run(main())
    pages = [http(p, "/api/rooms/lobby/messages?limit=100")[1] for p in (a, b, c)]
    assert all(p == pages[0] for p in pages) and pages[0]["seq"] == 20
    rooms = [http(p, "/api/rooms")[1]["rooms"] for p in (a, b, c)]
    assert all([r["room"] for r in x] == ["lobby"] for x in rooms)


def test_a_session_from_one_node_is_accepted_by_another_and_resume_works_across_nodes(cluster: Any) -> None:
    a, b = cluster(2)

    async def main() -> None:
        ann = await Chat.open(a)
        joined = await ann.join()
        for i in range(5):
            await ann.send({"type": "say", "room": "lobby", "text": "x%d" % i, "cid": "c%d" % i})
            await ann.expect("ack")
        await ann.close()
        # Reconnect to the other node with the session and resume from seq 2.
        back = await Chat.open(b, "session=" + ann.welcome["session"])
        assert back.welcome["user"] == ann.welcome["user"]
        resumed = await back.join(since=2, epoch=joined["epoch"])
        assert resumed["recovered"] is True and [m["seq"] for m in resumed["messages"]] == [3, 4, 5]
        await back.close()

    run(main())


def test_device_readings_posted_to_one_node_reach_viewers_on_another(cluster: Any, tmp_path: Any) -> None:
    a, b = cluster(2)
    keys = {open(os.path.join(tmp_path, d, "ingest_key")).read().strip() if os.path.exists(
        os.path.join(tmp_path, d, "ingest_key")) else None for d in ("node0", "node1")}
    assert keys == {None}  # the key is the cluster's (in Redis), not a file per node

    async def main() -> None:
        ws = await websockets.connect("ws://127.0.0.1:%d/ws/sensors" % b)
        welcome = json.loads(await ws.recv())
        assert welcome["type"] == "welcome"
        await ws.send(json.dumps({"type": "subscribe", "sensors": ["*"], "max_hz": 10, "backfill": 0}))
        return ws

    async def flow() -> None:
        ws = await main()
        key = await asyncio.to_thread(_ingest_key_from_redis, cluster)
        status, body = await asyncio.to_thread(
            http, a, "/api/sensors/boiler/readings", b"21.5", {"Authorization": "Bearer " + key})
        assert status == 200 and body["stored"] == 1, body
        async with asyncio.timeout(5):
            while True:
                msg = json.loads(await ws.recv())
                if msg["type"] == "readings" and "boiler" in msg.get("points", {}):
                    assert msg["points"]["boiler"][-1][1] == 21.5
                    break
        await ws.close()

    run(flow())
    listed = {s["id"] for s in http(b, "/api/sensors")[1]["sensors"]}
    assert "boiler" in listed


def _redis_get(cluster: Any, key: str) -> str:
    import redis as sync_redis

    url = next(a for a in cluster.procs[0].args if a.startswith("--backplane=")).split("=", 1)[1]
    client = sync_redis.Redis.from_url(url)
    try:
        return client.get(key).decode()
    finally:
        client.close()


def _ingest_key_from_redis(cluster: Any) -> str:
    return _redis_get(cluster, "rt:secret:ingest_key")


def test_redis_down_nothing_is_acked_health_says_503_and_it_carries_on_when_back(cluster: Any,
                                                                                 redis: RedisServer) -> None:
    a, b = cluster(2)

    async def main() -> None:
        ann, bob = await Chat.open(a), await Chat.open(b, "name=bob")
        await ann.join()
        await bob.join()
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
        for _ in range(50):
            status, health = await asyncio.to_thread(http, a, "/healthz")
            if status == 503:
                break
            await asyncio.sleep(0.1)
        assert status == 503 and health["status"] == "degraded" and health["reason"]
        redis.start()  # the same port and directory: the AOF has what was acked
        for _ in range(100):
            if (await asyncio.to_thread(http, a, "/healthz"))[0] == 200 and \
                    (await asyncio.to_thread(http, b, "/healthz"))[0] == 200:
                break
            await asyncio.sleep(0.1)
        await ann.send({"type": "say", "room": "lobby", "text": "during", "cid": "d1"})  # the retry
        assert (await ann.expect("ack"))["seq"] == 2
        got = await bob.expect("message", timeout=10)
        assert (got["seq"], got["text"]) == (2, "during")
        await ann.close()
        await bob.close()

    run(main())
    page = http(b, "/api/rooms/lobby/messages")[1]
    assert [m["text"] for m in page["messages"]] == ["before", "during"]


def test_acked_messages_survive_kill_9_of_redis(cluster: Any, redis: RedisServer) -> None:
    (a,) = cluster(1)

    async def main() -> None:
        ann = await Chat.open(a)
        await ann.join()
        for i in range(30):
            await ann.send({"type": "say", "room": "lobby", "text": "m%d" % i, "cid": "c%d" % i})
        acked = [await ann.expect("ack") for _ in range(30)]
        assert sorted(x["seq"] for x in acked) == list(range(1, 31))
        await ann.close()

    run(main())
    redis.kill()  # SIGKILL, right after the acks
    redis.start()
    for _ in range(100):
        status, page = http(a, "/api/rooms/lobby/messages?limit=100")
        if status == 200:
            break
    assert [m["text"] for m in page["messages"]] == ["m%d" % i for i in range(30)]


def test_processes_fork_workers_that_share_the_port_and_stop_on_sigterm(tmp_path: Any, redis: RedisServer) -> None:
    port = free_port()
    proc = start_server(port, str(tmp_path / "n"), "--backplane=" + redis.url, "--processes=2")
    try:
        async def main() -> None:
            ann = await Chat.open(port)
            await ann.join()
            await ann.send({"type": "say", "room": "lobby", "text": "hi", "cid": "c"})
            assert (await ann.expect("ack"))["seq"] == 1
            await ann.close()

        run(main())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


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


async def presence_until(chat: Chat, pred: Any, timeout: float = 10.0) -> dict[str, Any]:
    """Presence messages until one satisfies ``pred``."""
    async with asyncio.timeout(timeout):
        while True:
            msg = json.loads(await chat.ws.recv())
            if msg["type"] == "presence" and pred(msg):
                return msg


def test_presence_is_cluster_wide_and_a_dead_nodes_members_leave_within_the_ttl(cluster: Any) -> None:
    a, b = cluster(2, "--presence_ttl=2")

    async def main() -> None:
        ann = await Chat.open(a)
        first = await ann.join()
        assert [m["name"] for m in first["members"]] == ["ann"] and first["member_count"] == 1
        bob = await Chat.open(b, "name=bob")
        joined = await bob.join()
        assert sorted(m["name"] for m in joined["members"]) == ["ann", "bob"] and joined["member_count"] == 2
        seen = await presence_until(ann, lambda m: m.get("member_count") == 2)
        # Changes within one presence window are coalesced (ann's own join may share it).
        names = [seen["user"]["name"]] if seen["event"] == "join" else [u["name"] for u in seen["joined"]]
        assert "bob" in names, seen
        # Ann's second tab, on node B: still one ann.
        tab = await Chat.open(b, "session=" + ann.welcome["session"])
        again = await tab.join()
        assert again["member_count"] == 2
        # Node B dies with bob and ann's second tab: bob leaves, ann (still on A) stays.
        cluster.procs[1].send_signal(signal.SIGKILL)
        left = await presence_until(ann, lambda m: m.get("member_count") == 1, timeout=10)
        assert left["event"] == "leave" and left["user"]["name"] == "bob"
        await ann.close()

    run(main())


async def sensor_points(port: int, sensor: str, seconds: float) -> dict[float, float]:
    """``t -> v`` of ``sensor`` as a viewer on ``port`` receives it over ``seconds``."""
    got: dict[float, float] = {}
    async with websockets.connect("ws://127.0.0.1:%d/ws/sensors" % port) as ws:
        await ws.recv()
        await ws.send(json.dumps({"type": "subscribe", "sensors": [sensor], "max_hz": 10, "backfill": 0}))
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while loop.time() < end:
            try:
                msg = json.loads(await asyncio.wait_for(ws.recv(), max(0.01, end - loop.time())))
            except asyncio.TimeoutError:
                break
            if msg["type"] == "readings":
                got.update((t, v) for t, v in msg["points"].get(sensor, []))
    return got


def test_simulated_sensors_run_once_for_the_cluster_and_another_node_takes_over(cluster: Any) -> None:
    a, b = cluster(1, "--node_name=alpha") + cluster(1, "--node_name=beta")

    async def main() -> None:
        on_a, on_b = await asyncio.gather(sensor_points(a, "sim.vibration", 2.5),
                                          sensor_points(b, "sim.vibration", 2.5))
        common = set(on_a) & set(on_b)
        assert len(common) >= 10, (len(on_a), len(on_b))  # 10 Hz: the same points reach both nodes
        assert all(on_a[t] == on_b[t] for t in common)  # one source, not two simulations
        # Each machine's metrics under its own name, visible from either node.
        for _ in range(50):
            ids = {s["id"] for s in (await asyncio.to_thread(http, b, "/api/sensors"))[1]["sensors"]}
            if {"host.alpha.cpu", "host.beta.cpu"} <= ids:
                break
            await asyncio.sleep(0.1)
        assert {"host.alpha.cpu", "host.beta.cpu"} <= ids
        # The node that runs them dies; the other takes over within the lease's ttl (3 s).
        holder = await asyncio.to_thread(_redis_get, cluster, "rt:lease:sim")
        nodes = [(await asyncio.to_thread(http, p, "/healthz"))[1]["node"] for p in (a, b)]
        dead = nodes.index(holder)
        cluster.procs[dead].send_signal(signal.SIGKILL)
        await asyncio.sleep(3.5)
        later = await sensor_points((a, b)[1 - dead], "sim.vibration", 2.0)
        assert len(later) >= 10
        assert await asyncio.to_thread(_redis_get, cluster, "rt:lease:sim") == nodes[1 - dead]

    run(main())
