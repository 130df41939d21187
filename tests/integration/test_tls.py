"""wss:// end to end: server.py with --certfile/--keyfile (a certificate made for the test),
chat, sensors and editing over TLS with the `websockets` client verifying that certificate,
and what a plain ws:// client gets on the TLS port."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.request
from typing import Any

import pytest
import websockets

from realtime import ot
from tests.certs import https_ready, self_signed, trusting
from tests.servers import ServerProcess, free_port

pytestmark = pytest.mark.slow
KEY = "tls-ingest-key-0123456789"


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: Any) -> Any:
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = self_signed(tmp / "certs")
    port = free_port()
    proc = ServerProcess(port, tmp / "data", "--certfile=" + cert, "--keyfile=" + key, "--ingest_key=" + KEY,
                         "--simulated_sensors=", "--host_metrics=False", "--handshake_timeout=2",
                         log_path=tmp / "server.log")
    proc.start(ready=lambda: https_ready(port))
    yield port, cert, tmp / "server.log"
    proc.stop()


async def recv(ws: Any, mtype: str, timeout: float = 5.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            msg = json.loads(await ws.recv())
            if msg["type"] == mtype:
                return msg


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_chat_over_wss_and_history_over_https(tls_server: Any) -> None:
    port, cert, _ = tls_server
    ctx = trusting(cert)

    async def main() -> None:
        url = "wss://localhost:%d/ws/chat" % port
        async with websockets.connect(url + "?name=ann", ssl=ctx) as ann, \
                websockets.connect(url + "?name=bob", ssl=ctx) as bob:
            for ws in (ann, bob):
                await recv(ws, "welcome")
                await ws.send(json.dumps({"type": "join", "room": "secure"}))
                await recv(ws, "joined")
            await ann.send(json.dumps({"type": "say", "room": "secure", "text": "over tls", "cid": "t1"}))
            assert (await recv(ann, "ack"))["seq"] == 1
            assert (await recv(bob, "message"))["text"] == "over tls"
        with urllib.request.urlopen("https://localhost:%d/api/rooms/secure/messages" % port, context=ctx,
                                    timeout=5) as r:
            assert [m["text"] for m in json.loads(r.read())["messages"]] == ["over tls"]

    run(main())


def test_sensors_over_wss(tls_server: Any) -> None:
    port, cert, _ = tls_server
    ctx = trusting(cert)

    async def main() -> None:
        base = "wss://localhost:%d/ws/sensors" % port
        async with websockets.connect(base + "?key=" + KEY, ssl=ctx) as dev, websockets.connect(base, ssl=ctx) as view:
            assert (await recv(dev, "welcome"))["can_publish"] is True
            await recv(view, "welcome")
            now = time.time()
            await dev.send(json.dumps({"type": "publish", "sensor": "tls.temp", "points": [[now, 21.5]], "ref": 1}))
            assert (await recv(dev, "ack"))["stored"] == 1
            await view.send(json.dumps({"type": "subscribe", "sensors": ["tls.temp"], "backfill": 60}))
            await recv(view, "subscribed")
            assert (await recv(view, "backfill"))["points"] == [[now, 21.5]]
            await dev.send(json.dumps({"type": "publish", "sensor": "tls.temp", "points": [[now + 0.5, 22.0]]}))
            live = await recv(view, "readings")
            assert live["points"]["tls.temp"] == [[now + 0.5, 22.0]]

    run(main())


def test_editing_over_wss(tls_server: Any) -> None:
    port, cert, _ = tls_server
    ctx = trusting(cert)

    async def main() -> None:
        url = "wss://localhost:%d/ws/edit/tlsdoc" % port
        async with websockets.connect(url, ssl=ctx) as a, websockets.connect(url, ssl=ctx) as b:
            snap = await recv(a, "snapshot")
            await recv(b, "snapshot")
            op = ["secure 😀"]
            await a.send(json.dumps({"type": "op", "rev": snap["rev"], "op": op, "seq": 1}))
            assert (await recv(a, "ack"))["rev"] == snap["rev"] + 1
            got = await recv(b, "op")
            assert got["op"] == op
        with urllib.request.urlopen("https://localhost:%d/api/docs/tlsdoc" % port, context=ctx, timeout=5) as r:
            assert json.loads(r.read())["text"] == ot.apply(snap["text"], op)

    run(main())


def test_plain_ws_to_the_tls_port_fails_cleanly_and_the_server_carries_on(tls_server: Any) -> None:
    port, cert, log_path = tls_server

    async def main() -> float:
        start = time.monotonic()
        with pytest.raises((websockets.exceptions.InvalidMessage, websockets.exceptions.InvalidHandshake,
                            ConnectionError, EOFError, OSError)):
            async with websockets.connect("ws://localhost:%d/ws/chat" % port, open_timeout=10):
                pass
        return time.monotonic() - start

    took = run(main())
    assert took < 3.0, "a plain client waited %.1f s for its refusal" % took
    # Plain HTTP gets no HTTP answer either: the connection is closed at once, nothing leaks in clear.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        start = time.monotonic()
        try:
            reply = s.recv(4096)
        except ConnectionResetError:
            reply = b""
        assert not reply.startswith(b"HTTP/") and time.monotonic() - start < 3.0, reply[:100]
    with urllib.request.urlopen("https://localhost:%d/healthz" % port, context=trusting(cert), timeout=5) as r:
        assert json.loads(r.read())["status"] == "ok"
    text = log_path.read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]
