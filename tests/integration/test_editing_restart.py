"""Durability of documents: every acknowledged edit survives a SIGKILL, and
clients resume across the restart (catch-up by rev, dedupe by client id + seq)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import websockets

from realtime import ot
from realtime.ot import OTClient
from tests.clients import request
from tests.servers import free_port, start_server

EDITOR_ARGS = ("--rate_limit=0", "--edit_rate=0", "--snapshot_every=7", "--doc_log_keep=10")




def get_doc(port: int, doc: str) -> dict[str, Any]:
    reply = request(port, "/api/docs/" + doc)
    assert reply.status == 200, reply
    return reply.body


async def recv(ws: Any) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), 5))


async def first(ws: Any) -> dict[str, Any]:
    while True:
        msg = await recv(ws)
        if msg["type"] in ("snapshot", "ops"):
            return msg


async def session(port: int) -> str:
    async with websockets.connect("ws://127.0.0.1:%d/ws/chat?name=durable" % port) as ws:
        return (await recv(ws))["session"]


async def edit(port: int, sess: str, n: int) -> tuple[list[str], str, OTClient]:
    """Make ``n`` edits, one at a time, each acknowledged; return the text after each."""
    url = "ws://127.0.0.1:%d/ws/edit/vault?session=%s" % (port, sess)
    texts = []
    async with websockets.connect(url) as ws:
        snap = await first(ws)
        text = snap["text"]
        client = OTClient(snap["rev"], snap["client"])
        for i in range(n):
            op = [len(text), "%d😀 " % i] if text else ["%d😀 " % i]
            text = ot.apply(text, op)
            client.apply_client(op)
            p = client.pending()
            assert p is not None
            await ws.send(json.dumps({"type": "op", "rev": p.rev, "op": p.op, "seq": p.seq}))
            while True:
                msg = await recv(ws)
                if msg["type"] == "ack":
                    client.server_ack(msg["seq"])
                    break
            texts.append(text)
    return texts, snap["client"], client


@pytest.mark.slow
def test_acked_edits_survive_sigkill_and_clients_resume(tmp_path):
    port = free_port()
    data = str(tmp_path / "data")
    with start_server(port, data, *EDITOR_ARGS) as proc:
        sess = asyncio.run(session(port))
        texts, client_id, client = asyncio.run(edit(port, sess, 40))
        proc.kill()  # the instant the last ack is in: no graceful shutdown, no snapshot on exit
        proc.start()
        doc = get_doc(port, "vault")
        assert (doc["rev"], doc["text"]) == (40, texts[-1])

        async def resume() -> None:
            base = "ws://127.0.0.1:%d/ws/edit/vault?session=%s" % (port, sess)
            # A client that was at rev 33 gets exactly the 7 ops it missed.
            async with websockets.connect(base + "&rev=33") as ws:
                msg = await first(ws)
                assert msg["type"] == "ops" and [e["rev"] for e in msg["ops"]] == list(range(34, 41))
                text = texts[32]
                for e in msg["ops"]:
                    text = ot.apply(text, e["op"])
                assert text == texts[-1]
            # One from before the kept log gets the whole text.
            async with websockets.connect(base + "&rev=5") as ws:
                msg = await first(ws)
                assert msg["type"] == "snapshot" and (msg["rev"], msg["text"]) == (40, texts[-1])
            # The writer resends its last op (it never saw the ack, say): not applied twice.
            async with websockets.connect(base + "&rev=39&client=" + client_id) as ws:
                msg = await first(ws)
                assert msg["client"] == client_id and msg["ops"][0]["seq"] == 40
                await ws.send(json.dumps({"type": "op", "rev": 39, "op": [len(texts[38]), "39😀 "], "seq": 40}))
                while True:
                    ack = await recv(ws)
                    if ack["type"] == "ack":
                        break
                assert ack == {"type": "ack", "rev": 40, "seq": 40, "duplicate": True}
                # ... and it goes on editing.
                await ws.send(json.dumps({"type": "op", "rev": 40, "op": [len(texts[-1]), "more"], "seq": 41}))
                while True:
                    ack = await recv(ws)
                    if ack["type"] == "ack":
                        break
                assert ack == {"type": "ack", "rev": 41, "seq": 41}

        asyncio.run(resume())
        assert get_doc(port, "vault")["text"] == texts[-1] + "more"
