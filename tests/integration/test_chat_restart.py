"""Durability: a message acknowledged before a SIGKILL is there after restart."""

from __future__ import annotations

import asyncio
import json
import signal

import pytest
import websockets

from tests.servers import free_port, start_server


async def talk(port: int, n: int) -> list[int]:
    url = "ws://127.0.0.1:%d/ws/chat?name=durable" % port
    async with websockets.connect(url) as ws:
        json.loads(await ws.recv())  # welcome
        await ws.send(json.dumps({"type": "join", "room": "vault"}))
        for i in range(n):
            await ws.send(json.dumps({"type": "say", "room": "vault", "text": "m%d" % i, "cid": "c%d" % i}))
        acked: list[int] = []
        while len(acked) < n:
            msg = json.loads(await asyncio.wait_for(ws.recv(), 5))
            if msg["type"] == "ack":
                acked.append(msg["seq"])
        return acked


async def history(port: int) -> dict:
    url = "ws://127.0.0.1:%d/ws/chat?name=reader" % port
    async with websockets.connect(url) as ws:
        json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "join", "room": "vault"}))
        while True:
            msg = json.loads(await asyncio.wait_for(ws.recv(), 5))
            if msg["type"] == "joined":
                return msg


@pytest.mark.slow
def test_acked_messages_survive_sigkill(tmp_path):
    port = free_port()
    data = str(tmp_path / "data")
    with start_server(port, data, "--rate_limit=0") as proc:
        acked = asyncio.run(talk(port, 40))
        proc.kill()  # the instant the last ack is in: no graceful shutdown, no flush
        assert acked == list(range(1, 41))
        proc.start()
        joined = asyncio.run(history(port))
        assert [m["seq"] for m in joined["messages"]] == list(range(1, 41))
        assert [m["text"] for m in joined["messages"]][-1] == "m39"
        # The epoch is unchanged, so a client can resume across the restart.
        assert joined["seq"] == 40


@pytest.mark.slow
def test_sigterm_closes_with_1001_and_exits_cleanly(tmp_path):
    port = free_port()

    async def wait_close():
        url = "ws://127.0.0.1:%d/ws/chat" % port
        async with websockets.connect(url) as ws:
            await ws.recv()
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(websockets.ConnectionClosed) as e:
                while True:
                    await asyncio.wait_for(ws.recv(), 5)
            return e.value.rcvd.code if e.value.rcvd else None

    with start_server(port, str(tmp_path / "data"), "--rate_limit=0") as proc:
        assert asyncio.run(wait_close()) == 1001
        assert proc.wait(10) == 0
