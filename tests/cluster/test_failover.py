"""Failover behind nginx: three nodes on one Redis, conf/nginx.conf.example in front, steady
load (chat, editing, sensors), one node killed with SIGKILL and another restarted with SIGTERM.

The clients are the `websockets` library through nginx (TLS), each doing what
docs/PROTOCOL.md tells a client to do when its connection drops: reconnect after a short
jittered pause; chat: join again with ``since``/``epoch`` and resend what was not
acknowledged with the same ``cid``; editors: come back with ``?rev=&client=`` and send the
unacknowledged op again; sensors: subscribe again with a ``backfill`` that covers the gap.  At
the end: every acknowledged chat message is stored once, every chat client got every message
once and in seq order, every editor's copy equals the served document, every viewer holds
exactly the stored readings, and the
only trouble any client saw was its connection closing (1006 from the kill, 1001 from the
SIGTERM).
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
from typing import Any

import pytest
import websockets

from realtime import ot
from realtime.ot import OTClient
from tests.cluster.nginx import Nginx, require_nginx
from tests.cluster.nodes import KEY, Node, busiest
from tests.redis_server import RedisServer

pytestmark = pytest.mark.cluster

SENSOR = "plant.temp"
DOC = "minutes"


class Client:
    """The part every client shares: connect through nginx, reconnect with jitter."""

    def __init__(self, proxy: Nginx, name: str) -> None:
        self.proxy = proxy
        self.name = name
        self.rng = random.Random(name)
        self.errors: list[dict[str, Any]] = []
        self.problems: list[str] = []  # anything a person would notice as wrong
        self.closes: list[int] = []
        self.connects = 0
        self.stopping = False
        self.ws: Any = None

    async def run(self) -> None:
        while not self.stopping:
            try:
                self.ws = await websockets.connect(self.url(), ssl=Nginx.client_ssl(), open_timeout=5,
                                                   ping_interval=None)
            except (OSError, asyncio.TimeoutError, websockets.InvalidHandshake) as e:
                self.problems.append("%s could not connect: %s" % (self.name, e))
                await asyncio.sleep(0.2)
                continue
            self.connects += 1
            try:
                await self.session()  # returns when the server closed cleanly (1000, 1001)
            except websockets.ConnectionClosed:
                pass
            finally:
                if not self.stopping:
                    code = self.ws.close_code if self.ws is not None else None  # 1006 without a close frame
                    self.closes.append(code if code is not None else 1006)
                self.ws = None
            if not self.stopping:
                await asyncio.sleep(0.05 + self.rng.random() * 0.25)  # jittered, as static/js/client.js does

    def url(self) -> str:
        raise NotImplementedError

    async def session(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        self.stopping = True
        if self.ws is not None:
            await self.ws.close()


class ChatClient(Client):
    def __init__(self, proxy: Nginx, name: str) -> None:
        super().__init__(proxy, name)
        self.session_token: str | None = None
        self.epoch: str | None = None
        self.seqs: list[int] = []      # seqs received, in arrival order
        self.unacked: dict[str, str] = {}  # cid -> text, in the order said
        self.acked: dict[str, int] = {}  # cid -> seq
        self.said = 0
        self.saying = True
        self.joined = asyncio.Event()

    def url(self) -> str:
        query = "session=" + self.session_token if self.session_token else "name=" + self.name
        return self.proxy.ws_url + "/ws/chat?" + query

    def take(self, seq: int) -> None:
        last = self.seqs[-1] if self.seqs else 0
        if seq != last + 1:
            self.problems.append("%s got seq %d after %d" % (self.name, seq, last))
        self.seqs.append(seq)

    async def session(self) -> None:
        ws = self.ws
        welcome = json.loads(await ws.recv())
        assert welcome["type"] == "welcome", welcome
        self.session_token = welcome["session"]
        join: dict[str, Any] = {"type": "join", "room": "lobby"}
        if self.epoch is not None:
            join.update(since=self.seqs[-1] if self.seqs else 0, epoch=self.epoch)
        await ws.send(json.dumps(join))
        sender = None
        try:
            async for raw in ws:
                msg = json.loads(raw)
                kind = msg["type"]
                if kind == "joined":
                    if self.epoch is not None and not msg["recovered"]:
                        self.problems.append("%s: resume was not recovered" % self.name)
                    self.epoch = msg["epoch"]
                    for m in msg["messages"]:
                        self.take(m["seq"])
                    for cid, text in list(self.unacked.items()):  # the resend, same cids
                        await ws.send(json.dumps({"type": "say", "room": "lobby", "text": text, "cid": cid}))
                    self.joined.set()
                    sender = asyncio.ensure_future(self.say_steadily(ws))
                elif kind == "message":
                    self.take(msg["seq"])
                elif kind == "ack":
                    if msg["cid"] in self.unacked:
                        del self.unacked[msg["cid"]]
                        self.acked[msg["cid"]] = msg["seq"]
                elif kind == "error":
                    self.errors.append(msg)
                elif kind not in ("presence", "typing"):
                    self.problems.append("%s: unexpected %r" % (self.name, msg))
        finally:
            if sender is not None:
                sender.cancel()

    async def say_steadily(self, ws: Any) -> None:
        while self.saying and not self.stopping:
            self.said += 1
            cid = "%s-%d" % (self.name, self.said)
            text = "%s says %d" % (self.name, self.said)
            self.unacked[cid] = text
            await ws.send(json.dumps({"type": "say", "room": "lobby", "text": text, "cid": cid}))
            await asyncio.sleep(0.12 + self.rng.random() * 0.06)


class Editor(Client):
    """Types into one document; after a drop it comes back with ``?rev=&client=``,
    takes the ops it missed and sends its unacknowledged op again (the same seq),
    as static/js/editing.js does."""

    def __init__(self, proxy: Nginx, name: str) -> None:
        super().__init__(proxy, name)
        self.client: OTClient | None = None
        self.text = ""
        self.typing = True
        self.ready = asyncio.Event()

    def url(self) -> str:
        query = "name=" + self.name
        if self.client is not None:
            query += "&rev=%d&client=%s" % (self.client.rev, self.client.client_id)
        return self.proxy.ws_url + "/ws/edit/" + DOC + "?" + query

    async def send_pending(self, ws: Any) -> None:
        if self.client is not None and (message := self.client.pending_message()) is not None:
            await ws.send(json.dumps(message))

    async def session(self) -> None:
        ws = self.ws
        typist = None
        try:
            async for raw in ws:
                msg = json.loads(raw)
                kind = msg["type"]
                if kind == "snapshot":
                    if self.client is not None:
                        self.problems.append("%s: got a snapshot (a reload) instead of resuming" % self.name)
                    self.text, self.client = msg["text"], OTClient(msg["rev"], msg["client"])
                elif kind == "ops":  # the catch-up after ?rev=
                    assert self.client is not None
                    self.text = self.client.catch_up(self.text, msg["ops"])
                    self.client.client_id = msg["client"]
                    await self.send_pending(ws)
                elif kind == "ack":
                    assert self.client is not None
                    if self.client.server_ack(msg.get("seq")) is not None:
                        await self.send_pending(ws)
                elif kind == "op":
                    assert self.client is not None
                    self.text = ot.apply(self.text, self.client.apply_server(msg["op"]))
                elif kind == "error":
                    self.errors.append(msg)
                elif kind not in ("peer_joined", "peer_left", "cursor"):
                    self.problems.append("%s: unexpected %r" % (self.name, msg))
                if kind in ("snapshot", "ops") and typist is None:
                    self.ready.set()
                    typist = asyncio.ensure_future(self.type_steadily(ws))
        finally:
            if typist is not None:
                typist.cancel()

    async def type_steadily(self, ws: Any) -> None:
        while self.typing and not self.stopping:
            assert self.client is not None
            n = len(self.text)
            if n > 20 and self.rng.random() < 0.3:
                p = self.rng.randrange(n - 1)
                op: list[Any] = [c for c in (p, -1, n - p - 1) if c != 0]
            else:
                p = self.rng.randint(0, n)
                op = [c for c in (p, self.rng.choice(["a", "é", "😀", " "]), n - p) if c != 0]
            self.text = ot.apply(self.text, op)
            if self.client.apply_client(op):
                await self.send_pending(ws)
            await asyncio.sleep(0.1 + self.rng.random() * 0.1)


class Viewer(Client):
    def __init__(self, proxy: Nginx, name: str, started: float) -> None:
        super().__init__(proxy, name)
        self.started = started
        self.points: list[tuple[float, float]] = []

    def url(self) -> str:
        return self.proxy.ws_url + "/ws/sensors"

    async def session(self) -> None:
        ws = self.ws
        welcome = json.loads(await ws.recv())
        assert welcome["type"] == "welcome", welcome
        backfill = time.time() - self.started + 5  # everything since the test began
        await ws.send(json.dumps({"type": "subscribe", "sensors": [SENSOR], "max_hz": 20, "backfill": backfill}))
        async for raw in ws:
            msg = json.loads(raw)
            kind = msg["type"]
            if kind == "backfill" and msg["sensor"] == SENSOR:
                self.points = [(t, v) for t, v in msg["points"]]  # a backfill replaces what was held
            elif kind == "readings":
                for t, v in msg["points"].get(SENSOR, []):
                    if self.points and t <= self.points[-1][0]:
                        self.problems.append("%s: reading at %r after %r" % (self.name, t, self.points[-1][0]))
                    self.points.append((t, v))
            elif kind == "error":
                self.errors.append(msg)


class Device:
    """Posts one reading every 50 ms through nginx; keeps those that got 200 (acked)."""

    def __init__(self, proxy: Nginx) -> None:
        self.proxy = proxy
        self.acked: list[tuple[float, float]] = []
        self.refused: list[str] = []
        self.stopping = False

    async def post(self, t: float, v: float) -> bool:
        try:
            status, body = await asyncio.to_thread(
                self.proxy.get, "/api/sensors/%s/readings" % SENSOR, json.dumps([[t, v]]).encode(),
                {"X-Ingest-Key": KEY, "Content-Type": "application/json"}, 3.0)
        except OSError as e:
            self.refused.append(str(e))
            return False
        if status != 200:
            # A POST that reached the dying node is not resent by nginx (502): unknown
            # whether it was stored; a real device sends its next reading.
            self.refused.append("%s %s" % (status, body))
            return False
        self.acked.append((t, v))
        return True

    async def run(self) -> None:
        n = 0
        while not self.stopping:
            n += 1
            await self.post(round(time.time(), 3), float(n))
            await asyncio.sleep(0.05)


def stored_readings(redis: RedisServer) -> list[tuple[float, float]]:
    import redis as sync_redis

    client = sync_redis.Redis.from_url(redis.url)
    try:
        members = client.zrange("rt:sensor:{%s}:pts" % SENSOR, 0, -1)
    finally:
        client.close()
    points = []
    for m in members:
        t, v, _ = (m.decode() if isinstance(m, bytes) else str(m)).split("|", 2)
        points.append((float(t), float(v)))
    return sorted(points)


@pytest.fixture
def redis(tmp_path: Any) -> Any:
    server = RedisServer(str(tmp_path / "redis")).start()
    yield server
    server.stop()


def test_clients_through_nginx_survive_a_killed_and_a_restarted_node(tmp_path: Any, redis: RedisServer) -> None:
    require_nginx()
    nodes = [Node(tmp_path, i, redis.url) for i in range(3)]
    proxy: Nginx | None = None
    try:
        for node in nodes:
            node.start()
        proxy = Nginx(str(tmp_path / "nginx"), [n.port for n in nodes]).start()
        asyncio.run(asyncio.wait_for(load_with_failures(proxy, nodes, redis), 50))
    finally:
        if proxy is not None:
            proxy.stop()
        for node in nodes:
            node.stop()


async def load_with_failures(proxy: Nginx, nodes: list[Node], redis: RedisServer) -> None:
    started = time.time()
    device = Device(proxy)
    assert await device.post(round(time.time(), 3), 0.0), device.refused  # the sensor exists from here on
    chats = [ChatClient(proxy, "chat%d" % i) for i in range(6)]
    viewers = [Viewer(proxy, "viewer%d" % i, started) for i in range(3)]
    editors = [Editor(proxy, "editor%d" % i) for i in range(4)]
    tasks = [asyncio.ensure_future(c.run()) for c in chats + viewers + editors]
    async with asyncio.timeout(10):
        for c in chats:
            await c.joined.wait()
        for e in editors:
            await e.ready.wait()
    dev = asyncio.ensure_future(device.run())

    await asyncio.sleep(2.5)
    victim = busiest(nodes)
    victim.signal(signal.SIGKILL)                 # a crash: nothing flushed, no close frames
    await asyncio.sleep(2.5)
    restarted = busiest([n for n in nodes if n is not victim])
    assert await asyncio.to_thread(restarted.signal, signal.SIGTERM) == 0  # a rolling restart's step
    await asyncio.to_thread(restarted.start)
    await asyncio.sleep(2.5)

    # Stop the load; let every say be acknowledged and every message arrive.
    for c in chats:
        c.saying = False
    for e in editors:
        e.typing = False
    device.stopping = True
    await dev
    try:
        await drain(proxy, chats, viewers, editors, redis)
    except TimeoutError:
        state: dict[str, dict[str, Any]] = {c.name: {"unacked": len(c.unacked), "seqs": len(c.seqs)} for c in chats}
        state.update({v.name: {"points": len(v.points)} for v in viewers})
        state.update({e.name: {"state": e.client and e.client.state, "length": len(e.text)} for e in editors})
        for client in [*chats, *viewers, *editors]:
            state[client.name].update(problems=client.problems[:3], errors=client.errors[:3], closes=client.closes)
        raise AssertionError("not settled 15 s after the load: %s" % json.dumps(state)) from None
    page = (await asyncio.to_thread(proxy.get, "/api/rooms/lobby/messages?since=0&limit=1000"))[1]
    stored = await asyncio.to_thread(stored_readings, redis)
    document = [(await asyncio.to_thread(proxy.get, "/api/docs/" + DOC))[1] for _ in range(3)]  # any nodes
    for client in [*chats, *viewers, *editors]:
        await client.close()
    await asyncio.gather(*tasks)
    check(page, stored, chats, viewers, device)
    # Editing: every copy equals the document every node serves, with many edits in it.
    assert all(d["text"] == document[0]["text"] and d["rev"] == document[0]["rev"] for d in document), document
    assert document[0]["rev"] >= 4 * 20, "the editors made few edits: rev %d" % document[0]["rev"]
    for e in editors:
        assert e.text == document[0]["text"], e.name
    assert [p for e in editors for p in e.problems] == []
    assert [err for e in editors for err in e.errors] == []
    codes = [code for e in editors for code in e.closes]
    assert set(codes) <= {1001, 1006}, codes
    assert sum(e.connects - 1 for e in editors) == len(codes)


async def drain(proxy: Nginx, chats: list[ChatClient], viewers: list[Viewer], editors: list[Editor],
                redis: RedisServer) -> None:
    async with asyncio.timeout(15):
        while any(c.unacked for c in chats):
            await asyncio.sleep(0.1)
        while True:
            status, page = await asyncio.to_thread(proxy.get, "/api/rooms/lobby/messages?since=0&limit=1000")
            assert status == 200, page
            if all(len(c.seqs) == page["seq"] for c in chats):
                break
            await asyncio.sleep(0.1)
        stored = await asyncio.to_thread(stored_readings, redis)
        while not all(v.points == stored for v in viewers):
            await asyncio.sleep(0.1)
        while True:
            status, doc = await asyncio.to_thread(proxy.get, "/api/docs/" + DOC)
            assert status == 200, doc
            if all(e.client is not None and e.client.state == "synchronized" and e.client.rev == doc["rev"]
                   for e in editors):
                break
            await asyncio.sleep(0.1)


def check(page: dict[str, Any], stored: list[tuple[float, float]], chats: list[ChatClient], viewers: list[Viewer],
          device: Device) -> None:
    # Chat: every acknowledged message stored once; every client got every one, once, in order.
    messages = page["messages"]
    assert [m["seq"] for m in messages] == list(range(1, page["seq"] + 1))
    cids = [m["cid"] for m in messages]
    assert len(cids) == len(set(cids)), "a message was stored twice"
    by_cid = {m["cid"]: m for m in messages}
    acked = {cid: seq for c in chats for cid, seq in c.acked.items()}
    assert len(acked) >= 6 * 25, "the load was lighter than meant: %d acked" % len(acked)
    for cid, seq in acked.items():
        assert by_cid[cid]["seq"] == seq, (cid, seq)
    assert set(acked) == set(by_cid), "stored but never acknowledged, or acknowledged and lost"
    for c in chats:
        assert c.seqs == list(range(1, page["seq"] + 1)), c.name
    # Sensors: the acknowledged readings are stored, and every viewer holds exactly what is stored.
    assert set(device.acked) <= set(stored)
    assert len(device.acked) >= 20, "the device got few readings in: %s" % device.refused[:3]
    for v in viewers:
        assert v.points == stored, v.name
    # Nobody saw anything but their connection closing: 1006 from the kill, 1001 from the SIGTERM.
    everyone = chats + viewers
    assert [p for c in everyone for p in c.problems] == []
    assert [e for c in everyone for e in c.errors] == []
    codes = [code for c in everyone for code in c.closes]
    assert set(codes) == {1001, 1006}, codes
    assert sum(c.connects - 1 for c in everyone) == len(codes), "every drop was followed by a reconnect"
