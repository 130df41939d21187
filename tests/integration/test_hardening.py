"""What an attacker or a careless client can do before and around authentication
(issue 14), on loopback, each bounded in time.  Process-level cases (file
limits, start-up failures, what the real log says) are in test_hardening_process.py."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import socket
import time

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from realtime.redact import RedactingFilter, redact_text
from tests.integration.test_sensors import BASE as SENSOR_BASE
from tests.integration.test_sensors import KEY
from tests.waiting import until

SECRET = "s" * 32


def raw_request(port: int, head: str, body: bytes = b"", timeout: float = 3.0) -> tuple[bytes, float]:
    """Send ``head`` (and ``body``), read until the server closes or ``timeout``;
    returns (what came back, seconds until the connection closed or timed out)."""
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(timeout)
    start = time.monotonic()
    got = b""
    try:
        s.sendall(head.encode("latin1") + body)
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    finally:
        s.close()
    return got, time.monotonic() - start


def status_and_json(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if body else {}


async def in_thread(fn, *args):
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


# -- 1. request bodies -----------------------------------------------------------


@pytest.mark.gen_test(timeout=20)
async def test_a_huge_body_is_refused_by_content_length_before_it_is_read(http_server, http_port, app):
    """Issue: 95 MB bodies to GET-only routes were buffered in full (8 of them: 1.18 GB RSS)."""
    for path in ("/api/rooms", "/chat", "/ws/chat", "/static/js/chat.js", "/nowhere"):
        head = ("POST %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Length: 100000000\r\n\r\n" % (path, http_port))
        # Only the head is sent: an answer can only come if the server did not wait for the body.
        raw, took = await in_thread(raw_request, http_port, head, b"x" * 1000)
        assert raw, "no answer to a 100 MB Content-Length on %s" % path
        status, body = status_and_json(raw)
        assert status == 413 and body["error"] == "too_large", (path, raw[:200])
        assert b"Connection: close" in raw
        assert took < 2.5  # answered, then closed after a short linger
    assert app.ctx.stats.requests_refused[413] == 5


@pytest.mark.gen_test(timeout=20)
@pytest.mark.parametrize("app_options", [{**SENSOR_BASE, "max_body_size": 1000}])
async def test_readings_take_up_to_max_body_size_and_writes_check_the_key_before_the_body(http_server, http_port, app,
                                                                                        app_options):
    path = "/api/sensors/dev.big/readings"
    head = ("POST %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAuthorization: Bearer %s\r\nContent-Length: %%d\r\n\r\n"
            % (path, http_port, KEY))
    raw, _ = await in_thread(raw_request, http_port, head % 1001)
    status, body = status_and_json(raw)
    assert status == 413 and "1000 bytes" in body["message"]
    now = time.time()
    ok = json.dumps([[now - i, 1.5] for i in range(30, 0, -1)]).encode()
    assert 700 < len(ok) <= 1000
    raw, _ = await in_thread(raw_request, http_port, (head % len(ok)).replace("1.1", "1.0", 1), ok)
    assert status_and_json(raw) == (200, {"sensor": "dev.big", "stored": 30})
    # No credential: 401 as soon as the head is in, though the body never comes.
    head = "POST %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Length: 900\r\n\r\n" % (path, http_port)
    raw, took = await in_thread(raw_request, http_port, head)
    status, body = status_and_json(raw)
    assert status == 401 and body["error"] == "unauthorized" and took < 2.5
    # Metadata takes 4 KiB at most; chunked bodies are bounded as they arrive.
    raw, _ = await in_thread(raw_request, http_port,
                             "PUT /api/sensors/dev.big HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAuthorization: Bearer %s\r\n"
                             "Content-Length: 5000\r\n\r\n" % (http_port, KEY))
    assert status_and_json(raw)[0] == 413
    chunk = b"1" * 600
    raw, took = await in_thread(
        raw_request, http_port,
        "POST %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAuthorization: Bearer %s\r\nTransfer-Encoding: chunked\r\n\r\n"
        % (path, http_port, KEY), (b"258\r\n" + chunk + b"\r\n") * 3 + b"0\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 400") and took < 2.5


# -- 2. slow handshakes ------------------------------------------------------------


@pytest.mark.gen_test(timeout=20)
@pytest.mark.parametrize("app_options", [{"handshake_timeout": 0.5}])
async def test_a_dribbled_or_silent_handshake_is_closed_at_the_deadline(http_server, http_port, app_options):
    """Issue: headers dribbled a byte every 10 s held a connection for Tornado's 3600 s default."""

    def dribble():
        s = socket.create_connection(("127.0.0.1", http_port))
        start = time.monotonic()
        head = b"GET /ws/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100
        try:
            for byte in head:
                s.sendall(bytes([byte]))
                time.sleep(0.05)
            return None
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - start
        finally:
            s.close()

    def silent():
        s = socket.create_connection(("127.0.0.1", http_port))
        s.settimeout(5)
        start = time.monotonic()
        try:
            return s.recv(10), time.monotonic() - start
        finally:
            s.close()

    closed_after = await in_thread(dribble)
    assert closed_after is not None and closed_after < 2.0, closed_after
    data, took = await in_thread(silent)
    assert data == b"" and 0.4 < took < 1.5


@pytest.mark.gen_test(timeout=20)
@pytest.mark.parametrize("app_options", [{"handshake_timeout": 1.0, "max_half_open_per_ip": 5}])
async def test_half_open_connections_per_address_are_capped(http_port, http_server, app_options):
    socks = [socket.create_connection(("127.0.0.1", http_port)) for _ in range(8)]
    try:
        await until(lambda: http_server.refused_half_open + http_server.half_open.count("127.0.0.1") == 8)
        assert http_server.refused_half_open == 3
        closed = 0
        for s in socks:
            s.settimeout(0.2)
            try:
                if s.recv(10) == b"":
                    closed += 1
            except TimeoutError:
                pass
        assert closed == 3  # the five first are still waiting for their heads
        assert http_server.half_open.count("127.0.0.1") == 5
    finally:
        for s in socks:
            s.close()
    await until(lambda: http_server.half_open.count("127.0.0.1") == 0)
    # A complete request is not half-open: keep-alive requests and sockets work as usual.
    health = await AsyncHTTPClient().fetch("http://127.0.0.1:%d/healthz" % http_port)
    assert health.code == 200


# -- 3. token mode over HTTP ---------------------------------------------------------


@pytest.mark.gen_test
@pytest.mark.parametrize("app_options", [{**SENSOR_BASE, "auth": "token", "jwt_secret": SECRET}])
async def test_token_mode_every_http_read_needs_a_token(http_server, http_port, app, app_options):
    """Issue: with --auth=token the HTTP reads answered 200 with no token."""
    http = AsyncHTTPClient()
    token = app.ctx.auth.make_token("u-1", "Ann", [])
    paths = ["/api/rooms", "/api/rooms/lobby/messages", "/api/docs", "/api/docs/notes", "/api/sensors",
             "/api/sensors/fast", "/api/sensors/fast/readings", "/edit/"]
    for path in paths:
        url = "http://127.0.0.1:%d%s" % (http_port, path)
        for headers in ({}, {"Authorization": "Bearer not-a-token"}):
            resp = await http.fetch(HTTPRequest(url, headers=headers), raise_error=False)
            assert resp.code == 401, (path, headers, resp.code)
            if path.startswith("/api/"):
                assert json.loads(resp.body)["error"] == "unauthorized"
        resp = await http.fetch(HTTPRequest(url, headers={"Authorization": "Bearer " + token}), raise_error=False)
        assert resp.code in (200, 404), (path, resp.code)  # 404: no such room or document yet
        if path == "/edit/":
            resp = await http.fetch(url + "?token=" + token)
            assert resp.code == 200
    for path in ("/healthz", "/metrics"):  # operations endpoints stay open
        assert (await http.fetch("http://127.0.0.1:%d%s" % (http_port, path))).code == 200


# -- 4. credentials in logs ----------------------------------------------------------


@pytest.mark.gen_test
async def test_no_log_line_shows_a_credential_and_a_nul_in_a_static_path_is_404(http_server, http_port, caplog):
    """Issue: Tornado's own error lines printed ?token= in full; /static/...%00 was a 500 and a traceback."""
    caplog.set_level(logging.INFO)
    http = AsyncHTTPClient()
    url = "http://127.0.0.1:%d/static/js/chat.js%%00.png?token=LEAK1&key=LEAK2&session=LEAK3" % http_port
    resp = await http.fetch(url, raise_error=False)
    assert resp.code == 404
    resp = await http.fetch("http://127.0.0.1:%d/static/js/chat.js" % http_port)
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    await http.fetch("http://127.0.0.1:%d/api/nothing?access_token=LEAK4" % http_port, raise_error=False)
    logging.getLogger("tornado.general").warning("400 GET /x?token=LEAK5 (Authorization: Bearer LEAK6abcdefgh)")
    logged = "\n".join(caplog.text.splitlines() + [r.getMessage() for r in caplog.records])
    assert "chat.js" in logged
    for leak in ("LEAK1", "LEAK2", "LEAK3", "LEAK4", "LEAK5", "LEAK6"):
        assert leak not in logged, leak


def test_the_redacting_filter_cleans_messages_and_tracebacks():
    assert redact_text("GET /a?x=1&token=abc.def&name=n") == "GET /a?x=1&token=***&name=n"
    assert redact_text("uri='/ws?key=K1%2B'") == "uri='/ws?key=***'"
    assert "SECRET" not in redact_text("{'Authorization': 'Bearer SECRET123456'}")
    assert "SECRET" not in redact_text("X-Ingest-Key: SECRET123")
    assert "SECRET" not in redact_text("Cookie: rt_session=SECRET.x")
    assert redact_text("monkey=1&keyboard=2") == "monkey=1&keyboard=2"
    try:
        raise ValueError("bad /api?token=TOPSECRET")
    except ValueError:
        record = logging.LogRecord("tornado.application", logging.ERROR, __file__, 1, "failed %s", ("?key=K",),
                                   exc_info=__import__("sys").exc_info())
    RedactingFilter().filter(record)
    text = logging.Formatter().format(record)
    assert "TOPSECRET" not in text and "key=K" not in text and "ValueError" in text


# -- 7. metrics cardinality ----------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_close_codes_a_client_invents_do_not_add_metric_series(connect, http_port, app):
    """Issue: every distinct close code a client sent became a new series (up to 65,536)."""
    for i in range(30):
        c = await connect("/ws/chat", name="c%d" % i)
        await c.expect("welcome")
        c.conn.close(3000 + i)
        await c.closed()
    await until(lambda: sum(app.ctx.stats.closes.values()) == 30)  # the server has counted every close
    text = (await AsyncHTTPClient().fetch("http://127.0.0.1:%d/metrics" % http_port)).body.decode()
    series = [line for line in text.splitlines() if line.startswith("realtime_closes_total{")]
    assert series == ['realtime_closes_total{code="other"} 30.0']


# -- 8. Host and Origin ----------------------------------------------------------------


def ws_head(port: int, host: str, origin: str | None, path: str = "/ws/chat") -> str:
    key = base64.b64encode(os.urandom(16)).decode()
    head = ("GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n" % (path, host, key))
    if origin:
        head += "Origin: %s\r\n" % origin
    return head + "\r\n"


@pytest.mark.gen_test(timeout=20)
async def test_dns_rebinding_is_refused_and_the_host_never_reaches_the_csp(http_server, http_port):
    """Issue: Host evil.example with Origin http://evil.example was a same-host handshake;
    'Host: a;img-src' landed in the CSP."""
    evil = "evil.example:%d" % http_port
    raw, _ = await in_thread(raw_request, http_port, ws_head(http_port, evil, "http://" + evil))
    status, body = status_and_json(raw)
    assert status == 400 and body["error"] == "bad_host"
    raw, _ = await in_thread(raw_request, http_port,
                             "GET /chat HTTP/1.1\r\nHost: a;img-src *\r\nConnection: close\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 400") and b"Content-Security-Policy" not in raw
    raw, _ = await in_thread(raw_request, http_port,
                             "GET /api/rooms HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n")
    assert status_and_json(raw)[0] == 400
    # Same origin means the scheme too.
    raw, _ = await in_thread(raw_request, http_port,
                             ws_head(http_port, "127.0.0.1:%d" % http_port, "https://127.0.0.1:%d" % http_port))
    assert raw.startswith(b"HTTP/1.1 403")
    for host in ("127.0.0.1:%d" % http_port, "localhost:%d" % http_port):
        raw, _ = await in_thread(raw_request, http_port, ws_head(http_port, host, "http://" + host), b"", 0.5)
        assert raw.startswith(b"HTTP/1.1 101"), raw[:100]
    resp = await AsyncHTTPClient().fetch("http://localhost:%d/chat" % http_port)
    assert "connect-src 'self' ws://localhost:%d wss://localhost:%d;" % (http_port, http_port) in \
        resp.headers["Content-Security-Policy"]


@pytest.mark.gen_test(timeout=20)
@pytest.mark.parametrize("app_options", [{"allowed_hosts": ["chat.example.com, .example.org"]}])
async def test_allowed_hosts_adds_names_and_domains(http_server, http_port, app_options):
    for host, status in (("chat.example.com", 200), ("a.b.example.org", 200), ("example.org", 200),
                         ("example.com", 400), ("127.0.0.1", 200)):
        raw, _ = await in_thread(raw_request, http_port,
                                 "GET /healthz HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % host)
        assert status_and_json(raw)[0] == status, host


# -- 9. smaller ones ---------------------------------------------------------------


@pytest.mark.gen_test(timeout=20)
@pytest.mark.parametrize("app_options", [{"auth": "token", "jwt_secret": SECRET, "max_token_lifetime": 3600}])
async def test_tokens_valid_for_too_long_are_refused(connect, app, app_options):
    """Issue: a token with exp 2^40 was accepted."""
    forever = app.ctx.auth.make_token("u-1", "Ann", [], ttl=2**40 - time.time())
    with pytest.raises(HTTPClientError) as e:
        await connect("/ws/chat", token=forever)
    assert e.value.code == 401
    assert "max_token_lifetime" in json.loads(e.value.response.body)["error"]
    ok = await connect("/ws/chat", token=app.ctx.auth.make_token("u-1", "Ann", [], ttl=3000))
    assert (await ok.expect("welcome"))["user"]["id"] == "u-1"


@pytest.mark.gen_test(timeout=20)
async def test_a_huge_header_gets_431_not_a_dropped_connection(http_server, http_port):
    """Issue: a 100 KB token dropped the TCP connection."""
    for head in ("GET /ws/chat?token=%s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % ("t" * 100_000),
                 "GET /api/rooms HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\n\r\n" % ("t" * 100_000)):
        raw, _ = await in_thread(raw_request, http_port, head)
        status, body = status_and_json(raw)
        assert status == 431 and body["error"] == "too_large"


@pytest.mark.gen_test
async def test_head_on_health_and_metrics(http_server, http_port):
    http = AsyncHTTPClient()
    for path in ("/healthz", "/metrics"):
        resp = await http.fetch(HTTPRequest("http://127.0.0.1:%d%s" % (http_port, path), method="HEAD"))
        assert resp.code == 200 and resp.body == b""


def test_a_short_jwt_secret_is_warned_about(tmp_path, caplog):
    import server

    server.make_app(data_dir=str(tmp_path), auth="token", jwt_secret="sixsix")
    assert any("jwt_secret is 6 bytes" in r.getMessage() for r in caplog.records)
    caplog.clear()
    server.make_app(data_dir=str(tmp_path), auth="token", jwt_secret=SECRET)
    assert not any("jwt_secret" in r.getMessage() for r in caplog.records)


# -- 5. storage errors in sensors ----------------------------------------------------


async def fill_the_disk(app, full: bool) -> None:
    """Simulate a full disk: SQLite refuses to grow the file past its current pages."""
    def pragma(conn):
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute("PRAGMA max_page_count=%d" % (pages if full else 2**30))

    await app.ctx.store.write(pragma)


@pytest.mark.gen_test(timeout=30)
@pytest.mark.expect_error_log  # "sqlite commit failed: database or disk is full", and the 503s
@pytest.mark.parametrize("app_options", [dict(SENSOR_BASE)])
async def test_a_full_disk_makes_sensor_writes_unavailable_and_healthz_degraded(connect, http_port, app,
                                                                            app_options, caplog):
    """Issue: with the data_dir full a device publish got 'internal server error', a 1011 close and a
    traceback; POST/PUT answered 500; /healthz said ok."""
    http = AsyncHTTPClient()
    dev = await connect("/ws/sensors", key=KEY)
    await dev.expect("welcome")
    now = time.time()
    await fill_the_disk(app, True)
    points = [[now - 10 + i * 0.005, float(i)] for i in range(1000)]
    dev.send({"type": "publish", "sensor": "dev.full", "points": points, "ref": 1})
    err = await dev.expect("error", skip=("sensor_added", "readings"))
    assert err["code"] == "unavailable" and err["ref"] == 1
    resp = await http.fetch(HTTPRequest("http://127.0.0.1:%d/api/sensors/dev.full/readings" % http_port,
                                        method="POST", body=json.dumps(points),
                                        headers={"Authorization": "Bearer " + KEY}), raise_error=False)
    assert resp.code == 503 and json.loads(resp.body)["error"] == "unavailable"
    health = await http.fetch("http://127.0.0.1:%d/healthz" % http_port, raise_error=False)
    body = json.loads(health.body)
    assert health.code == 503 and body["status"] == "degraded" and "full" in body["reason"]
    # The device's connection stayed open; once there is room again, all is well.
    await fill_the_disk(app, False)
    dev.send({"type": "publish", "sensor": "dev.full", "points": points, "ref": 2})
    assert (await dev.expect("ack", skip=("sensor_added", "readings")))["stored"] == 1000
    health = await http.fetch("http://127.0.0.1:%d/healthz" % http_port)
    assert json.loads(health.body)["status"] == "ok"
    assert "Traceback" not in caplog.text


# -- 6. durable state anonymous users create -------------------------------------------


async def rooms_listed(port):
    body = (await AsyncHTTPClient().fetch("http://127.0.0.1:%d/api/rooms" % port)).body
    return [r["room"] for r in json.loads(body)["rooms"]]


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("app_options", [{"max_rooms_total": 3, "rate_limit": 0}])
async def test_empty_rooms_are_reclaimed_rooms_are_capped_and_listed_by_activity(connect, http_port, app,
                                                                              app_options):
    """Issue: rooms were created on join and never removed, with no cap (2,000 rooms in 2 s), and
    GET /api/rooms listed the first 1,000 by name."""
    ann = await connect("/ws/chat", name="ann")
    await ann.expect("welcome")
    for room in ("zeta", "alpha"):
        ann.send({"type": "join", "room": room})
        await ann.expect("joined", skip=("presence", "message"))
        ann.send({"type": "say", "room": room, "text": "hi", "cid": room})
        await ann.expect("ack", skip=("presence", "message"))
    ann.send({"type": "join", "room": "empty"})
    await ann.expect("joined", skip=("presence", "message"))
    ann.send({"type": "join", "room": "fourth"})
    err = await ann.expect("error", skip=("presence", "message"))
    assert err["code"] == "too_large" and "at most 3 rooms" in err["message"]
    ann.send({"type": "say", "room": "zeta", "text": "again", "cid": "z2"})
    await ann.expect("ack", skip=("presence", "message"))
    assert await rooms_listed(http_port) == ["zeta", "empty", "alpha"]  # newest activity first
    ann.send({"type": "leave", "room": "empty"})
    await ann.expect("left", skip=("presence", "message"))

    async def empty_is_gone() -> list[str] | None:
        rooms = await rooms_listed(http_port)
        return None if "empty" in rooms else rooms

    assert await until(empty_is_gone) == ["zeta", "alpha"]  # nothing was said in it: gone
    ann.send({"type": "join", "room": "fourth"})  # room for it now
    assert (await ann.expect("joined", skip=("presence", "message")))["room"] == "fourth"
    ann.send({"type": "leave", "room": "alpha"})
    await ann.expect("left", skip=("presence", "message"))
    # A write queued behind anything the leave started: once it is acked, a removal would be done.
    ann.send({"type": "say", "room": "zeta", "text": "sentinel", "cid": "z3"})
    await ann.expect("ack", skip=("presence", "message"))
    assert "alpha" in await rooms_listed(http_port)  # it has history: kept
    assert app.ctx.chat.rooms_reclaimed == 1


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("app_options", [{"max_docs": 2, "doc_idle_seconds": 0.1}])
async def test_documents_never_edited_do_not_fill_max_docs(connect, http_port, app_options):
    """Issue: --max_docs filled with empty documents, then refused every new document forever."""
    http = AsyncHTTPClient()
    for doc in ("a", "b"):
        c = await connect("/ws/edit/" + doc, name="x")
        await c.expect("snapshot", skip=("presence", "welcome", "peers", "joined"))
        c.close()
        await c.closed()

    async def removed(doc: str) -> bool:
        resp = await http.fetch("http://127.0.0.1:%d/api/docs/%s" % (http_port, doc), raise_error=False)
        return resp.code == 404

    # Idle documents leave memory; the empty ones are removed.
    await until(lambda: removed("a"), timeout=5)
    await until(lambda: removed("b"), timeout=5)
    c = await connect("/ws/edit/c", name="x")
    snap = await c.expect("snapshot", skip=("presence", "welcome", "peers", "joined"))
    assert snap["rev"] == 0


# -- 11. creating rooms and documents, per address ---------------------------------------

ROOMS_SKIP = ("presence", "message")


async def join(client, room: str, **fields):
    """``joined`` or the ``error`` a join gets."""
    client.send({"type": "join", "room": room, **fields})
    while True:
        msg = await client.recv()
        assert msg is not None, "closed while joining %s" % room
        if msg["type"] in ("joined", "error"):
            return msg


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("app_options", [{"room_creates_per_minute": 1, "room_create_burst": 5,
                                          "rate_limit": 0, "max_rooms": 100}])
async def test_one_address_creating_rooms_is_refused_after_its_budget_joining_existing_ones_is_not(
        connect, app, app_options):
    """Issue: anonymous clients could create durable rooms as fast as they could send (100
    connections, 2,000 rooms in 2 s); only the server-wide total stopped them, and then
    nobody could create a room."""
    bob = await connect("/ws/chat", name="bob", source_ip="127.0.0.2")
    bob_id = (await bob.expect("welcome"))["user"]["id"]
    assert (await join(bob, "lobby"))["type"] == "joined"  # created, by 127.0.0.2
    # Two connections from one address share its budget: 5 rooms, then refusals.
    ann = await connect("/ws/chat", name="ann")
    ann2 = await connect("/ws/chat", name="ann2")
    ann_id = (await ann.expect("welcome"))["user"]["id"]
    await ann2.expect("welcome")
    got = [await join((ann, ann2)[i % 2], "room-%d" % i) for i in range(12)]
    assert [m["type"] for m in got] == ["joined"] * 5 + ["error"] * 7
    assert {m["code"] for m in got[5:]} == {"rate_limited"}
    assert "creating rooms is limited" in got[5]["message"]
    # A private room and a direct-message room are creations too; a name that is taken is not charged.
    ann.send({"type": "create", "room": "mine", "ref": 1})
    err = await ann.expect("error")
    assert (err["code"], err["ref"]) == ("rate_limited", 1)
    ann.send({"type": "create", "room": "lobby", "ref": 2})
    assert (await ann.expect("error"))["code"] == "conflict"
    assert (await join(ann, "", **{"with": "carol"}))["code"] == "rate_limited"
    # Existing rooms: joining is never refused, from the same connection or another one.
    assert (await join(ann, "lobby"))["type"] == "joined"
    assert (await join(ann2, "room-0"))["type"] == "joined"
    assert (await join(ann2, "lobby"))["type"] == "joined"
    ann.send({"type": "say", "room": "lobby", "text": "still here", "cid": "a1"})
    await ann.expect("ack", skip=ROOMS_SKIP)
    # Another address is not affected: it creates rooms, a direct-message room with ann too.
    assert (await join(bob, "bobs-room"))["type"] == "joined"
    dm = await join(bob, "", **{"with": ann_id})
    assert dm["type"] == "joined"
    # ... which, existing now, ann joins although her address is over its budget.
    assert (await join(ann, "", **{"with": bob_id}))["room"] == dm["room"]
    assert app.ctx.room_creations.refused == 9


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("app_options", [{"rate_limit": 0}])
async def test_the_default_room_budget_stops_a_script_and_not_a_person(connect, app, app_options):
    """100 connections from one address creating 2,000 rooms got them all; with the defaults
    (a burst of 60) 10 connections asking for 200 get 60, and a person elsewhere is unaffected."""
    clients = [await connect("/ws/chat", name="s%d" % i) for i in range(10)]
    for c in clients:
        await c.expect("welcome")
    for i in range(200):
        clients[i % 10].send({"type": "join", "room": "spam-%d" % i})
    outcomes: dict[str, int] = {}
    for c in clients:
        for _ in range(20):
            msg = await c.recv()
            while msg is not None and msg["type"] not in ("joined", "error"):
                msg = await c.recv()
            assert msg is not None
            key = msg["type"] if msg["type"] == "joined" else msg["code"]
            outcomes[key] = outcomes.get(key, 0) + 1
    assert outcomes["joined"] <= 61 and outcomes["joined"] >= 60, outcomes
    assert outcomes["rate_limited"] == 200 - outcomes["joined"], outcomes
    person = await connect("/ws/chat", name="person", source_ip="127.0.0.2")
    await person.expect("welcome")
    for room in ("general", "random", "help"):
        assert (await join(person, room))["type"] == "joined"


@pytest.mark.gen_test(timeout=20)
@pytest.mark.parametrize("app_options", [{"xheaders": True, "room_creates_per_minute": 1, "room_create_burst": 1}])
async def test_behind_a_proxy_with_xheaders_the_forwarded_address_is_charged(connect, app_options):
    a = await connect("/ws/chat", headers={"X-Real-Ip": "203.0.113.7"}, name="a")
    b = await connect("/ws/chat", headers={"X-Real-Ip": "203.0.113.8"}, name="b")
    for c in (a, b):
        await c.expect("welcome")
    assert (await join(a, "a1"))["type"] == "joined"
    assert (await join(a, "a2"))["code"] == "rate_limited"
    assert (await join(b, "b1"))["type"] == "joined"  # the same TCP peer, another client


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("app_options", [{"doc_creates_per_minute": 1, "doc_create_burst": 3,
                                          "doc_idle_seconds": 0.2}])
async def test_one_address_creating_documents_is_refused_after_its_budget_opening_existing_ones_is_not(
        connect, http_port, app, app_options):
    """The same hole for documents: every /ws/edit/<new id> stored one."""
    kept = await connect("/ws/edit/kept", name="ann")
    snap = await kept.expect("snapshot")
    kept.send({"type": "op", "rev": snap["rev"], "seq": 1, "op": ["edited"]})
    await kept.expect("ack", skip=("peer_joined",))
    kept.close()
    await kept.closed()
    open_ones = []
    for doc in ("d1", "d2"):  # the budget is 3: "kept", d1, d2
        c = await connect("/ws/edit/" + doc, name="ann")
        assert (await c.expect("snapshot"))["rev"] == 0
        open_ones.append(c)
    refused = await connect("/ws/edit/d3", name="ann")
    err = await refused.expect("error")
    assert err["code"] == "rate_limited" and "creating documents is limited" in err["message"]
    assert await refused.closed() == 1008  # the editor page waits before it tries again
    # Existing documents still open from this address: one in memory, one only in the store.
    await until(lambda: "kept" not in app.ctx.editing.docs, timeout=5)
    for doc, rev in (("d1", 0), ("kept", 1)):
        c = await connect("/ws/edit/" + doc, name="ann")
        got = await c.expect("snapshot")
        assert (got["rev"], got["text"] if doc == "kept" else "") == (rev, "edited" if doc == "kept" else "")
    # Another address creates documents.
    other = await connect("/ws/edit/elsewhere", name="bob", source_ip="127.0.0.2")
    assert (await other.expect("snapshot"))["rev"] == 0
    assert app.ctx.doc_creations.refused == 1
    text = (await AsyncHTTPClient().fetch("http://127.0.0.1:%d/metrics" % http_port)).body.decode()
    assert 'realtime_creations_refused_total{what="document"} 1.0' in text


# -- 12. plain HTTP on the TLS port --------------------------------------------------------


def ssl_error_record(reason: str) -> logging.LogRecord:
    """The record Tornado's SSLIOStream logs for one failed handshake."""
    import ssl

    err = ssl.SSLError(1, "[SSL: %s] %s (_ssl.c:1000)" % (reason, reason.lower()))
    err.reason = reason  # type: ignore[misc]
    return logging.LogRecord("tornado.general", logging.WARNING, __file__, 1, "SSL Error on %s %s: %s",
                             (12, ("127.0.0.1", 40000), err), None)


def test_failed_tls_handshakes_log_once_per_interval_and_kind_with_a_count():
    from handlers.listener import TLSHandshakeLog

    now = [1000.0]
    f = TLSHandshakeLog(interval=10, clock=lambda: now[0])
    plain = [f.filter(ssl_error_record("HTTP_REQUEST")) for _ in range(50)]
    assert plain == [True] + [False] * 49
    assert f.filter(ssl_error_record("WRONG_VERSION_NUMBER"))  # another kind is not hidden by the flood
    now[0] += 10
    again = ssl_error_record("HTTP_REQUEST")
    assert f.filter(again)
    assert again.getMessage().endswith("(49 more like this since the last report)")
    assert "plain http:// or ws:// client on the TLS port" in again.getMessage()
    assert f.failures == 52
    other = logging.LogRecord("tornado.general", logging.WARNING, __file__, 1, "Got events for closed stream %s",
                              (3,), None)
    assert all(f.filter(other) for _ in range(5))  # anything else passes untouched


@pytest.mark.gen_test(timeout=30)
async def test_plain_http_on_the_tls_port_logs_one_line_not_one_per_attempt(app, tmp_path, caplog, monkeypatch):
    """Issue: every plain-HTTP attempt on the TLS port logged Tornado's 'SSL Error on ...' warning
    (a client retrying in a loop floods the log), unlike accept() EMFILE, logged once per 10 s."""
    import ssl

    from tornado.testing import bind_unused_port

    import handlers.listener as listener
    import server
    from tests.certs import self_signed

    now = [1e6]
    monkeypatch.setattr(listener.TLS_HANDSHAKE_LOG, "clock", lambda: now[0])
    monkeypatch.setattr(listener.TLS_HANDSHAKE_LOG, "kinds", {})
    cert, key = self_signed(tmp_path / "certs")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    sock, port = bind_unused_port()
    srv = server.make_server(app, context)
    srv.add_sockets([sock])

    def ssl_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("SSL Error on")]

    try:
        for _ in range(30):  # each waits until the server has closed it (and logged, or not)
            reply, _took = await in_thread(raw_request, port, "GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert not reply.startswith(b"HTTP/")
        assert len(ssl_lines()) == 1 and "HTTP_REQUEST" in ssl_lines()[0]
        now[0] += listener.LOG_INTERVAL
        await in_thread(raw_request, port, "GET / HTTP/1.1\r\n\r\n")
        assert len(ssl_lines()) == 2 and ssl_lines()[1].endswith("(29 more like this since the last report)")
        client = ssl.create_default_context(cafile=cert)
        reply = await AsyncHTTPClient().fetch("https://localhost:%d/healthz" % port, ssl_options=client)
        assert json.loads(reply.body)["status"] == "ok"  # TLS clients are served meanwhile
    finally:
        srv.stop()
        await srv.close_all_connections()
