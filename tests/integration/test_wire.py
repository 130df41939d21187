"""The wire on real sockets: /ws/echo, protocol faults and their close codes,
permessage-deflate compressed once per message, the msgpack subprotocol."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
import zlib

import msgpack
import pytest
import websockets
from websockets.typing import Subprotocol

from realtime import protocol as protocol_module
from realtime.wire import Deflater
from tests.unit.test_wire import client_frame
from tests.waiting import until

# Echo runs through the rate limit; these tests send bursts on purpose.
FAST = {"rate_limit": 0}


def ws_url(port: int, path: str) -> str:
    return "ws://127.0.0.1:%d%s" % (port, path)


async def raw_open(port: int, path: str, headers: str = "") -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n%s\r\n" % (path, port, key, headers)).encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer, head


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    b0, b1 = await asyncio.wait_for(reader.readexactly(2), 3)
    assert not b1 & 0x80, "server frames are never masked"
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", await reader.readexactly(2))
    elif n == 127:
        (n,) = struct.unpack("!Q", await reader.readexactly(8))
    return b0, await reader.readexactly(n)


async def close_code_then_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    """Read up to the server's close frame, answer it, and expect the server to
    drop the TCP connection (it closes first, RFC 6455 7.1.1)."""
    while True:
        b0, payload = await read_frame(reader)
        if b0 & 0x0F == 0x8:
            break
    writer.write(client_frame(payload[:2], 0x8))
    assert await asyncio.wait_for(reader.read(), 3) == b""
    writer.close()
    return struct.unpack("!H", payload[:2])[0]


# -- /ws/echo ----------------------------------------------------------------------------


@pytest.mark.gen_test
@pytest.mark.parametrize("app_options", [FAST, {**FAST, "websocket_compression": True}])
async def test_echo_sends_back_every_text_and_binary_message(http_server, http_port, app_options):
    compression = "deflate" if app_options.get("websocket_compression") else None
    async with websockets.connect(ws_url(http_port, "/ws/echo"), compression=compression) as ws:
        extensions = ws.response.headers.get("Sec-WebSocket-Extensions") or ""
        assert ("server_no_context_takeover" in extensions) == bool(compression)
        sent = ["", "plain", "ünïcødé 😀" * 500, b"\x00\xff" * 3000, b"", "not json {"]
        for m in sent:
            await ws.send(m)
        await ws.send(["frag", "mented ", "€"])  # one message in three frames
        got = [await asyncio.wait_for(ws.recv(), 3) for _ in range(len(sent) + 1)]
        assert got == sent + ["fragmented €"]


@pytest.mark.gen_test
@pytest.mark.parametrize("app_options", [{"rate_limit": 5.0, "rate_burst": 2.0}])
async def test_echo_obeys_the_rate_limit_and_the_size_limit(http_server, http_port, app, app_options):
    async with websockets.connect(ws_url(http_port, "/ws/echo")) as ws:
        for i in range(3):
            await ws.send("m%d" % i)
        got = [await asyncio.wait_for(ws.recv(), 3) for _ in range(3)]
        assert got[:2] == ["m0", "m1"]
        assert json.loads(got[2])["code"] == "rate_limited"
    async with websockets.connect(ws_url(http_port, "/ws/echo"), max_size=None) as ws:
        await ws.send(b"x" * (app.ctx.cfg.max_message_size + 1))
        with pytest.raises(websockets.ConnectionClosed) as e:
            await asyncio.wait_for(ws.recv(), 3)
        assert e.value.rcvd.code == 1009


async def handshake_status(url: str, **kw) -> int:
    """The HTTP status a refused WebSocket handshake got (101 never: that fails the test)."""
    with pytest.raises(websockets.InvalidStatus) as e:
        async with websockets.connect(url, **kw):
            pass
    return e.value.response.status_code


async def echoes(url: str, message: str | bytes = "hi", **kw) -> bool:
    async with websockets.connect(url, **kw) as ws:
        await ws.send(message)
        return await asyncio.wait_for(ws.recv(), 3) == message


@pytest.mark.gen_test
@pytest.mark.parametrize("app_options", [{}, {"allowed_origins": ["https://app.example"]}])
async def test_echo_checks_the_origin_like_every_endpoint(http_server, http_port, app_options):
    url = ws_url(http_port, "/ws/echo")
    assert await handshake_status(url, origin="http://evil.example") == 403
    if app_options:
        assert await echoes(url, origin="https://app.example")
        assert await handshake_status(url, origin="https://app.example.evil") == 403
        assert await handshake_status(url, origin="http://127.0.0.1:%d" % http_port) == 403
    else:
        assert await echoes(url, origin="http://127.0.0.1:%d" % http_port)  # same origin
    assert await echoes(url)  # no Origin (not a browser): let through to authentication


@pytest.mark.gen_test
@pytest.mark.parametrize("app_options", [{"auth": "token", "jwt_secret": "e" * 40}])
async def test_echo_needs_a_token_in_token_mode(http_server, http_port, app, app_options):
    url = ws_url(http_port, "/ws/echo")
    assert await handshake_status(url) == 401
    assert await handshake_status(url + "?token=not.a.token") == 401
    expired = app.ctx.auth.make_token("ann", "Ann", [], ttl=-60)
    assert await handshake_status(url + "?token=" + expired) == 401
    good = app.ctx.auth.make_token("ann", "Ann", [])
    assert await echoes(url + "?token=" + good, b"\x00bin")
    assert await echoes(url, "text", additional_headers={"Authorization": "Bearer " + good})


@pytest.mark.gen_test
@pytest.mark.parametrize("app_options", [{"max_connections_per_ip": 1}])
async def test_echo_counts_connections_per_address(http_server, http_port, app_options):
    url = ws_url(http_port, "/ws/echo")
    async with websockets.connect(url) as first:
        assert await handshake_status(url) == 429
        await first.send("still open")
        assert await asyncio.wait_for(first.recv(), 3) == "still open"


@pytest.mark.gen_test
@pytest.mark.parametrize("app_options", [{"rate_limit": 5.0, "rate_burst": 3.0},
                                         {"rate_limit": 5.0, "rate_burst": 3.0, "websocket_compression": True},
                                         {"rate_limit": 5.0, "rate_burst": 3.0, "fast_path": False}])
async def test_echo_over_msgpack(http_server, http_port, app, app_options):
    """Echo interprets nothing, on a msgpack connection too: what comes back is what was
    sent; only its own rate_limited error is MessagePack there."""
    compression = "deflate" if app_options.get("websocket_compression") else None
    c = await Packed.connect(http_port, "/ws/echo", compression=compression)
    sent = msgpack.packb({"type": "anything", "x": [1, 2.5, "é"]})
    await c.ws.send(sent)
    assert await asyncio.wait_for(c.ws.recv(), 3) == sent
    await c.ws.send(b"\xc1 not msgpack")  # not decoded, so not refused either
    assert await asyncio.wait_for(c.ws.recv(), 3) == b"\xc1 not msgpack"
    await c.ws.send("text")  # the apps close 1003 for this; echo sends it back
    assert await asyncio.wait_for(c.ws.recv(), 3) == "text"
    await c.ws.send(b"one too many")
    err = await c.recv()  # a binary frame holding one MessagePack map
    assert (err["type"], err["code"]) == ("error", "rate_limited")
    (conn,) = app.ctx.connections
    assert conn.rt.fmt.binary
    await c.ws.close()


@pytest.mark.gen_test
@pytest.mark.parametrize("app_options", [FAST, {**FAST, "websocket_compression": True}])
async def test_echo_writes_through_the_fast_path(http_server, http_port, app, app_options, monkeypatch):
    """Echo's replies are frames our own writer sends (handlers/writer.py), queued and
    flushed like every app's messages, and compressed when deflate was negotiated."""
    from handlers.writer import StreamWriter

    batches: list[list[bytes]] = []
    real = StreamWriter.write_batch
    monkeypatch.setattr(StreamWriter, "write_batch", lambda self, q: batches.append(list(q)) or real(self, q))
    compression = "deflate" if app_options.get("websocket_compression") else None
    async with websockets.connect(ws_url(http_port, "/ws/echo"), compression=compression) as ws:
        (conn,) = app.ctx.connections
        assert isinstance(conn.rt.writer, StreamWriter)
        await ws.send("x" * 200)
        assert await asyncio.wait_for(ws.recv(), 3) == "x" * 200
    (frames,) = [b for b in batches if b]
    (data,) = frames
    assert bool(data[0] & 0x40) == bool(compression)  # RSV1: a compressed message
    assert len(data) < 50 if compression else len(data) == 2 + 2 + 200


# -- protocol faults: a close frame with the RFC's code, then the server drops TCP ---------


@pytest.mark.gen_test
@pytest.mark.parametrize("path", ["/ws/echo", "/ws/chat"])
async def test_an_unmasked_client_frame_fails_the_connection_with_1002(http_server, http_port, path):
    reader, writer, _ = await raw_open(http_port, path)
    writer.write(client_frame(b'{"type":"ping"}', masked=False))
    assert await close_code_then_eof(reader, writer) == 1002


@pytest.mark.gen_test
@pytest.mark.parametrize("code", [0, 999, 1005, 1006, 2999, 65535])
async def test_an_invalid_close_code_is_answered_with_1002_not_echoed(http_server, http_port, app, code):
    reader, writer, _ = await raw_open(http_port, "/ws/echo")
    writer.write(client_frame(struct.pack("!H", code), 0x8))
    b0, payload = await read_frame(reader)
    assert b0 & 0x0F == 0x8 and struct.unpack("!H", payload[:2])[0] == 1002
    assert await asyncio.wait_for(reader.read(), 3) == b""
    writer.close()
    await until(lambda: app.ctx.stats.closes)  # the server has counted the close
    assert code not in app.ctx.stats.closes and "other" not in app.ctx.stats.closes
    assert app.ctx.stats.closes.get(1002) == 1


@pytest.mark.gen_test
async def test_a_valid_close_code_is_echoed(http_server, http_port):
    reader, writer, _ = await raw_open(http_port, "/ws/echo")
    writer.write(client_frame(struct.pack("!H", 4321) + b"done", 0x8))
    b0, payload = await read_frame(reader)
    assert payload[:2] == struct.pack("!H", 4321)
    assert await asyncio.wait_for(reader.read(), 3) == b""
    writer.close()


@pytest.mark.gen_test
@pytest.mark.parametrize("path", ["/ws/echo", "/ws/chat"])
async def test_invalid_utf8_closes_1007_instead_of_dropping_tcp(http_server, http_port, path):
    reader, writer, _ = await raw_open(http_port, path)
    writer.write(client_frame(b'{"type":"ping","x":"\xc3\x28"}'))
    assert await close_code_then_eof(reader, writer) == 1007


@pytest.mark.gen_test
async def test_messages_before_a_fault_are_answered_before_the_close(http_server, http_port):
    reader, writer, _ = await raw_open(http_port, "/ws/echo")
    writer.write(client_frame(b"first") + client_frame(b"bad", opcode=3))
    b0, payload = await read_frame(reader)
    assert (b0 & 0x0F, payload) == (0x1, b"first")
    assert await close_code_then_eof(reader, writer) == 1002


@pytest.mark.gen_test
async def test_a_client_that_never_answers_our_close_is_dropped(http_server, http_port, app):
    import handlers.websocket as wsmod

    reader, writer, _ = await raw_open(http_port, "/ws/echo")
    old, wsmod.CLOSE_TIMEOUT = wsmod.CLOSE_TIMEOUT, 0.2
    try:
        writer.write(client_frame(b"x", masked=False))
        b0, payload = await read_frame(reader)
        assert payload[:2] == struct.pack("!H", 1002)
        assert await asyncio.wait_for(reader.read(), 3) == b""  # no answer from us: dropped after the timeout
    finally:
        wsmod.CLOSE_TIMEOUT = old
        writer.close()


@pytest.mark.gen_test(timeout=15)
@pytest.mark.parametrize("app_options", [{}, {"fast_path": False}])
@pytest.mark.parametrize("client", ["drops TCP after our close", "never answers our close"])
async def test_a_close_the_server_starts_is_counted_by_the_code_it_sent(http_server, http_port, app, client,
                                                                       app_options):
    """Issue: realtime_closes_total counted every close the server started as 1006 unless
    the client echoed the code back, and a client that goes away may never do that."""
    import handlers.websocket as wsmod

    reader, writer, _ = await raw_open(http_port, "/ws/chat?name=x")
    old, wsmod.CLOSE_TIMEOUT = wsmod.CLOSE_TIMEOUT, 0.2
    try:
        writer.write(client_frame(b"\x00", 0x2))  # binary on a JSON socket: we close with 1003
        while True:
            b0, payload = await read_frame(reader)
            if b0 & 0x0F == 0x8:
                break
        assert payload[:2] == struct.pack("!H", 1003)
        if client == "drops TCP after our close":
            writer.transport.abort()
        await until(lambda: app.ctx.stats.closes, timeout=7)  # Tornado's own protocol waits 5 s
    finally:
        wsmod.CLOSE_TIMEOUT = old
        writer.close()
    assert app.ctx.stats.closes == {1003: 1}


# -- permessage-deflate, once per message -----------------------------------------------


@pytest.mark.gen_test(timeout=20)
@pytest.mark.parametrize("app_options", [{"websocket_compression": True}])
async def test_a_chat_message_is_compressed_once_for_every_compressed_member(http_server, http_port, app,
                                                                             app_options, monkeypatch):
    compressed: list[bytes] = []
    real = Deflater.compress

    def counting(self, data):
        compressed.append(data)
        return real(self, data)

    monkeypatch.setattr(Deflater, "compress", counting)
    members = []
    for i in range(4):
        ws = await websockets.connect(ws_url(http_port, "/ws/chat?name=z%d" % i), compression="deflate")
        assert "server_no_context_takeover" in ws.response.headers["Sec-WebSocket-Extensions"]
        json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "join", "room": "lobby"}))
        members.append(ws)
    plain = await websockets.connect(ws_url(http_port, "/ws/chat?name=plain"), compression=None)
    json.loads(await plain.recv())
    await plain.send(json.dumps({"type": "join", "room": "lobby"}))
    text = "compress me once " * 40
    for ws in members + [plain]:  # every member has joined before anyone speaks
        while json.loads(await asyncio.wait_for(ws.recv(), 3))["type"] != "joined":
            pass
    await members[0].send(json.dumps({"type": "say", "room": "lobby", "text": text, "cid": "c1"}))
    for ws in members + [plain]:
        while True:
            msg = json.loads(await asyncio.wait_for(ws.recv(), 3))
            if msg["type"] == "message":
                assert msg["text"] == text
                break
    assert sum(1 for data in compressed if text.encode() in data) == 1
    # No zlib state per connection: the compressed members share the application's one compressor.
    deflaters = {id(c.rt.fmt.deflater) for c in app.ctx.connections if c.rt.fmt.deflater is not None}
    assert len(deflaters) == 1 and sum(1 for c in app.ctx.connections if c.rt.fmt.deflater) == 4
    zlib_types = (type(zlib.compressobj()), type(zlib.decompressobj()))
    for c in app.ctx.connections:  # and none for reading: each client message is inflated on its own
        reader = c.ws_connection.reader
        assert not any(isinstance(getattr(reader, a, None), zlib_types) for a in reader.__slots__)
    for ws in members + [plain]:
        await ws.close()


# -- the msgpack subprotocol ------------------------------------------------------------------


class Packed:
    """A test client speaking the msgpack subprotocol."""

    def __init__(self, ws) -> None:
        self.ws = ws

    @classmethod
    async def connect(cls, port: int, path: str, **kw) -> "Packed":
        ws = await websockets.connect(ws_url(port, path), subprotocols=[Subprotocol("msgpack")], **kw)
        assert ws.subprotocol == "msgpack"
        return cls(ws)

    async def send(self, obj) -> None:
        await self.ws.send(msgpack.packb(obj))

    async def recv(self):
        raw = await asyncio.wait_for(self.ws.recv(), 3)
        assert isinstance(raw, bytes), "a msgpack connection gets binary frames"
        return msgpack.unpackb(raw)

    async def expect(self, mtype: str, skip=("presence", "typing")):
        while True:
            msg = await self.recv()
            if msg["type"] == mtype:
                return msg
            assert msg["type"] in skip, msg


@pytest.mark.gen_test(timeout=20)
@pytest.mark.parametrize("app_options", [{}, {"websocket_compression": True}, {"fast_path": False}])
async def test_chat_over_msgpack_gets_the_same_messages_encoded_once(http_server, http_port, app_options,
                                                                     monkeypatch):
    packs: list = []
    real = protocol_module.msgpack.packb
    monkeypatch.setattr(protocol_module.msgpack, "packb", lambda obj, **kw: packs.append(obj) or real(obj, **kw))
    compression = "deflate" if app_options.get("websocket_compression") else None
    ann = await Packed.connect(http_port, "/ws/chat?name=ann", compression=compression)
    bob = await Packed.connect(http_port, "/ws/chat?name=bob", compression=compression)
    cat = await websockets.connect(ws_url(http_port, "/ws/chat?name=cat"))  # JSON, same room
    assert (await ann.recv())["type"] == "welcome"
    await bob.recv()
    json.loads(await cat.recv())
    for c in (ann, bob):
        await c.send({"type": "join", "room": "lobby", "ref": 1})
        assert (await c.expect("joined"))["ref"] == 1
    await cat.send(json.dumps({"type": "join", "room": "lobby"}))
    await ann.send({"type": "say", "room": "lobby", "text": "hé 😀", "cid": "a1"})
    assert (await ann.expect("ack", skip=("presence", "message")))["cid"] == "a1"
    got = (await bob.expect("message"))
    assert got["text"] == "hé 😀" and got["name"] == "ann"
    while True:
        msg = json.loads(await asyncio.wait_for(cat.recv(), 3))
        if msg["type"] == "message":
            assert msg["text"] == "hé 😀"
            break
    assert sum(1 for o in packs if o.get("type") == "message") == 1  # once, for both msgpack members
    # Same validation and errors, in MessagePack.
    await ann.send({"type": "say", "room": "nowhere", "text": "x", "ref": 9})
    err = await ann.expect("error", skip=("presence", "message"))
    assert (err["code"], err["ref"]) == ("not_found", 9)
    await ann.ws.send(b"\xc1 not msgpack")
    err = await ann.expect("error", skip=("presence", "message"))
    assert err["code"] == "bad_msgpack"
    await ann.send({"type": "say", "room": "lobby", "text": b"bytes"})
    assert (await ann.expect("error", skip=("presence", "message")))["code"] == "bad_message"
    await ann.send([1, 2])
    assert (await ann.expect("error", skip=("presence", "message")))["code"] == "bad_message"
    # A text frame on a msgpack connection, like binary on a JSON one, closes 1003.
    await bob.ws.send('{"type":"ping"}')
    with pytest.raises(websockets.ConnectionClosed) as e:
        while True:
            await asyncio.wait_for(bob.ws.recv(), 3)
    assert e.value.rcvd.code == 1003
    for ws in (ann.ws, cat):
        await ws.close()


@pytest.mark.gen_test(timeout=20)
async def test_sensors_over_msgpack_publish_and_view(http_server, http_port, app):
    key = app.ctx.sensors.cfg.ingest_key
    device = await Packed.connect(http_port, "/ws/sensors?key=" + key)
    viewer = await Packed.connect(http_port, "/ws/sensors")
    assert (await device.recv())["type"] == "welcome"
    await viewer.recv()
    clock = app.ctx.sensors.clock
    await device.send({"type": "publish", "sensor": "dev.t", "points": [[clock(), 20.0]], "ref": 3})
    ack = await device.expect("ack", skip=("sensors", "readings", "sensor_added"))
    assert (ack["stored"], ack["ref"]) == (1, 3)
    await device.send({"type": "publish", "sensor": "dev.t", "points": [[0, float("nan")]]})
    assert (await device.expect("error", skip=("sensors", "readings", "sensor_added")))["code"] == "bad_message"
    await viewer.send({"type": "subscribe", "sensors": ["dev.t"], "ref": "s"})
    await viewer.expect("subscribed", skip=("backfill", "readings", "sensors", "sensor_added"))
    await device.send({"type": "publish", "sensor": "dev.t", "value": 21.5})
    await device.expect("ack", skip=("sensors", "readings", "sensor_added"))
    while True:
        msg = await viewer.expect("readings", skip=("backfill", "sensors", "subscribed", "sensor_added"))
        points = msg["points"].get("dev.t")
        if points and points[-1][1] == 21.5:
            break
    await device.ws.close()
    await viewer.ws.close()


@pytest.mark.gen_test(timeout=20)
async def test_the_editor_over_msgpack(http_server, http_port):
    ed = await Packed.connect(http_port, "/ws/edit/doc-pack")
    snap = await ed.expect("snapshot", skip=("welcome", "presence", "peers", "joined"))
    await ed.send({"type": "op", "rev": snap["rev"], "seq": 1, "op": ["hi ☺"]})
    ack = await ed.expect("ack", skip=("presence", "peers", "cursor"))
    assert ack["rev"] == snap["rev"] + 1
    await ed.send({"type": "op", "rev": 999, "seq": 2, "op": ["x"]})
    assert (await ed.expect("error", skip=("presence", "peers", "cursor")))["seq"] == 2
    await ed.ws.close()


# -- keepalive and TLS on our protocol ------------------------------------------------------------


@pytest.mark.gen_test(timeout=10)
@pytest.mark.parametrize("app_options", [{"ping_interval": 0.2, "ping_timeout": 0.2}])
async def test_pings_keep_answering_clients_and_drop_silent_ones(http_server, http_port, app_options):
    lively = await websockets.connect(ws_url(http_port, "/ws/echo"))  # answers pings itself
    reader, writer, _ = await raw_open(http_port, "/ws/echo")  # never answers
    b0, payload = await read_frame(reader)
    assert b0 & 0x0F == 0x9  # a ping
    b0, payload = await asyncio.wait_for(read_frame(reader), 2)
    assert b0 & 0x0F == 0x8 and b"ping timed out" in payload
    writer.close()
    # Three more ping periods, counted on a third connection that answers each ping.
    clock, clock_writer, _ = await raw_open(http_port, "/ws/echo")
    for _ in range(3):
        b0, payload = await asyncio.wait_for(read_frame(clock), 2)
        assert b0 & 0x0F == 0x9
        clock_writer.write(client_frame(payload, 0xA))
    clock_writer.close()
    await lively.send("still here")
    assert await asyncio.wait_for(lively.recv(), 3) == "still here"
    await lively.close()


@pytest.fixture
def tls_context(tmp_path):
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make a test certificate (scripts/test.sh installs it)")
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True, timeout=60)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context()
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    return server_ctx, client_ctx


@pytest.mark.gen_test(timeout=20)
@pytest.mark.parametrize("app_options", [FAST])
async def test_our_frames_over_tls(app, tls_context, app_options):
    from tornado.httpserver import HTTPServer
    from tornado.testing import bind_unused_port

    server_ctx, client_ctx = tls_context
    sock, port = bind_unused_port()
    server = HTTPServer(app, ssl_options=server_ctx)
    server.add_sockets([sock])
    try:
        async with websockets.connect("wss://127.0.0.1:%d/ws/echo" % port, ssl=client_ctx, max_size=None) as ws:
            big = "é" * 30000  # bigger than one TLS record and than a socket buffer's worth at once
            for i in range(10):  # 600 KB queued for a client that reads only afterwards: under the cap
                await ws.send(big + str(i))
            for i in range(10):
                assert await asyncio.wait_for(ws.recv(), 5) == big + str(i)
        async with websockets.connect("wss://127.0.0.1:%d/ws/chat?name=tls" % port, ssl=client_ctx) as ws:
            assert json.loads(await asyncio.wait_for(ws.recv(), 3))["type"] == "welcome"
    finally:
        server.stop()
        await server.close_all_connections()


@pytest.mark.gen_test
@pytest.mark.parametrize("app_options", [{}, {"websocket_compression": True}])
async def test_write_message_still_works_on_our_protocol(http_server, http_port, app, app_options):
    """Tornado's own API on a handler, for code that calls it directly."""
    compression = "deflate" if app_options.get("websocket_compression") else None
    async with websockets.connect(ws_url(http_port, "/ws/echo"), compression=compression) as ws:
        await ws.send("hi")
        assert await asyncio.wait_for(ws.recv(), 3) == "hi"
        (conn,) = app.ctx.connections
        conn.write_message({"type": "note", "text": "ü" * 300})
        conn.write_message(b"\x00\x01", binary=True)
        assert json.loads(await asyncio.wait_for(ws.recv(), 3)) == {"type": "note", "text": "ü" * 300}
        assert await asyncio.wait_for(ws.recv(), 3) == b"\x00\x01"
