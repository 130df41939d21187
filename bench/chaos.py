"""Chaos: many clients through a proxy that refuses, delays, stalls and cuts their
connections, while the server itself is killed (SIGKILL) and restarted.

    python3 bench/chaos.py                 # the long form: 50 clients, 20,000 chat messages, 5 kills
    python3 bench/chaos.py --quick         # what CI runs (tests/integration/test_chaos.py)
    python3 bench/chaos.py --seed=7        # replay one run

What runs, all on 127.0.0.1, through tests/chaos_proxy.py:

* chat: ``--clients`` people in ``--rooms`` rooms, each sending its share of
  ``--messages`` with a ``cid``, resending what was not acknowledged (same cid)
  after every reconnect, and resuming with ``since``/``epoch``; one person per
  room is a moderator who deletes messages now and then (tombstones);
* editing: ``--editors`` on ``--docs`` documents making random edits with the OT
  client state machine (realtime/ot.py), reconnecting with ``?rev=&client=``;
* sensors: a device publishes a reading every 50 ms straight to the server (not
  through the proxy), buffering while the server is down; ``--viewers`` watch it
  through the proxy and ask for a backfill from their last point on every reconnect.

At the end the proxy calms down, everyone catches up, and the run checks, against what
the server stored (read over HTTP):

* no acknowledged message lost, none stored twice, every cid stored exactly once;
* every chat client's view (messages, deleted messages, tombstones, in seq order, from
  its first join on) identical to the stored history, with no gap and every resume
  ``recovered``;
* every editor's text equal to the server's document;
* every viewer holding every stored point since it first subscribed (no gap larger
  than the conflation bound if the server had to conflate).

Prints a table; exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jwt  # noqa: E402
import websockets  # noqa: E402
import websockets.exceptions  # noqa: E402

from realtime import ot  # noqa: E402
from realtime.ot import OTClient  # noqa: E402
from realtime.storage.base import redacted  # noqa: E402
from tests.chaos_proxy import ChaosProxy, Mischief  # noqa: E402
from tests.servers import ServerProcess, free_port, start_server  # noqa: E402

SECRET = "chaos-" + "k" * 40
INGEST_KEY = "chaos-ingest-key-0123456789"
SENSOR = "chaos.feed"
PUBLISH_PERIOD = 0.05
DROPPED = (websockets.exceptions.WebSocketException, OSError, asyncio.TimeoutError, EOFError)


@dataclass
class Config:
    clients: int = 50
    rooms: int = 3
    messages: int = 20000
    rate: float = 4.0  # messages per second per chat client
    editors: int = 10
    docs: int = 2
    edits: int = 3000
    edit_rate: float = 3.0
    viewers: int = 10
    kills: int = 5
    seed: int = 1
    settle: float = 60.0  # seconds the calm end may take
    mischief: Mischief = field(default_factory=Mischief)


def token(sub: str, *roles: str) -> str:
    now = time.time()
    return jwt.encode({"sub": sub, "name": sub, "roles": list(roles), "exp": now + 3600}, SECRET, algorithm="HS256")


# -- the server ---------------------------------------------------------------------------


class Server:
    """server.py as a child process that can be killed and started again on its port and data_dir."""

    def __init__(self, data_dir: str, log_path: str) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        self.log_path = log_path
        self.proc: ServerProcess | None = None
        self.kills = 0
        self.down_since: float | None = None
        self.downtime = 0.0
        self.args = ("--auth=token", "--jwt_secret=" + SECRET, "--ingest_key=" + INGEST_KEY, "--rate_limit=0",
                     "--edit_rate=0", "--max_connections_per_ip=0", "--max_half_open_per_ip=0",
                     "--history_keep=30000", "--ping_interval=2", "--ping_timeout=2", "--handshake_timeout=3",
                     "--simulated_sensors=", "--host_metrics=False", "--max_token_lifetime=0",
                     "--doc_log_keep=5000", "--logging=warning")

    def start(self) -> None:
        self.proc = start_server(self.port, self.data_dir, *self.args, log_path=Path(self.log_path), timeout=30)
        if self.down_since is not None:
            self.downtime += time.monotonic() - self.down_since
            self.down_since = None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()  # SIGKILL: no shutdown, no flush
        self.kills += 1
        self.down_since = time.monotonic()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def get(self, path: str) -> Any:
        req = urllib.request.Request("http://127.0.0.1:%d%s" % (self.port, path),
                                     headers={"Authorization": "Bearer " + token("auditor", "admin")})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())


# -- chat ---------------------------------------------------------------------------------


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """The same entry, but for a deletion one of the two may not know about yet."""
    strip = ("text", "deleted")
    return {k: v for k, v in a.items() if k not in strip} == {k: v for k, v in b.items() if k not in strip}


class Peer:
    """A client that reconnects (with jittered backoff, 0.1 s doubling to 1 s) until stopped."""

    user = "?"

    def __init__(self, run: "Chaos") -> None:
        self.run = run
        self.stop = False
        self.sessions = 0
        self.problems: list[str] = []

    def problem(self, text: str) -> None:
        if len(self.problems) < 20:
            self.problems.append("%s: %s" % (self.user, text))

    async def session(self) -> None:
        raise NotImplementedError

    async def loop(self) -> None:
        delay = 0.1
        while not self.stop:
            try:
                await self.session()
                delay = 0.1
            except DROPPED:
                pass
            if not self.stop:
                await asyncio.sleep(self.run.rng.uniform(0.5, 1.0) * delay)
                delay = min(delay * 2, 1.0)


class ChatPeer(Peer):
    def __init__(self, run: "Chaos", n: int) -> None:
        super().__init__(run)
        self.user = "u%02d" % n
        self.room = "room%d" % (n % run.cfg.rooms)
        self.moderator = n < run.cfg.rooms
        self.token = token(self.user, *(["moderator"] if self.moderator else []))
        self.quota = run.cfg.messages // run.cfg.clients + (1 if n < run.cfg.messages % run.cfg.clients else 0)
        self.made = 0
        self.outbox: dict[str, str] = {}  # cid -> text, not acknowledged yet
        self.acked: dict[str, int] = {}  # cid -> seq
        self.deletes: dict[int, int] = {}  # target -> tombstone seq
        self.view: dict[int, dict[str, Any]] = {}
        self.first: int | None = None  # the first seq this client holds (its view starts there)
        self.last = 0  # its view has every seq from first to last
        self.epoch: str | None = None
        self.resumes = 0

    @property
    def done_sending(self) -> bool:
        return self.made >= self.quota and not self.outbox

    def take(self, e: dict[str, Any], live: bool) -> None:
        seq = e["seq"]
        if live:
            if seq <= self.last:
                self.problem("live entry %d again (view ends at %d)" % (seq, self.last))
                return
            if seq != self.last + 1:
                self.problem("live entry %d after %d: a gap" % (seq, self.last))
        if e["type"] == "deleted":
            target = self.view.get(e["target"])
            if target is not None and target["type"] == "message":
                self.view[e["target"]] = redacted(target)
        old = self.view.get(seq)
        if old is not None and not _same(old, e):
            self.problem("seq %d is %r, and now %r" % (seq, old, e))
        if old is None or e.get("deleted"):
            self.view[seq] = e
        if self.first is None:
            self.first = seq
        self.last = max(self.last, seq)

    async def session(self) -> None:
        url = "ws://127.0.0.1:%d/ws/chat?token=%s" % (self.run.proxy.port, self.token)
        async with websockets.connect(url, open_timeout=5, close_timeout=1, ping_interval=1, ping_timeout=3,
                                      max_size=2**24) as ws:
            self.sessions += 1
            if json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] != "welcome":
                return
            join: dict[str, Any] = {"type": "join", "room": self.room}
            if self.epoch is not None:
                join.update(since=self.last, epoch=self.epoch)
            await ws.send(json.dumps(join))
            while True:
                j = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if j["type"] == "joined":
                    break
                if j["type"] == "error":
                    return  # e.g. unavailable while the server starts: reconnect
            if self.epoch is not None:
                self.resumes += 1
                if not j["recovered"]:
                    self.problem("a resume from %d was not recovered" % self.last)
                if self.view and j["messages"] and j["messages"][0]["seq"] != self.last + 1:
                    self.problem("resumed at %d after %d" % (j["messages"][0]["seq"], self.last))
            elif not self.view and j["messages"]:
                self.first = j["messages"][0]["seq"]
            self.epoch = j["epoch"]
            for e in j["messages"]:
                self.take(e, live=False)
            if self.first is None:
                self.first = j["seq"] + 1
            self.last = max(self.last, j["seq"])
            sender = asyncio.ensure_future(self.send_loop(ws))
            try:
                async for raw in ws:
                    self.on_message(json.loads(raw))
                    if self.stop:
                        break
            finally:
                sender.cancel()

    def on_message(self, m: dict[str, Any]) -> None:
        t = m["type"]
        if t in ("message", "deleted", "member"):
            self.take(m, live=True)
        elif t == "ack":
            if "cid" in m:
                prev = self.acked.get(m["cid"])
                if prev is not None and prev != m["seq"]:
                    self.problem("cid %s acked as %d and as %d" % (m["cid"], prev, m["seq"]))
                self.acked[m["cid"]] = m["seq"]
                self.outbox.pop(m["cid"], None)
            elif "target" in m:
                self.deletes[m["target"]] = m["seq"]
        elif t == "error":
            if m["code"] not in ("unavailable", "not_found"):  # retried / a deletion raced a trim
                self.problem("error %r" % m)

    async def send_loop(self, ws: Any) -> None:
        rng = self.run.rng
        for cid, text in list(self.outbox.items()):  # unacknowledged: the same cid again
            await ws.send(json.dumps({"type": "say", "room": self.room, "text": text, "cid": cid}))
        last_resend = time.monotonic()
        while True:
            await asyncio.sleep(rng.expovariate(self.run.cfg.rate))
            if time.monotonic() - last_resend > 2.0 and self.outbox:
                last_resend = time.monotonic()
                for cid, text in list(self.outbox.items()):
                    await ws.send(json.dumps({"type": "say", "room": self.room, "text": text, "cid": cid}))
            if self.made < self.quota and len(self.outbox) < 5:
                self.made += 1
                cid = "%s-%d" % (self.user, self.made)
                text = "%s says %d %s" % (self.user, self.made, rng.choice(["hi", "😀", "a\tb", "ünïcode", "<b>x</b>"]))
                self.outbox[cid] = text
                await ws.send(json.dumps({"type": "say", "room": self.room, "text": text, "cid": cid}))
            if self.moderator and not self.run.calm and rng.random() < 0.05:
                targets = [s for s, e in self.view.items() if e["type"] == "message" and not e.get("deleted")]
                if targets:
                    await ws.send(json.dumps({"type": "delete", "room": self.room, "seq": rng.choice(targets)}))


# -- editing ------------------------------------------------------------------------------


def random_edit(rng: random.Random, text: str) -> list[Any]:
    n = len(text)
    if n and rng.random() < 0.35:
        p = rng.randrange(n)
        k = min(n - p, rng.randint(1, 3))
        comps: list[Any] = [p, -k, n - p - k]
    else:
        p = rng.randint(0, n)
        comps = [p, rng.choice(["a", "bc", "😀", "é", " ", "\n", "xyz"]), n - p]
    return [c for c in comps if c != 0]


class EditorPeer(Peer):
    def __init__(self, run: "Chaos", n: int) -> None:
        super().__init__(run)
        self.user = "e%02d" % n
        self.doc = "doc%d" % (n % run.cfg.docs)
        self.token = token(self.user, "edit")
        self.quota = run.cfg.edits // run.cfg.editors
        self.made = 0
        self.client: OTClient | None = None
        self.text = ""
        self.lost_local = 0  # unacknowledged local edits dropped by a snapshot (the protocol allows it)

    @property
    def synced(self) -> bool:
        return self.client is not None and self.client.state == "synchronized"

    async def send_pending(self, ws: Any) -> None:
        assert self.client is not None
        message = self.client.pending_message()
        if message is not None:
            await ws.send(json.dumps(message))

    async def session(self) -> None:
        q = "token=%s" % self.token
        if self.client is not None:
            q += "&rev=%d" % self.client.rev
            if self.client.client_id:
                q += "&client=%s" % self.client.client_id
        url = "ws://127.0.0.1:%d/ws/edit/%s?%s" % (self.run.proxy.port, self.doc, q)
        async with websockets.connect(url, open_timeout=5, close_timeout=1, ping_interval=1, ping_timeout=3,
                                      max_size=2**24) as ws:
            self.sessions += 1
            first = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if first["type"] == "snapshot":
                if self.client is not None and self.client.outstanding is not None:
                    self.lost_local += 1
                self.text = first["text"]
                self.client = OTClient(first["rev"], first["client"])
            elif first["type"] == "ops":
                client = self.client
                assert client is not None
                self.text = client.catch_up(self.text, first["ops"])
                if first["rev"] != client.rev:
                    self.problem("caught up to %d, the server is at %d" % (client.rev, first["rev"]))
                client.client_id = first["client"]
            else:
                self.problem("first message %r" % first)
                return
            await self.send_pending(ws)
            editor = asyncio.ensure_future(self.edit_loop(ws))
            try:
                async for raw in ws:
                    await self.on_message(ws, json.loads(raw))
                    if self.stop or self.client is None:
                        break
            finally:
                editor.cancel()

    async def on_message(self, ws: Any, m: dict[str, Any]) -> None:
        client = self.client
        assert client is not None
        t = m["type"]
        if t == "ack":
            if client.server_ack(m.get("seq")) is not None:
                await self.send_pending(ws)
        elif t == "op":
            self.text = ot.apply(self.text, client.apply_server(m["op"]))
        elif t == "error":
            if m["code"] in ("unavailable", "rate_limited"):
                await asyncio.sleep(0.2)
                await self.send_pending(ws)
            else:
                self.problem("error %r" % m)
                self.client = None  # reload: reconnect without rev, take the snapshot
                await ws.close()

    async def edit_loop(self, ws: Any) -> None:
        rng = self.run.rng
        while True:
            await asyncio.sleep(rng.expovariate(self.run.cfg.edit_rate))
            if self.made >= self.quota or self.run.calm or self.client is None:
                continue
            op = random_edit(rng, self.text)
            self.text = ot.apply(self.text, op)
            self.made += 1
            if self.client.apply_client(op):
                await self.send_pending(ws)


# -- sensors ------------------------------------------------------------------------------


class Publisher:
    """One device: a point every 50 ms (it goes on measuring while the server is down),
    sent straight to the server; a batch is kept until it is acknowledged."""

    def __init__(self, run: "Chaos") -> None:
        self.run = run
        self.acked: list[tuple[float, float]] = []
        self.buffer: list[list[float]] = []
        self.stop = False
        self.n = 0

    async def loop(self) -> None:
        producer = asyncio.ensure_future(self.produce())
        try:
            while not self.stop:
                try:
                    await self.session()
                except DROPPED:
                    pass
                await asyncio.sleep(0.1)
        finally:
            producer.cancel()

    async def produce(self) -> None:
        while not self.stop:
            if not self.run.calm:
                self.n += 1
                self.buffer.append([round(time.time(), 4), float(self.n)])
            await asyncio.sleep(PUBLISH_PERIOD)

    async def session(self) -> None:
        url = "ws://127.0.0.1:%d/ws/sensors?key=%s&token=%s" % (self.run.server.port, INGEST_KEY, token("device"))
        async with websockets.connect(url, open_timeout=3, close_timeout=1) as ws:
            await asyncio.wait_for(ws.recv(), 5)  # welcome
            while not self.stop:
                if self.buffer:
                    batch = self.buffer[:500]
                    await ws.send(json.dumps({"type": "publish", "sensor": SENSOR, "points": batch, "ref": 1}))
                    while True:
                        m = json.loads(await asyncio.wait_for(ws.recv(), 5))
                        if m["type"] in ("ack", "error"):
                            break
                    if m["type"] == "ack":
                        self.acked.extend((t, v) for t, v in batch)
                        del self.buffer[:len(batch)]
                await asyncio.sleep(PUBLISH_PERIOD)


class ViewerPeer(Peer):
    def __init__(self, run: "Chaos", n: int) -> None:
        super().__init__(run)
        self.user = "v%02d" % n
        self.token = token(self.user)
        self.points: set[float] = set()
        self.first: float | None = None
        self.conflated = 0

    async def session(self) -> None:
        url = "ws://127.0.0.1:%d/ws/sensors?token=%s" % (self.run.proxy.port, self.token)
        async with websockets.connect(url, open_timeout=5, close_timeout=1, ping_interval=1, ping_timeout=3,
                                      max_size=2**24) as ws:
            self.sessions += 1
            await asyncio.wait_for(ws.recv(), 5)
            while True:
                last = max(self.points) if self.points else None
                backfill = 10.0 if last is None else time.time() - last + 1.0
                await ws.send(json.dumps({"type": "subscribe", "sensors": [SENSOR], "max_hz": 10,
                                          "backfill": round(backfill, 3)}))
                m = json.loads(await asyncio.wait_for(ws.recv(), 5))
                while m["type"] not in ("subscribed", "error"):
                    m = json.loads(await asyncio.wait_for(ws.recv(), 5))
                if m["type"] == "subscribed":
                    break
                await asyncio.sleep(0.2)  # the device has not published yet
            async for raw in ws:
                m = json.loads(raw)
                if m["type"] == "backfill" and m["sensor"] == SENSOR:
                    self.add(m["points"])
                elif m["type"] == "readings":
                    self.conflated += m.get("conflated", 0)
                    self.add(m["points"].get(SENSOR, []))
                if self.stop:
                    break

    def add(self, points: list[list[float]]) -> None:
        for t, _ in points:
            self.points.add(t)
            if self.first is None:
                self.first = t


# -- the run ------------------------------------------------------------------------------


class Chaos:
    def __init__(self, cfg: Config, workdir: str) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.server = Server(os.path.join(workdir, "data"), os.path.join(workdir, "server.log"))
        self.proxy = ChaosProxy(self.server.port, random.Random(cfg.seed + 1), cfg.mischief)
        self.calm = False
        self.chat = [ChatPeer(self, n) for n in range(cfg.clients)]
        self.editors = [EditorPeer(self, n) for n in range(cfg.editors)]
        self.viewers = [ViewerPeer(self, n) for n in range(cfg.viewers)]
        self.publisher = Publisher(self)
        self.failures: list[str] = []
        self.figures: dict[str, Any] = {}

    async def main(self) -> dict[str, Any]:
        t0 = time.monotonic()
        self.server.start()
        await self.proxy.start()
        peers: list[Any] = [*self.chat, *self.editors, *self.viewers, self.publisher]
        tasks = [asyncio.ensure_future(p.loop()) for p in peers]
        try:
            await self.chaos_phase()
            sending = time.monotonic() - t0
            await self.settle()
            await self.check()
        finally:
            for p in peers:
                p.stop = True
            await asyncio.sleep(0.2)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.proxy.stop()
            self.server.stop()
        log = open(self.server.log_path, errors="replace").read()
        if "Traceback" in log:
            self.failures.append("the server logged a traceback: " + log[log.index("Traceback"):][:1500])
        self.figures.update(seconds=round(time.monotonic() - t0, 1), chaos_seconds=round(sending, 1),
                            kills=self.server.kills, downtime=round(self.server.downtime, 1),
                            proxy=vars(self.proxy.stats) | {"open": len(self.proxy.stats.open)})
        return {"failures": self.failures, "figures": self.figures}

    async def chaos_phase(self) -> None:
        """Until every message and edit is made; the server is killed ``kills`` times meanwhile."""
        expected = max(self.cfg.messages / (self.cfg.clients * self.cfg.rate),
                       self.cfg.edits / (self.cfg.editors * self.cfg.edit_rate))
        when = sorted(self.rng.uniform(1.0, max(1.5, expected * 0.9)) for _ in range(self.cfg.kills))
        start = time.monotonic()
        for at in when:
            await asyncio.sleep(max(0.0, start + at - time.monotonic()))
            self.server.kill()
            await asyncio.sleep(self.rng.uniform(0.2, 1.0))
            await asyncio.get_running_loop().run_in_executor(None, self.server.start)
        deadline = time.monotonic() + expected * 3 + 30
        while not all(p.made >= p.quota for p in self.chat) or not all(e.made >= e.quota for e in self.editors):
            if time.monotonic() > deadline:
                self.failures.append("clients did not finish sending in time")
                return
            await asyncio.sleep(0.2)

    async def settle(self) -> None:
        """Calm the network; wait until everything sent is acknowledged and everyone has caught up."""
        self.calm = True
        self.proxy.calm()
        deadline = time.monotonic() + self.cfg.settle
        loop = asyncio.get_running_loop()
        while time.monotonic() < deadline:
            if all(p.done_sending for p in self.chat) and all(e.synced for e in self.editors) \
                    and not self.publisher.buffer:
                break
            await asyncio.sleep(0.2)
        else:
            self.failures.append("not everything was acknowledged within %.0f s of calm: %d chat messages, %d editors"
                                 % (self.cfg.settle, sum(len(p.outbox) for p in self.chat),
                                    sum(not e.synced for e in self.editors)))
        await asyncio.sleep(0.5)
        listed = await loop.run_in_executor(None, self.server.get, "/api/rooms")
        rooms = {r["room"]: r["seq"] for r in listed["rooms"]}
        docs = {}
        for d in {e.doc for e in self.editors}:
            docs[d] = await loop.run_in_executor(None, self.server.get, "/api/docs/" + d)
        self.final_rooms, self.final_docs = rooms, docs
        end_t = self.publisher.acked[-1][0] if self.publisher.acked else None
        while time.monotonic() < deadline:
            if all(p.last >= rooms.get(p.room, 0) for p in self.chat) \
                    and all(e.client is not None and e.client.rev >= docs[e.doc]["rev"] and e.synced
                            for e in self.editors) \
                    and all(end_t is None or end_t in v.points for v in self.viewers):
                return
            await asyncio.sleep(0.2)
        self.failures.append("not everyone caught up within %.0f s of calm" % self.cfg.settle)

    def history(self, room: str) -> dict[int, dict[str, Any]]:
        out: dict[int, dict[str, Any]] = {}
        since = 0
        while True:
            page = self.server.get("/api/rooms/%s/messages?since=%d&limit=1000" % (room, since))
            if not page["complete"]:
                self.failures.append("room %s: history after %d was trimmed" % (room, since))
            for e in page["messages"]:
                out[e["seq"]] = e
            if not page["messages"]:
                return out
            since = page["messages"][-1]["seq"]

    async def check(self) -> None:
        loop = asyncio.get_running_loop()
        fails = self.failures
        stored: dict[str, dict[int, dict[str, Any]]] = {}
        for room in sorted({p.room for p in self.chat}):
            stored[room] = await loop.run_in_executor(None, self.history, room)
        # Acknowledged: stored at its seq, once.  Stored: each (user, cid) once.
        lost = doubled = wrong = 0
        seen: dict[tuple[str, str], int] = {}
        for room, hist in stored.items():
            if sorted(hist) != list(range(1, len(hist) + 1)):
                fails.append("room %s: stored seqs are not 1..%d without gaps" % (room, len(hist)))
            for e in hist.values():
                if e["type"] == "message":
                    key = (e["user"], e.get("cid", ""))
                    seen[key] = seen.get(key, 0) + 1
        doubled = sum(n - 1 for n in seen.values() if n > 1)
        made = sum(p.made for p in self.chat)
        for p in self.chat:
            hist = stored[p.room]
            for cid, seq in p.acked.items():
                entry = hist.get(seq)
                if entry is None or entry["type"] != "message" or entry.get("cid") != cid or entry["user"] != p.user:
                    lost += 1
            for target, tomb in p.deletes.items():
                if not hist.get(target, {}).get("deleted") or hist.get(tomb, {}).get("target") != target:
                    wrong += 1
            fails.extend(p.problems)
            # The view: every seq from its first on, each identical to what is stored.
            if p.first is not None:
                want = set(range(p.first, max(hist) + 1)) if hist else set()
                missing = want - set(p.view)
                if missing:
                    fails.append("%s: its view lacks %d entries (e.g. %s)"
                                 % (p.user, len(missing), sorted(missing)[:5]))
                for seq, e in p.view.items():
                    if hist.get(seq) != e:
                        wrong += 1
                        if wrong <= 3:
                            fails.append("%s: seq %d is %r, stored %r" % (p.user, seq, e, hist.get(seq)))
        acked = sum(len(p.acked) for p in self.chat)
        stored_msgs = sum(1 for hist in stored.values() for e in hist.values() if e["type"] == "message")
        deleted = sum(1 for hist in stored.values() for e in hist.values() if e["type"] == "deleted")
        if lost:
            fails.append("%d acknowledged messages are not stored as acknowledged" % lost)
        if doubled:
            fails.append("%d messages are stored twice" % doubled)
        if wrong:
            fails.append("%d entries differ between a client's view and the store" % wrong)
        if stored_msgs != made or acked != made:
            fails.append("%d messages made, %d acknowledged, %d stored" % (made, acked, stored_msgs))
        # Editors: every copy equals the server's.
        diverged = 0
        for ed in self.editors:
            fails.extend(ed.problems)
            if ed.text != self.final_docs[ed.doc]["text"]:
                diverged += 1
                fails.append("%s: its copy of %s differs from the server's" % (ed.user, ed.doc))
        # Viewers: every stored point since each first subscribed, or gaps within the conflation bound.
        published = sorted({t for t, _ in self.publisher.acked})
        worst_gap = 0.0
        missing_points = 0
        for v in self.viewers:
            if v.first is None:
                fails.append("%s never got a point" % v.user)
                continue
            window = [t for t in published if t >= v.first]
            got = sorted(v.points)
            gap = max((b - a for a, b in zip(got, got[1:])), default=0.0)
            source_gap = max((b - a for a, b in zip(window, window[1:])), default=0.0)
            worst_gap = max(worst_gap, gap)
            missed = len(set(window) - v.points)
            missing_points += missed
            if v.conflated == 0 and missed:
                fails.append("%s: %d stored points never reached it" % (v.user, missed))
            elif gap > source_gap + 10 * PUBLISH_PERIOD:
                fails.append("%s: a gap of %.2f s (the source's largest is %.2f s)" % (v.user, gap, source_gap))
        self.figures.update(
            chat_clients=len(self.chat), rooms=len(stored), messages=made, acked=acked, stored=stored_msgs,
            lost=lost, doubled=doubled, view_mismatches=wrong, deleted=deleted,
            chat_sessions=sum(p.sessions for p in self.chat), resumes=sum(p.resumes for p in self.chat),
            editors=len(self.editors), edits=sum(e.made for e in self.editors),
            doc_revs={d: doc["rev"] for d, doc in self.final_docs.items()}, diverged=diverged,
            lost_local_edits=sum(e.lost_local for e in self.editors),
            editor_sessions=sum(e.sessions for e in self.editors),
            viewers=len(self.viewers), points=len(published), points_missed=missing_points,
            worst_viewer_gap=round(worst_gap, 3), conflated=sum(v.conflated for v in self.viewers),
            viewer_sessions=sum(v.sessions for v in self.viewers))


def run(cfg: Config) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="chaos-") as workdir:
        return asyncio.run(Chaos(cfg, workdir).main())


def quick(seed: int = 1) -> Config:
    """The bounded form CI runs (well under a minute on two shared cores)."""
    return Config(clients=50, rooms=3, messages=2000, rate=3.0, editors=6, docs=2, edits=300, edit_rate=4.0,
                  viewers=4, kills=2, seed=seed, settle=20.0)


def report(result: dict[str, Any]) -> str:
    f = result["figures"]
    rows = [
        ("wall time (s), of which chaos", "%s, %s" % (f.get("seconds"), f.get("chaos_seconds"))),
        ("server kills (SIGKILL), downtime (s)", "%s, %s" % (f.get("kills"), f.get("downtime"))),
        ("proxy: accepted / refused / cut / stalled / delayed / server down",
         "%(accepted)d / %(refused)d / %(cut)d / %(stalled)d / %(delayed)d / %(upstream_down)d" % f["proxy"]),
        ("chat: clients, rooms, sessions, resumes",
         "%s, %s, %s, %s" % (f.get("chat_clients"), f.get("rooms"), f.get("chat_sessions"), f.get("resumes"))),
        ("chat: made / acked / stored / deleted",
         "%s / %s / %s / %s" % (f.get("messages"), f.get("acked"), f.get("stored"), f.get("deleted"))),
        ("chat: acked lost, doubled, view mismatches",
         "%s, %s, %s" % (f.get("lost"), f.get("doubled"), f.get("view_mismatches"))),
        ("editing: editors, edits, sessions, final revs",
         "%s, %s, %s, %s" % (f.get("editors"), f.get("edits"), f.get("editor_sessions"), f.get("doc_revs"))),
        ("editing: copies differing from the server, unacked local edits dropped",
         "%s, %s" % (f.get("diverged"), f.get("lost_local_edits"))),
        ("sensors: viewers, sessions, points stored, missed, worst gap (s), conflated",
         "%s, %s, %s, %s, %s, %s" % (f.get("viewers"), f.get("viewer_sessions"), f.get("points"),
                                     f.get("points_missed"), f.get("worst_viewer_gap"), f.get("conflated"))),
    ]
    width = max(len(r[0]) for r in rows)
    lines = ["| %s | %s |" % ("what".ljust(width), "figure"), "|%s|---|" % ("-" * (width + 2))]
    lines += ["| %s | %s |" % (a.ljust(width), b) for a, b in rows]
    lines.append("")
    lines.append("FAILED:\n  " + "\n  ".join(result["failures"]) if result["failures"] else "all checks passed")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the bounded form CI runs")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--messages", type=int)
    ap.add_argument("--clients", type=int)
    ap.add_argument("--kills", type=int)
    ap.add_argument("--edits", type=int)
    args = ap.parse_args()
    cfg = quick(args.seed) if args.quick else Config(seed=args.seed)
    for name in ("messages", "clients", "kills", "edits"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    result = run(cfg)
    print(report(result))
    sys.exit(1 if result["failures"] else 0)


if __name__ == "__main__":
    main()
