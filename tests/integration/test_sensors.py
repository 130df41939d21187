"""Sensor streaming over real sockets and HTTP: the documented protocol, end to end."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import time

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

from tests.clients import Reply, fetch
from tests.integration.test_server import masked_text_frame, raw_ws
from tests.waiting import until

KEY = "test-ingest-key"
SPEC = """\
id=fast label="Fast sine" unit=V hz=50 model=sine amplitude=1 period=2
id=mid label=Sawtooth unit=mm hz=10 model=sawtooth amplitude=5 period=3
id=slow label=Slow unit=°C hz=1 model=walk start=20 step=0.1 lo=0 hi=40
"""
BASE = {"ingest_key": KEY, "sensor_window": 60.0, "host_metrics": False, "simulated_sensors": SPEC,
        "rate_limit": 0}


@pytest.fixture
def app_options():
    return dict(BASE)


async def viewer(connect, **params):
    c = await connect("/ws/sensors", **params)
    c.welcome = await c.expect("welcome")
    return c


async def subscribe(c, sensors, **extra):
    c.send({"type": "subscribe", "sensors": sensors, **extra})
    return await c.expect("subscribed", skip=("readings",))


async def readings(c, n, timeout=3.0):
    """The next ``n`` readings messages, skipping nothing else."""
    return [await c.expect("readings", timeout=timeout) for _ in range(n)]


def url(port, path):
    return "http://127.0.0.1:%d%s" % (port, path)


async def http(port, method, path, body=None, key=KEY, headers=None) -> Reply:
    """``tests.clients.fetch`` with ``key`` as the Bearer token (none when None)."""
    hdrs = dict(headers or {})
    if key is not None:
        hdrs["Authorization"] = "Bearer " + key
    return await fetch(port, path, method, body, hdrs)


def stored_rows(app, sensor):
    path = os.path.join(app.ctx.cfg.data_dir, "realtime.sqlite3")
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT t, v FROM readings WHERE sensor=? ORDER BY t", (sensor,)).fetchall()
    finally:
        conn.close()


# -- viewers ---------------------------------------------------------------------


@pytest.mark.gen_test
async def test_welcome_lists_every_sensor_with_label_unit_and_rate(connect):
    c = await viewer(connect)
    w = c.welcome
    assert [s["id"] for s in w["sensors"]] == ["fast", "mid", "slow"]
    assert w["sensors"][0] == {"id": "fast", "label": "Fast sine", "unit": "V", "rate_hz": 50.0,
                               "kind": "simulated"}
    assert w["sensors"][2]["unit"] == "°C"
    assert w["can_publish"] is False
    assert w["limits"]["max_hz"] == 20.0 and w["limits"]["window"] == 60.0
    assert abs(w["server_time"] - time.time()) < 2


@pytest.mark.gen_test(timeout=10)
@pytest.mark.parametrize("app_options", [{**BASE, "host_metrics": True, "host_metrics_hz": 5.0}])
async def test_host_metrics_are_real_sensors_with_values(connect, app_options):
    c = await viewer(connect)
    ids = {s["id"] for s in c.welcome["sensors"] if s["kind"] == "host"}
    assert {"host.cpu", "host.mem", "host.load1", "host.net_rx", "host.net_tx"} <= ids
    await subscribe(c, ["host.cpu", "host.mem"], max_hz=10)
    got = {}
    for _ in range(20):
        m = await c.expect("readings")
        got.update(m["points"])
        if {"host.cpu", "host.mem"} <= set(got):
            break
    assert 0.0 <= got["host.cpu"][-1][1] <= 100.0
    assert 0.0 < got["host.mem"][-1][1] <= 100.0


@pytest.mark.gen_test
async def test_subscribe_backfills_then_streams_batches_without_gap_or_double(connect):
    c = await viewer(connect)
    reply = await subscribe(c, ["fast", "slow"], max_hz=10, backfill=2, ref=7)
    assert reply == {"type": "subscribed", "sensors": ["fast", "slow"], "max_hz": 10.0, "ref": 7}
    backfills = {}
    for _ in range(2):
        b = await c.expect("backfill")
        backfills[b["sensor"]] = b["points"]
    now = time.time()
    fast = backfills["fast"]
    assert 95 <= len(fast) <= 101  # 2 s at 50 Hz
    assert all(now - 2.2 <= t <= now + 0.01 for t, _ in fast)
    assert 1 <= len(backfills["slow"]) <= 3
    batches = await readings(c, 5)
    for m in batches:
        assert set(m["points"]) <= {"fast", "slow"}
        assert abs(m["ts"] - time.time()) < 1.0
    ts = [p[0] for p in fast]
    ts += [p[0] for m in batches for p in m["points"].get("fast", [])]
    steps = [round(b - a, 6) for a, b in zip(ts, ts[1:])]
    assert set(steps) == {0.02}, "backfill and live points join exactly: no gap, no double"


@pytest.mark.gen_test
async def test_wildcard_then_unsubscribe(connect):
    other = await viewer(connect)
    await subscribe(other, ["fast"], max_hz=20)
    c = await viewer(connect)
    reply = await subscribe(c, ["*"], max_hz=20)
    assert reply["sensors"] == ["*"]
    seen = set()
    for m in await readings(c, 12):
        seen |= set(m["points"])
    assert {"fast", "mid"} <= seen
    c.send({"type": "unsubscribe", "sensors": ["fast"], "ref": "u1"})
    u = await c.expect("unsubscribed", skip=("readings",))
    assert u == {"type": "unsubscribed", "sensors": ["mid", "slow"], "ref": "u1"}
    for m in await readings(c, 5):
        assert "fast" not in m["points"]
    c.send({"type": "unsubscribe", "sensors": ["*"]})
    assert (await c.expect("unsubscribed", skip=("readings",)))["sensors"] == []
    # Three more ticks reach a viewer at the same rate; none reached this one.
    await other.round_trip()
    await readings(other, 3)
    await c.nothing_before_pong("readings")


@pytest.mark.gen_test(timeout=15)
@pytest.mark.parametrize("hz", [2.0, 5.0])
async def test_rate_cap_is_respected_and_every_point_still_arrives(connect, hz):
    c = await viewer(connect)
    await subscribe(c, ["fast", "mid"], max_hz=hz)
    first = await c.expect("readings")
    start = time.monotonic()
    msgs = []
    while time.monotonic() - start < 1.5:
        try:
            msgs.append(await c.expect("readings", timeout=1.6 - (time.monotonic() - start)))
        except asyncio.TimeoutError:
            break
    elapsed = time.monotonic() - start
    assert len(msgs) <= elapsed * hz + 2
    assert len(msgs) >= elapsed * hz - 2
    gaps = [b["ts"] - a["ts"] for a, b in zip([first] + msgs, msgs)]
    assert min(gaps) >= 0.4 / hz  # RateGate: never closer than (0.5 - slack) of an interval
    # 50 Hz / hz points per message is under conflate_points: nothing thinned.
    ts = [p[0] for m in [first] + msgs for p in m["points"].get("fast", [])]
    assert {round(b - a, 6) for a, b in zip(ts, ts[1:])} == {0.02}
    assert all("conflated" not in m for m in msgs)


@pytest.mark.gen_test
async def test_rate_outside_the_range_is_clamped(connect):
    c = await viewer(connect)
    assert (await subscribe(c, ["mid"], max_hz=1000))["max_hz"] == 20.0
    assert (await subscribe(c, [], max_hz=0.001))["max_hz"] == 0.1


@pytest.mark.gen_test
async def test_unknown_sensor_is_not_found_and_changes_nothing(connect):
    c = await viewer(connect)
    await subscribe(c, ["mid"], max_hz=10)
    c.send({"type": "subscribe", "sensors": ["slow", "nope", "nada"], "ref": 3})
    err = await c.expect("error", skip=("readings",))
    assert err["code"] == "not_found" and "nope" in err["message"] and err["ref"] == 3
    for m in await readings(c, 3):
        assert set(m["points"]) == {"mid"}


@pytest.mark.gen_test
@pytest.mark.parametrize("msg, code", [
    ({"type": "subscribe"}, "bad_message"),
    ({"type": "subscribe", "sensors": "fast"}, "bad_message"),
    ({"type": "subscribe", "sensors": [1]}, "bad_message"),
    ({"type": "subscribe", "sensors": ["bad id!"]}, "bad_message"),
    ({"type": "subscribe", "sensors": ["fast"], "max_hz": "10"}, "bad_message"),
    ({"type": "subscribe", "sensors": ["fast"], "max_hz": 0}, "bad_message"),
    ({"type": "subscribe", "sensors": ["fast"], "max_hz": -5}, "bad_message"),
    ({"type": "subscribe", "sensors": ["fast"], "backfill": -1}, "bad_message"),
    ({"type": "subscribe", "sensors": ["fast"], "backfill": "all"}, "bad_message"),
    ({"type": "subscribe", "sensors": ["s%d" % i for i in range(101)]}, "too_large"),
    ({"type": "unsubscribe", "sensors": None}, "bad_message"),
    ({"type": "subscribed"}, "unknown_type"),
])
async def test_bad_subscriptions_are_refused_with_a_reason(connect, msg, code):
    c = await viewer(connect)
    c.send(msg)
    err = await c.expect("error")
    assert err["code"] == code and err["message"]
    c.send({"type": "ping", "ref": "p"})
    assert (await c.expect("pong"))["ref"] == "p"  # still open


@pytest.mark.gen_test
@pytest.mark.parametrize("app_options", [{**BASE, "max_subscriptions": 2}])
async def test_max_subscriptions_per_connection(connect, app_options):
    c = await viewer(connect)
    await subscribe(c, ["fast", "mid"])
    c.send({"type": "subscribe", "sensors": ["slow"]})
    assert (await c.expect("error", skip=("readings",)))["code"] == "too_large"
    assert (await subscribe(c, ["*"]))["sensors"] == ["*"]  # "*" is always allowed


# -- publishing over the socket ----------------------------------------------------


@pytest.mark.gen_test
async def test_publish_without_credential_is_forbidden_and_the_socket_stays_open(connect, http_port):
    c = await viewer(connect)
    c.send({"type": "publish", "sensor": "dev.x", "points": [[time.time(), 1.0]], "ref": 1})
    err = await c.expect("error")
    assert err["code"] == "forbidden" and err["ref"] == 1 and "key" in err["message"]
    c.send({"type": "ping"})
    await c.expect("pong")
    code, _, _ = await http(http_port, "GET", "/api/sensors/dev.x", key=None)
    assert code == 404


@pytest.mark.gen_test
async def test_a_wrong_key_is_refused_at_the_handshake(http_server, http_port):
    for params in ("?key=wrong", ""):
        headers = {} if params else {"X-Ingest-Key": "wrong"}
        req = HTTPRequest("ws://127.0.0.1:%d/ws/sensors%s" % (http_port, params), headers=headers)
        with pytest.raises(HTTPClientError) as e:
            await websocket_connect(req)
        assert e.value.code == 403


@pytest.mark.gen_test
async def test_publish_is_acked_after_commit_and_reaches_viewers(connect, app, http_port):
    watcher = await viewer(connect)
    await subscribe(watcher, ["*"], max_hz=20)
    dev = await viewer(connect, key=KEY)
    assert dev.welcome["can_publish"] is True
    now = time.time()
    pts = [[now - 0.2, 1.5], [now - 0.1, 2.5], [now, 3.5]]
    dev.send({"type": "publish", "sensor": "dev.t", "points": pts, "ref": "p1"})
    ack = await dev.expect("ack", skip=("sensor_added",))
    assert ack == {"type": "ack", "sensor": "dev.t", "stored": 3, "ref": "p1"}
    # Acked means committed: another connection to the file sees the rows.
    assert stored_rows(app, "dev.t") == [tuple(p) for p in pts]
    added = await watcher.expect("sensor_added", skip=("readings",))
    assert added["sensor"] == {"id": "dev.t", "label": "dev.t", "unit": "", "rate_hz": 1.0, "kind": "device"}
    got = []
    while len(got) < 3:
        m = await watcher.expect("readings")
        got += m["points"].get("dev.t", [])
    assert got == pts
    # A single value, timestamped by the server.
    dev.send({"type": "publish", "sensor": "dev.t", "value": 4.5})
    assert (await dev.expect("ack"))["stored"] == 1
    code, body, _ = await http(http_port, "GET", "/api/sensors/dev.t/readings", key=None)
    assert code == 200 and [p[1] for p in body["points"]] == [1.5, 2.5, 3.5, 4.5]


@pytest.mark.gen_test
async def test_the_ingest_key_never_reaches_the_access_log(connect, http_server, http_port, caplog):
    caplog.set_level(logging.INFO, logger="tornado.access")
    dev = await viewer(connect, key=KEY)
    assert dev.welcome["can_publish"] is True
    code, _, _ = await http(http_port, "POST", "/api/sensors/dev.log/readings?key=" + KEY, "1", key=None)
    assert code == 200
    dev.close()
    await dev.closed()
    # The access log line is written once the server has closed its side.
    await until(lambda: any("/ws/sensors" in r.getMessage() for r in caplog.records))
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "/ws/sensors" in logged and "/api/sensors/dev.log/readings" in logged
    assert KEY not in logged


@pytest.mark.gen_test
async def test_bearer_header_authorizes_a_publisher_socket(http_server, http_port):
    req = HTTPRequest("ws://127.0.0.1:%d/ws/sensors" % http_port, headers={"Authorization": "Bearer " + KEY})
    conn = await websocket_connect(req)
    welcome = json.loads(await conn.read_message())
    assert welcome["can_publish"] is True
    conn.close()


@pytest.mark.gen_test
@pytest.mark.parametrize("app_options", [{**BASE, "auth": "token", "jwt_secret": "s" * 32}])
async def test_token_mode_a_publish_role_may_publish(connect, app, app_options, http_port):
    publisher = app.ctx.auth.make_token("dev-1", "Device", ["publish"])
    watcher = app.ctx.auth.make_token("u-1", "Ann", ["chat"])
    dev = await viewer(connect, token=publisher)
    assert dev.welcome["can_publish"] is True
    dev.send({"type": "publish", "sensor": "dev.tok", "value": 1.0})
    assert (await dev.expect("ack", skip=("sensor_added",)))["stored"] == 1
    ann = await viewer(connect, token=watcher)
    assert ann.welcome["can_publish"] is False
    ann.send({"type": "publish", "sensor": "dev.tok", "value": 2.0})
    assert (await ann.expect("error"))["code"] == "forbidden"
    # Over HTTP: the token as the bearer, or the ingest key still.
    code, _, _ = await http(http_port, "POST", "/api/sensors/dev.tok/readings", "3", key=publisher)
    assert code == 200
    code, body, _ = await http(http_port, "POST", "/api/sensors/dev.tok/readings", "4", key=watcher)
    assert code == 403 and "publish" in body["message"]
    code, _, _ = await http(http_port, "POST", "/api/sensors/dev.tok/readings", "5", key="not.a.token")
    assert code == 401
    code, _, _ = await http(http_port, "POST", "/api/sensors/dev.tok/readings", "6", key=KEY)
    assert code == 200
    # Reads need a token, as the socket does (any role).
    code, body, _ = await http(http_port, "GET", "/api/sensors/dev.tok/readings", key=None)
    assert code == 401 and body["error"] == "unauthorized"
    code, body, _ = await http(http_port, "GET", "/api/sensors/dev.tok/readings", key=watcher)
    assert [p[1] for p in body["points"]] == [1.0, 3.0, 6.0]


def _bad_publishes():
    return [
        ('{"type":"publish","sensor":"dev.bad","points":[[NOW, NaN]]}', "bad_message"),
        ('{"type":"publish","sensor":"dev.bad","points":[[NOW, Infinity]]}', "bad_message"),
        ('{"type":"publish","sensor":"dev.bad","points":[[NOW, 1e999]]}', "bad_message"),
        ('{"type":"publish","sensor":"dev.bad","points":[[NOW, "21.5"]]}', "bad_message"),
        ('{"type":"publish","sensor":"dev.bad","points":[["NOW", 1]]}', "bad_message"),
        ('{"type":"publish","sensor":"dev.bad","points":[[NOW, true]]}', "bad_message"),
        ('{"type":"publish","sensor":"dev.bad","points":[[NOW, null]]}', "bad_message"),
        ('{"type":"publish","sensor":"dev.bad","points":[[NOW]]}', "bad_message"),
        ('{"type":"publish","sensor":"dev.bad","points":[[NOW, 1], [NOW, "x"]]}', "bad_message"),
        ('{"type":"publish","sensor":"dev.bad","points":[[FUTURE, 1]]}', "bad_message"),
        ('{"type":"publish","sensor":"dev.bad","points":[[MILLIS, 1]]}', "bad_message"),
        ('{"type":"publish","sensor":"dev.bad","points":[[PAST, 1]]}', "bad_message"),
        ('{"type":"publish","sensor":"dev.bad","points":{"val":1}}', "bad_message"),
        ('{"type":"publish","sensor":"dev.bad","points":"21.5"}', "bad_message"),
        ('{"type":"publish","sensor":"dev.bad"}', "bad_message"),
        ('{"type":"publish","points":[[NOW, 1]]}', "bad_message"),
        ('{"type":"publish","sensor":"bad id","points":[[NOW, 1]]}', "bad_message"),
        ('{"type":"publish","sensor":"fast","points":[[NOW, 1]]}', "conflict"),
        ('{"type":"publish","sensor":"dev.bad","points":BIG}', "too_large"),
    ]


def _fill(text, now):
    big = json.dumps([[now, 1.0]] * 1001)
    return (text.replace("BIG", big).replace("FUTURE", repr(now + 3600)).replace("MILLIS", repr(now * 1000))
            .replace("PAST", repr(now - 3600)).replace("NOW", repr(now)))


@pytest.mark.gen_test
@pytest.mark.parametrize("app_options", [{**BASE, "max_message_size": 256 * 1024}])
async def test_bad_publishes_are_refused_and_nothing_is_stored(connect, app, app_options, http_port):
    watcher = await viewer(connect)
    await subscribe(watcher, ["*"])
    dev = await viewer(connect, key=KEY)
    for text, code in _bad_publishes():
        dev.send(_fill(text, time.time()))
        err = await dev.expect("error")
        assert err["code"] == code, (text, err)
        assert err["message"]
    dev.send({"type": "publish", "sensor": "dev.bad", "points": [[time.time(), "1"]]})
    assert "string" in (await dev.expect("error"))["message"]
    dev.send({"type": "publish", "sensor": "dev.bad", "points": [[time.time() * 1000, 1]]})
    assert "milliseconds" in (await dev.expect("error"))["message"]
    await watcher.nothing_before_pong("sensor_added", skip=("readings",))
    assert stored_rows(app, "dev.bad") == []
    code, _, _ = await http(http_port, "GET", "/api/sensors/dev.bad", key=None)
    assert code == 404


# -- HTTP --------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_http_ingest_accepts_every_documented_shape(http_server, http_port, app):
    now = round(time.time(), 3)
    bodies = [
        ([[now - 4, 1.0], [now - 3, 2.0]], 2),
        ({"points": [[now - 2.5, 2.5]]}, 1),
        ({"value": 3.0, "t": now - 2}, 1),
        ({"value": 4.0}, 1),
        ("5", 1),
        ([], 0),
    ]
    for body, n in bodies:
        code, reply, _ = await http(http_port, "POST", "/api/sensors/dev.h/readings", body)
        assert code == 200, reply
        assert reply == {"sensor": "dev.h", "stored": n}
    code, body, _ = await http(http_port, "GET", "/api/sensors/dev.h/readings", key=None)
    assert [p[1] for p in body["points"]] == [1.0, 2.0, 2.5, 3.0, 4.0, 5.0]
    assert body["more"] is False
    code, body, _ = await http(http_port, "GET", "/api/sensors/dev.h/readings?since=%r&limit=2" % (now - 3),
                               key=None)
    assert [p[1] for p in body["points"]] == [2.5, 3.0] and body["more"] is True
    code, body, _ = await http(http_port, "GET", "/api/sensors/dev.h/readings?limit=1", key=None)
    assert [p[1] for p in body["points"]] == [5.0]
    code, body, _ = await http(http_port, "GET", "/api/sensors", key=None)
    listed = {s["id"]: s for s in body["sensors"]}
    assert listed["dev.h"]["latest"][1] == 5.0 and listed["dev.h"]["kind"] == "device"
    assert listed["fast"]["latest"] is not None
    assert len(stored_rows(app, "dev.h")) == 6


@pytest.mark.gen_test
async def test_http_ingest_needs_the_key(http_server, http_port):
    path = "/api/sensors/dev.k/readings"
    code, body, resp = await http(http_port, "POST", path, "1", key=None)
    assert code == 401 and body["error"] == "unauthorized"
    assert resp["WWW-Authenticate"].startswith("Bearer")
    code, body, _ = await http(http_port, "POST", path, "1", key="wrong")
    assert code == 403 and body["error"] == "forbidden"
    code, _, _ = await http(http_port, "POST", path, "1", key=None, headers={"X-Ingest-Key": "nope"})
    assert code == 403
    code, _, _ = await http(http_port, "POST", path, "1", key=None, headers={"X-Ingest-Key": KEY})
    assert code == 200
    code, _, _ = await http(http_port, "POST", path + "?key=" + KEY, "2", key=None)
    assert code == 200
    for method, p, body in (("PUT", "/api/sensors/dev.k", {"label": "x"}), ("DELETE", "/api/sensors/dev.k", None)):
        code, _, _ = await http(http_port, method, p, body, key=None)
        assert code == 401
        code, _, _ = await http(http_port, method, p, body, key="wrong")
        assert code == 403


@pytest.mark.gen_test
@pytest.mark.parametrize("app_options", [{**BASE, "max_points_per_publish": 10}])
async def test_http_bad_bodies_are_refused_and_nothing_is_stored(http_server, http_port, app, app_options):
    now = time.time()
    cases = [
        ("[[%r, NaN]]" % now, 400, "bad_message"),
        ("[[%r, Infinity]]" % now, 400, "bad_message"),
        ("not json", 400, "bad_json"),
        ("", 400, "bad_message"),
        ('"21.5"', 400, "bad_message"),
        ("[[%r, \"21.5\"]]" % now, 400, "bad_message"),
        ("true", 400, "bad_message"),
        ("null", 400, "bad_message"),
        ('{"val": 1}', 400, "bad_message"),
        ('{"points": [[%r, 1]], "extra": 1}' % now, 400, "bad_message"),
        ("[[%r, 1]]" % (now + 86400), 400, "bad_message"),
        ("[[%r, 1]]" % (now - 86400), 400, "bad_message"),
        (json.dumps([[now, 1]] * 11), 413, "too_large"),
        ("[" + ",".join(["1"] * 40000) + "]", 413, "too_large"),  # over max_message_size
    ]
    for body, status, code in cases:
        got, reply, _ = await http(http_port, "POST", "/api/sensors/dev.bad/readings", body)
        assert (got, reply["error"]) == (status, code), body[:60]
        assert reply["message"]
    got, reply, _ = await http(http_port, "POST", "/api/sensors/bad%20id/readings", "1")
    assert got == 400 and reply["error"] == "bad_message"
    got, reply, _ = await http(http_port, "POST", "/api/sensors/fast/readings", "1")
    assert got == 409 and reply["error"] == "conflict"
    assert stored_rows(app, "dev.bad") == []
    got, _, _ = await http(http_port, "GET", "/api/sensors/dev.bad", key=None)
    assert got == 404
    got, reply, _ = await http(http_port, "GET", "/api/sensors/fast/readings?limit=0", key=None)
    assert got == 400
    got, reply, _ = await http(http_port, "GET", "/api/sensors/fast/readings?since=yesterday", key=None)
    assert got == 400
    got, reply, _ = await http(http_port, "GET", "/api/sensors/nope/readings", key=None)
    assert got == 404 and reply["error"] == "not_found"


@pytest.mark.gen_test
async def test_metadata_over_http_creates_updates_and_is_announced(connect, http_port):
    watcher = await viewer(connect)
    await subscribe(watcher, ["*"])
    code, body, _ = await http(http_port, "PUT", "/api/sensors/plant.boiler", {"label": "Boiler", "unit": "°C"})
    assert code == 201 and body["created"] is True
    assert body["sensor"]["label"] == "Boiler" and body["sensor"]["latest"] is None
    added = await watcher.expect("sensor_added", skip=("readings",))
    assert added["sensor"]["id"] == "plant.boiler" and added["sensor"]["unit"] == "°C"
    code, body, _ = await http(http_port, "PUT", "/api/sensors/plant.boiler", {"label": "Boiler 2", "rate_hz": 4})
    assert code == 200 and body["sensor"]["unit"] == "°C" and body["sensor"]["rate_hz"] == 4.0
    updated = await watcher.expect("sensor_updated", skip=("readings",))
    assert updated["sensor"]["label"] == "Boiler 2"
    late = await viewer(connect)
    assert {"id": "plant.boiler", "label": "Boiler 2", "unit": "°C", "rate_hz": 4.0,
            "kind": "device"} in late.welcome["sensors"]
    for body, status in (({"label": "x" * 101}, 413), ({"unit": "u" * 17}, 413), ({"colour": "red"}, 400),
                         ({"label": 5}, 400), ({"rate_hz": 0}, 400), ({"label": "a\x07b"}, 400), ([1], 400)):
        code, reply, _ = await http(http_port, "PUT", "/api/sensors/plant.boiler", body)
        assert code == status, (body, reply)
    code, reply, _ = await http(http_port, "PUT", "/api/sensors/fast", {"label": "mine"})
    assert code == 409


@pytest.mark.gen_test
async def test_delete_removes_a_device_sensor_and_tells_viewers(connect, http_port, app):
    code, _, _ = await http(http_port, "POST", "/api/sensors/dev.gone/readings", "1")
    assert code == 200
    named = await viewer(connect)
    await subscribe(named, ["dev.gone", "mid"])
    code, body, _ = await http(http_port, "DELETE", "/api/sensors/dev.gone")
    assert code == 200 and body == {"deleted": "dev.gone"}
    removed = await named.expect("sensor_removed", skip=("readings",))
    assert removed["sensor"] == "dev.gone"
    assert stored_rows(app, "dev.gone") == []
    code, _, _ = await http(http_port, "GET", "/api/sensors/dev.gone", key=None)
    assert code == 404
    code, _, _ = await http(http_port, "DELETE", "/api/sensors/dev.gone")
    assert code == 404
    code, _, _ = await http(http_port, "DELETE", "/api/sensors/mid")
    assert code == 409
    # The viewer keeps the rest of its subscription.
    assert (await subscribe(named, []))["sensors"] == ["mid"]


@pytest.mark.gen_test
@pytest.mark.parametrize("app_options", [{**BASE, "sensor_expiry": 0.3}])
async def test_silent_device_sensors_expire_when_configured(connect, app, app_options, http_port):
    posted = time.monotonic()
    code, _, _ = await http(http_port, "POST", "/api/sensors/dev.old/readings", "1")
    assert code == 200
    watcher = await viewer(connect)

    async def expired() -> bool:
        await app.ctx.sensors._maintenance_pass()  # the maintenance timer's work, now
        return (await http(http_port, "GET", "/api/sensors/dev.old", key=None)).status == 404

    await until(expired, interval=0.05)
    assert time.monotonic() - posted >= 0.3, "expired before sensor_expiry"
    removed = await watcher.expect("sensor_removed")
    assert removed == {"type": "sensor_removed", "sensor": "dev.old", "reason": "expired"}


@pytest.mark.gen_test
async def test_the_dashboard_page_is_served_with_its_assets(http_server, http_port):
    resp = await AsyncHTTPClient().fetch(url(http_port, "/dashboard"))
    html = resp.body.decode()
    assert resp.headers["Content-Security-Policy"].startswith("default-src 'self'")
    assert "dashboard.js" in html and "dashboard.css" in html
    assert "<script>" not in html and "style=" not in html
    for asset in ("/static/js/dashboard.js", "/static/js/chart.js", "/static/css/dashboard.css"):
        r = await AsyncHTTPClient().fetch(url(http_port, asset))
        assert r.code == 200


@pytest.mark.gen_test
async def test_metrics_include_the_sensor_app(connect, http_port):
    c = await viewer(connect)
    await subscribe(c, ["mid"])
    await c.expect("readings")
    resp = await AsyncHTTPClient().fetch(url(http_port, "/metrics"))
    text = resp.body.decode()
    assert 'realtime_sensors{kind="simulated"} 3.0' in text
    assert "realtime_sensor_viewers 1.0" in text
    assert "realtime_sensor_batches_total" in text


# -- slow viewers ------------------------------------------------------------------


def _read_frames(sock, want, deadline):
    """Read server frames from a raw socket until ``want(msg)`` is true for one."""
    buf = b""
    sock.settimeout(0.5)
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(1 << 20)
        except TimeoutError:
            continue
        if not chunk:
            return None
        buf += chunk
        while len(buf) >= 2:
            n = buf[1] & 0x7F
            head = 2
            if n == 126:
                if len(buf) < 4:
                    break
                n, head = int.from_bytes(buf[2:4], "big"), 4
            elif n == 127:
                if len(buf) < 10:
                    break
                n, head = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < head + n:
                break
            payload, buf = buf[head:head + n], buf[head + n:]
            msg = json.loads(payload)
            if want(msg):
                return msg
    return None


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("app_options", [{**BASE, "conflate_points": 20, "sensor_backlog_bytes": 16 * 1024,
                                          "max_backfill_points": 5000}])
async def test_a_stalled_viewer_conflates_stays_open_and_never_slows_the_others(connect, app, http_port,
                                                                              app_options):
    steady = await viewer(connect)
    await subscribe(steady, ["fast"], max_hz=10)
    await steady.expect("readings")
    loop = asyncio.get_running_loop()
    before = set(app.ctx.connections)
    stalled = await loop.run_in_executor(None, raw_ws, http_port, "/ws/sensors")
    (conn,) = set(app.ctx.connections) - before
    # Big backfills fill the kernel buffers quickly; then live readings must conflate.
    frame = masked_text_frame('{"type":"subscribe","sensors":["*"],"backfill":60}')
    fan = app.ctx.sensors.fanout
    # Send until the kernel's buffers are full for good (they grow for a while) and the
    # server itself holds well over sensor_backlog_bytes for this viewer.
    steady_since = None
    for _ in range(400):
        if conn.buffered_bytes() < 256 * 1024:
            stalled.sendall(frame)
            steady_since = None
        elif steady_since is None:
            steady_since = time.monotonic()
        elif time.monotonic() - steady_since > 0.3:
            break
        await asyncio.sleep(0.01)
    assert conn.buffered_bytes() > 256 * 1024, "could not fill the stalled viewer's buffers"
    assert fan.behind == 1 and conn.viewer.own is not None, "the stalled viewer is not held back"
    # While it is stalled, the steady viewer keeps its pace and the server's memory stays bounded.
    start = time.monotonic()
    got = await readings(steady, 10)
    elapsed = time.monotonic() - start
    assert elapsed < 1.6
    gaps = [round(b["ts"] - a["ts"], 1) for a, b in zip(got, got[1:])]
    # Every tick, at 10 Hz; a loaded test machine may delay one tick now and then.
    assert max(gaps) <= 0.3 and gaps.count(0.1) >= 7, gaps
    assert not conn._closing
    assert conn.buffered_bytes() < 4 * app.ctx.cfg.max_write_buffer
    stalled_viewer = conn.viewer
    assert stalled_viewer.own is not None and stalled_viewer.own.pending_points <= 20 * 3
    # It reads again: it gets one conflated catch-up message and rejoins.
    caught = await loop.run_in_executor(
        None, _read_frames, stalled, lambda m: m.get("type") == "readings" and "conflated" in m,
        time.monotonic() + 15)
    assert caught is not None, "no conflated catch-up message"
    assert len(caught["points"]["fast"]) <= 20 and caught["conflated"] > 0
    assert time.time() - caught["points"]["fast"][-1][0] < 5  # the latest value won
    await until(lambda: fan.behind == 0, timeout=5)
    assert app.ctx.stats.errors.get("slow_consumer") is None
    stalled.close()

