"""Server-level behaviour: slow consumers, HTTP API, health, metrics, auth, logs."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import socket

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from realtime.redact import redact_uri as redact
from tests.integration.test_chat import joined, user
from tests.waiting import until


def raw_ws(port: int, path: str, rcvbuf: int = 4096) -> socket.socket:
    """A WebSocket client that completes the handshake, then reads nothing."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (path, port, key)).encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return s


def masked_text_frame(text: str) -> bytes:
    data = text.encode()
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    assert len(data) < 126
    return bytes([0x81, 0x80 | len(data)]) + mask + body


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("app_options", [{"max_write_buffer": 64 * 1024, "rate_limit": 0,
                                          "sqlite_synchronous": "NORMAL"}])
async def test_a_client_that_stops_reading_is_closed_1013_and_others_keep_up(connect, http_port, app,
                                                                            app_options):
    fast = await user(connect, "fast")
    talker = await user(connect, "talker")
    loop = asyncio.get_running_loop()
    # Blocking socket calls run in a thread: the server shares this loop.
    stalled = await loop.run_in_executor(None, raw_ws, http_port, "/ws/chat?name=stalled")
    stalled.sendall(masked_text_frame('{"type":"join","room":"lobby"}'))
    await until(lambda: app.ctx.chat.presence.count("lobby") == 3)  # the stalled reader has joined
    assert len(app.ctx.connections) == 3
    async def drain(client):  # the talker hears its own messages; keep reading them
        while await client.recv(30) is not None:
            pass

    draining = asyncio.ensure_future(drain(talker))
    text = "y" * 1900
    total = 0
    received = 0
    # Send until the server gives up on the stalled reader (bounded in count).
    stalled_conn = next(c for c in app.ctx.connections if c.user.name == "stalled")
    while not stalled_conn._closing and total < 6000:
        for _ in range(50):
            total += 1
            talker.send({"type": "say", "room": "lobby", "text": text, "cid": str(total)})
        while received < total - 100:
            await fast.expect("message", skip=("presence",))
            received += 1
        for conn in app.ctx.connections:
            assert conn.buffered_bytes() <= 64 * 1024 + 4096  # bounded by the cap plus one message
    assert stalled_conn._closing, "the stalled client was never closed"
    assert total < 3000  # it took a bounded backlog, not the whole stream
    while received < total:
        m = await fast.expect("message", skip=("presence",))
        received += 1
    assert m["seq"] == total  # the fast reader got everything
    await until(lambda: len(app.ctx.connections) == 2, timeout=4)  # the server drops the stalled TCP promptly
    assert app.ctx.stats.errors.get("slow_consumer") == 1
    stalled.close()
    draining.cancel()


@pytest.mark.gen_test
async def test_history_over_http(connect, http_port):
    ann = await user(connect, "ann")
    for i in range(5):
        ann.send({"type": "say", "room": "lobby", "text": "m%d" % i, "cid": str(i)})
        await ann.expect("ack", skip=("presence", "message"))
    http = AsyncHTTPClient()
    base = "http://127.0.0.1:%d/api/rooms/lobby/messages" % http_port
    body = json.loads((await http.fetch(base + "?limit=2")).body)
    assert [m["seq"] for m in body["messages"]] == [4, 5] and body["seq"] == 5
    body = json.loads((await http.fetch(base + "?since=1&limit=2")).body)
    assert [m["seq"] for m in body["messages"]] == [2, 3] and body["complete"]
    assert body["messages"][0]["text"] == "m1"
    for query, status in [("?since=x", 400), ("?limit=0", 400), ("?limit=100000", 400)]:
        with pytest.raises(HTTPClientError) as e:
            await http.fetch(base + query)
        assert e.value.code == status
        assert json.loads(e.value.response.body)["error"] == "bad_message"
    with pytest.raises(HTTPClientError) as e:
        await http.fetch("http://127.0.0.1:%d/api/rooms/nowhere/messages" % http_port)
    assert e.value.code == 404 and json.loads(e.value.response.body)["error"] == "not_found"
    rooms = json.loads((await http.fetch("http://127.0.0.1:%d/api/rooms" % http_port)).body)
    assert {"room": "lobby", "seq": 5, "members": 1} in rooms["rooms"]


@pytest.mark.gen_test
async def test_healthz_and_metrics(connect, http_port):
    ann = await user(connect, "ann")
    ann.send("{oops")
    await ann.expect("error")
    http = AsyncHTTPClient()
    health = json.loads((await http.fetch("http://127.0.0.1:%d/healthz" % http_port)).body)
    assert health["status"] == "ok" and health["connections"] == 1 and health["uptime"] >= 0
    text = (await http.fetch("http://127.0.0.1:%d/metrics" % http_port)).body.decode()
    assert "realtime_connections 1.0" in text
    assert 'realtime_errors_total{code="bad_json"} 1.0' in text


@pytest.mark.gen_test
async def test_pages_carry_csp_and_a_session_cookie(http_server, http_port):
    resp = await AsyncHTTPClient().fetch("http://127.0.0.1:%d/chat" % http_port)
    assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert "rt_session=" in resp.headers["Set-Cookie"] and "HttpOnly" in resp.headers["Set-Cookie"]
    with pytest.raises(HTTPClientError) as e:
        await AsyncHTTPClient().fetch("http://127.0.0.1:%d/api/nothing" % http_port)
    assert e.value.code == 404


@pytest.mark.gen_test
@pytest.mark.parametrize("app_options", [{"auth": "token", "jwt_secret": "s" * 32}])
async def test_token_mode_refuses_handshakes_without_a_valid_token(connect, app, app_options):
    for params in ({}, {"token": "nonsense"}):
        with pytest.raises(HTTPClientError) as e:
            await connect("/ws/chat", **params)
        assert e.value.code == 401
    token = app.ctx.auth.make_token("u-42", "Zed", ["chat"])
    z = await connect("/ws/chat", token=token)
    assert (await z.expect("welcome"))["user"] == {"id": "u-42", "name": "Zed"}
    bearer = await connect("/ws/chat", headers={"Authorization": "Bearer " + token})
    assert (await bearer.expect("welcome"))["user"]["id"] == "u-42"


@pytest.mark.gen_test
async def test_access_log_never_shows_tokens(connect, caplog):
    caplog.set_level(logging.INFO, logger="tornado.access")
    c = await connect("/ws/chat", token="SECRET-TOKEN-123", session="SESSION-456", name="ann")
    await c.expect("welcome")
    c.close()
    await c.closed()
    # The access log line is written once the server has closed its side.
    await until(lambda: any("/ws/chat" in r.getMessage() for r in caplog.records))
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "SECRET-TOKEN-123" not in logged and "SESSION-456" not in logged


def test_redact():
    assert redact("/ws?token=abc&name=x") == "/ws?token=***&name=x"
    assert redact("/plain") == "/plain"


@pytest.mark.gen_test
async def test_ping_settings_come_from_options(app):
    assert app.settings["websocket_max_message_size"] == 64 * 1024
    assert app.settings["websocket_ping_interval"] is None  # the tests turn pings off


@pytest.mark.gen_test
async def test_rejoin_after_leave_resumes(connect):
    ann = await user(connect, "ann")
    ann.send({"type": "say", "room": "lobby", "text": "a", "cid": "a"})
    await ann.expect("ack", skip=("presence", "message"))
    ann.send({"type": "leave", "room": "lobby"})
    await ann.expect("left", skip=("presence", "message"))
    r = await joined(ann, since=1, epoch=ann.joined["epoch"])
    assert r["recovered"] and r["messages"] == []


@pytest.mark.gen_test
@pytest.mark.parametrize("app_options", [{"fast_path": True}, {"fast_path": False}])
async def test_external_client_reads_the_same_messages_either_path(http_server, http_port, app_options):
    """A `websockets` client (not Tornado) reads fast-path frames exactly as
    write_message frames: same messages, same order (byte identity: tests/unit/test_fast_path.py)."""
    import websockets

    url = "ws://127.0.0.1:%d/ws/chat?name=ext" % http_port
    async with websockets.connect(url) as ws:
        json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "join", "room": "lobby"}))
        texts = ["plain", "ünïcødé 😀", "x" * 5000, "<b>&amp;</b>", "y" * 70000]
        got = []
        for i, text in enumerate(texts):
            if len(text) > 2000:
                text = text[:2000]
            await ws.send(json.dumps({"type": "say", "room": "lobby", "text": text, "cid": str(i)}))
        while len(got) < len(texts):
            msg = json.loads(await asyncio.wait_for(ws.recv(), 3))
            if msg["type"] == "message":
                got.append(msg["text"])
        assert got == [t[:2000] for t in texts]
