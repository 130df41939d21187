"""A real full disk: the server's data_dir on a tiny tmpfs, filled to the last byte.

Writes get ``unavailable`` (chat, sensors) and nothing is acknowledged that is not
stored; an edit that cannot be saved closes the document's editors with 1011 and is
never acknowledged; reads keep working (HTTP history, joining a room and reading its
history, sensor backfill, an editor resuming); /healthz says why it is degraded; once
space returns, the same retries (same cids, the same op resent) are stored once and
everything is as before.

Mounting needs root (the tests run as root here and in CI): elsewhere the test is
skipped, but under CI a mount that fails is a failure, not a skip."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from typing import Any

import pytest
import websockets

from tests.clients import request
from tests.servers import free_port, start_server

pytestmark = pytest.mark.slow
KEY = "disk-full-key-0123456789"


@pytest.fixture
def tiny_disk(tmp_path: Any) -> Any:
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    why = None
    if os.geteuid() != 0:
        why = "mounting a tmpfs needs root"
    elif shutil.which("mount") is None:
        why = "no mount command"
    else:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m,mode=0755", "tmpfs", str(mnt)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            why = "cannot mount a tmpfs here: " + done.stderr.strip()
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail("the disk-full test must run in CI: " + why)
        pytest.skip(why)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(path: Any) -> int:
    """Write a file until the disk refuses; how many bytes it took."""
    n = 0
    chunk = b"\0" * 4096
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                n += f.write(chunk)
            except OSError:
                break
        for size in (512, 64, 1):  # the last few bytes too
            while True:
                try:
                    n += f.write(b"\0" * size)
                except OSError:
                    break
    return n


def get(port: int, path: str) -> tuple[int, Any]:
    reply = request(port, path)
    return reply.status, reply.body


class Chat:
    def __init__(self, ws: Any, session: str) -> None:
        self.ws = ws
        self.session = session  # the guest's identity, for its editor
        self.acked: dict[str, int] = {}
        self.refused: set[str] = set()

    async def say(self, cid: str, text: str) -> str:
        """``ack`` or the error code."""
        await self.ws.send(json.dumps({"type": "say", "room": "vault", "text": text, "cid": cid, "ref": cid}))
        while True:
            m = json.loads(await asyncio.wait_for(self.ws.recv(), 10))
            if m["type"] == "ack" and m.get("cid") == cid:
                self.acked[cid] = m["seq"]
                return "ack"
            if m["type"] == "error" and m.get("ref") == cid:
                self.refused.add(cid)
                return m["code"]


async def open_chat(port: int, name: str, room: str = "vault") -> tuple[Chat, dict[str, Any]]:
    ws = await websockets.connect("ws://127.0.0.1:%d/ws/chat?name=%s" % (port, name))
    welcome = json.loads(await ws.recv())
    await ws.send(json.dumps({"type": "join", "room": room}))
    while True:
        m = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if m["type"] in ("joined", "error"):
            return Chat(ws, welcome["session"]), m


class Editor:
    """An editor of document "ledger" under a guest session; ``seen``: what it was sent since its last op."""

    def __init__(self, ws: Any, first: dict[str, Any]) -> None:
        self.ws = ws
        self.first = first
        self.seen: list[dict[str, Any]] = []

    @classmethod
    async def open(cls, port: int, session: str, **resume: Any) -> "Editor":
        query = "".join("&%s=%s" % kv for kv in resume.items())
        ws = await websockets.connect("ws://127.0.0.1:%d/ws/edit/ledger?session=%s%s" % (port, session, query))
        while True:
            m = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if m["type"] in ("snapshot", "ops"):
                return cls(ws, m)

    async def op(self, rev: int, op: list[Any], seq: int) -> dict[str, Any] | int:
        """Send an op: its ``ack`` or ``error``, or the close code if the socket closes first."""
        self.seen = []
        await self.ws.send(json.dumps({"type": "op", "rev": rev, "op": op, "seq": seq}))
        try:
            while True:
                m = json.loads(await asyncio.wait_for(self.ws.recv(), 10))
                self.seen.append(m)
                if m["type"] in ("ack", "error") and m.get("seq") == seq:
                    return m
        except websockets.exceptions.ConnectionClosed as exc:
            assert exc.rcvd is not None, "closed without a close frame"
            return exc.rcvd.code


def test_a_full_disk_refuses_writes_keeps_reads_and_recovers(tiny_disk: Any, tmp_path: Any) -> None:
    port = free_port()
    log_path = tmp_path / "server.log"
    proc = start_server(port, tiny_disk / "data", "--ingest_key=" + KEY, "--simulated_sensors=",
                        "--host_metrics=False", "--rate_limit=0", "--max_text=4000", log_path=log_path)
    filler = tiny_disk / "filler"

    async def main() -> None:
        ann, joined = await open_chat(port, "ann")
        assert joined["type"] == "joined"
        dev = await websockets.connect("ws://127.0.0.1:%d/ws/sensors?key=%s" % (port, KEY))
        json.loads(await dev.recv())
        t0 = time.time()

        async def publish(points: list[list[float]], ref: int) -> dict[str, Any]:
            await dev.send(json.dumps({"type": "publish", "sensor": "disk.temp", "points": points, "ref": ref}))
            while True:
                m = json.loads(await asyncio.wait_for(dev.recv(), 10))
                if m["type"] in ("ack", "error") and m.get("ref") == ref:
                    return m

        assert (await publish([[t0 - 5, 1.0], [t0 - 4, 2.0]], 1))["type"] == "ack"
        editor = await Editor.open(port, ann.session)
        assert editor.first["rev"] == 0 and await editor.op(0, ["base"], 1) == {"type": "ack", "rev": 1, "seq": 1}
        # A room with history and, by the time the disk is full, nobody in it.
        old, _ = await open_chat(port, "old", "archive")
        await old.ws.send(json.dumps({"type": "say", "room": "archive", "text": "kept", "cid": "k1"}))
        while json.loads(await old.ws.recv())["type"] != "ack":
            pass
        await old.ws.close()
        for i in range(5):
            assert await ann.say("before-%d" % i, "stored before the disk filled") == "ack"
        took = fill(filler)
        assert took > 0 and shutil.disk_usage(tiny_disk).free < 8192
        # Keep writing until the database has no room left (it may first fill pages it already has).
        outcome = "ack"
        i = 0
        while outcome == "ack":
            i += 1
            assert i < 3000, "the disk never refused a write"
            outcome = await ann.say("full-%d" % i, "x" * 3000)
        assert outcome == "unavailable"
        for j in range(3):  # it goes on refusing, and the connection stays open
            assert await ann.say("more-%d" % j, "still full?") == "unavailable"
        reading = await publish([[t0 - 3, 3.0]], 2)
        assert (reading["type"], reading.get("code")) == ("error", "unavailable")
        # An edit that cannot be saved is never acknowledged nor shown to anyone: the document's
        # peers are closed with 1011 (docs/PROTOCOL.md, "Close codes for editors") and resume.
        assert await editor.op(1, [4, " lost?"], 2) == 1011
        assert not [m for m in editor.seen if m["type"] in ("ack", "op")]
        editor = await Editor.open(port, ann.session, rev=1, client=editor.first["client"])
        assert (editor.first["type"], editor.first["rev"], editor.first["ops"]) == ("ops", 1, [])
        status, health = get(port, "/healthz")
        assert status == 503 and health["status"] == "degraded" and "full" in health["reason"]
        # Reads keep working: HTTP history, a new member joining with history, sensor backfill.
        status, hist = get(port, "/api/rooms/vault/messages?since=0&limit=1000")
        assert status == 200
        stored = {m["cid"] for m in hist["messages"]}
        assert stored == set(ann.acked), "acknowledged and stored differ: %s" % (stored ^ set(ann.acked))
        assert not stored & ann.refused
        bob, bob_joined = await open_chat(port, "bob")
        assert bob_joined["type"] == "joined", bob_joined
        assert [m["cid"] for m in bob_joined["messages"]][-1] == max(ann.acked, key=lambda cid: ann.acked[cid])
        carl, carl_joined = await open_chat(port, "carl", "archive")
        assert carl_joined["type"] == "joined", carl_joined
        assert [m["text"] for m in carl_joined["messages"]] == ["kept"]
        await carl.ws.close()
        status, readings = get(port, "/api/sensors/disk.temp/readings")
        assert status == 200 and [p[1] for p in readings["points"]] == [1.0, 2.0]
        # Space returns: the same retries are stored, once.
        filler.unlink()
        refused = sorted(ann.refused)
        ann.refused = set()
        for cid in refused:
            assert await ann.say(cid, "x" * 3000 if cid.startswith("full") else "still full?") == "ack"
        assert (await publish([[t0 - 3, 3.0]], 3))["type"] == "ack"
        assert await ann.say("after", "room again") == "ack"
        resent = await editor.op(1, [4, " lost?"], 2)  # the resend, as OTClient.resend() makes it
        assert resent == {"type": "ack", "rev": 2, "seq": 2}, resent
        status, doc = get(port, "/api/docs/ledger")
        assert (status, doc["text"], doc["rev"]) == (200, "base lost?", 2)
        status, health = get(port, "/healthz")
        assert status == 200 and health["status"] == "ok"
        status, hist = get(port, "/api/rooms/vault/messages?since=0&limit=1000")
        cids = [m["cid"] for m in hist["messages"]]
        assert len(cids) == len(set(cids)) == len(ann.acked)
        assert [m["seq"] for m in hist["messages"]] == list(range(1, len(cids) + 1))
        for c in (ann.ws, bob.ws, dev, editor.ws):
            await c.close()

    try:
        asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        proc.stop()
    text = log_path.read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]
    assert "full" in text  # the store's error was logged, in a line
