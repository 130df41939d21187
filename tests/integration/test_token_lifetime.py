"""Open connections and their tokens: told before exp, refreshed in place, closed 4001 at exp;
refusals a browser can read (?close_codes=1); identity-provider keys end to end."""

from __future__ import annotations

import asyncio
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

SECRET = "t" * 40
TOKEN_MODE = {"auth": "token", "jwt_secret": SECRET, "token_refresh_window": 1.0}


def mint(sub="ann", ttl=2.0, roles=(), secret=SECRET):
    now = time.time()
    return jwt.encode({"sub": sub, "name": sub, "roles": list(roles), "exp": now + ttl}, secret, algorithm="HS256")


async def welcomed(connect, path="/ws/chat", **params):
    c = await connect(path, **params)
    first = await c.recv()
    assert first is not None and first["type"] in ("welcome", "snapshot"), first
    return c, first


@pytest.mark.gen_test(timeout=20)
@pytest.mark.parametrize("app_options", [TOKEN_MODE])
async def test_a_connection_is_told_before_its_token_expires_and_closed_4001_at_exp(connect):
    start = time.time()
    c, _ = await welcomed(connect, token=mint(ttl=2.5))
    warning = await c.expect("token_expiring", timeout=3)
    told = time.time() - start
    assert 1.2 <= told <= 2.0, told  # --token_refresh_window=1 before exp
    assert 0.5 <= warning["expires_in"] <= 1.05 and abs(warning["exp"] - (start + 2.5)) < 0.2
    code = await c.closed(timeout=3)
    assert code == 4001 and c.conn.close_reason.startswith("token expired")
    assert 2.4 <= time.time() - start <= 3.2


@pytest.mark.gen_test(timeout=20)
@pytest.mark.parametrize("app_options", [TOKEN_MODE])
async def test_a_refresh_keeps_the_connection_past_the_old_exp_and_brings_new_roles(connect):
    c, _ = await welcomed(connect, token=mint(ttl=2.0))
    c.send({"type": "join", "room": "lobby"})
    await c.expect("joined")
    c.send({"type": "say", "room": "lobby", "text": "x", "cid": "1"})
    seq = (await c.expect("ack"))["seq"]
    await c.expect("message")
    await c.expect("token_expiring", timeout=3)
    # Bad refreshes are answered and change nothing.
    for token, code in ((mint(sub="bob", ttl=60), "forbidden"), ("junk", "unauthorized"),
                        (mint(ttl=-5), "unauthorized"), (mint(ttl=60, secret="w" * 40), "unauthorized")):
        c.send({"type": "refresh", "token": token, "ref": code})
        err = await c.expect("error")
        assert (err["code"], err["ref"]) == (code, code), err
    c.send({"type": "refresh", "token": mint(ttl=60, roles=["moderator"]), "ref": 1})
    done = await c.expect("refreshed")
    assert done["ref"] == 1 and done["exp"] > time.time() + 50
    await asyncio.sleep(1.5)  # past the first token's exp
    c.send({"type": "ping", "ref": "alive"})
    assert (await c.expect("pong"))["ref"] == "alive"
    # The new token's roles count from now on: a moderator may delete.
    c.send({"type": "delete", "room": "lobby", "seq": seq})
    assert (await c.expect("ack"))["target"] == seq


@pytest.mark.gen_test(timeout=20)
@pytest.mark.parametrize("app_options", [TOKEN_MODE])
async def test_the_first_message_still_comes_first_when_the_token_is_nearly_expired(connect):
    for path in ("/ws/chat", "/ws/sensors", "/ws/edit/notes"):
        c, first = await welcomed(connect, path, token=mint(ttl=1.3, roles=["edit"]))
        assert first["type"] in ("welcome", "snapshot")
        warning = await c.expect("token_expiring", skip=("presence", "sensor_added", "readings"))
        assert warning["expires_in"] <= 1.0
        assert await c.closed(timeout=3) == 4001


@pytest.mark.gen_test
async def test_refresh_in_open_mode_is_a_bad_message(connect):
    c, _ = await welcomed(connect, name="ann")
    c.send({"type": "refresh", "token": "x"})
    err = await c.expect("error")
    assert err["code"] == "bad_message" and "open" in err["message"]


@pytest.mark.gen_test
@pytest.mark.parametrize("app_options", [{**TOKEN_MODE, "ingest_key": "k" * 32}])
async def test_close_codes_flag_turns_refused_handshakes_into_4001_and_4003(http_port, http_server):
    base = "ws://127.0.0.1:%d" % http_port
    # Without the flag: HTTP statuses, no upgrade.
    with pytest.raises(HTTPClientError) as e:
        await websocket_connect(base + "/ws/chat?token=junk")
    assert e.value.code == 401
    cases = [("/ws/chat?close_codes=1&token=junk", 4001, "invalid token"),
             ("/ws/chat?close_codes=1", 4001, "a token is required"),
             ("/ws/chat?close_codes=1&token=" + mint(ttl=-10), 4001, "token expired"),
             ("/ws/sensors?close_codes=1&key=wrong&token=" + mint(ttl=60), 4003, "wrong ingest key")]
    for path, code, reason in cases:
        conn = await websocket_connect(HTTPRequest(base + path))
        assert await conn.read_message() is None  # nothing but the close: no welcome
        assert (conn.close_code, conn.close_reason[:len(reason)]) == (code, reason)
    # A good token with the flag is an ordinary connection.
    conn = await websocket_connect(base + "/ws/chat?close_codes=1&token=" + mint(ttl=60))
    assert json.loads(await conn.read_message())["type"] == "welcome"
    conn.close()


@pytest.fixture
def idp_key(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "idp.pem"
    path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo))
    return key, str(path)


@pytest.fixture
def app_options(request, idp_key):
    """{} unless a test asks (indirectly) for "idp": token mode with only an identity provider's key."""
    if getattr(request, "param", None) == "idp":
        return {"auth": "token", "jwt_public_key": idp_key[1], "jwt_audience": "realtime"}
    return getattr(request, "param", {})


@pytest.mark.parametrize("app_options", ["idp"], indirect=True)
@pytest.mark.gen_test
async def test_es256_tokens_of_an_identity_provider_open_sockets_and_hs256_ones_do_not(connect, http_port, idp_key):
    key, _ = idp_key
    now = time.time()
    token = jwt.encode({"sub": "ann", "exp": now + 60, "aud": "realtime"}, key, algorithm="ES256")
    c, w = await welcomed(connect, token=token)
    assert w["user"]["id"] == "ann"
    for bad in (jwt.encode({"sub": "ann", "exp": now + 60, "aud": "realtime"}, SECRET, algorithm="HS256"),
                jwt.encode({"sub": "ann", "exp": now + 60, "aud": "other"}, key, algorithm="ES256")):
        with pytest.raises(HTTPClientError) as e:
            await websocket_connect("ws://127.0.0.1:%d/ws/chat?token=%s" % (http_port, bad))
        assert e.value.code == 401


LONG = {**TOKEN_MODE, "token_refresh_window": 0.0, "ingest_key": "k" * 32, "simulated_sensors": "",
        "host_metrics": False}


async def refreshed(c, token, ref):
    c.send({"type": "refresh", "token": token, "ref": ref})
    return await c.expect("refreshed", skip=("presence", "message", "sensor_added"))


@pytest.mark.gen_test(timeout=20)
@pytest.mark.parametrize("app_options", [LONG])
async def test_a_refresh_that_drops_the_edit_role_makes_the_next_op_forbidden(connect):
    """Issue: the roles of a refreshed token replaced the old ones, but an editor decided at the
    handshake (readonly or not) and kept deciding so for the life of the connection."""
    c, snap = await welcomed(connect, "/ws/edit/notes", token=mint(ttl=60, roles=["edit"]))
    assert snap["readonly"] is False
    c.send({"type": "op", "rev": 0, "seq": 1, "op": ["a"]})
    assert (await c.expect("ack"))["rev"] == 1
    # Another user's token is refused and changes nothing.
    c.send({"type": "refresh", "token": mint(sub="bob", ttl=60), "ref": "bob"})
    assert (await c.expect("error"))["code"] == "forbidden"
    c.send({"type": "op", "rev": 1, "seq": 2, "op": [1, "b"]})
    assert (await c.expect("ack"))["rev"] == 2
    # The same user without the edit role: told so, and the next op is refused.
    assert (await refreshed(c, mint(ttl=60), 1))["readonly"] is True
    c.send({"type": "op", "rev": 2, "seq": 3, "op": [2, "c"]})
    err = await c.expect("error")
    assert (err["code"], err["seq"]) == ("forbidden", 3)
    # Given back: editing again.
    assert (await refreshed(c, mint(ttl=60, roles=["edit"]), 2))["readonly"] is False
    c.send({"type": "op", "rev": 2, "seq": 3, "op": [2, "c"]})
    assert (await c.expect("ack"))["rev"] == 3


@pytest.mark.gen_test(timeout=20)
@pytest.mark.parametrize("app_options", [LONG])
async def test_a_refresh_decides_publishing_and_moderation_from_the_new_roles(connect):
    reading = {"type": "publish", "sensor": "dev.x", "points": [[time.time(), 1.0]]}
    dev, w = await welcomed(connect, "/ws/sensors", token=mint(ttl=60, roles=["publish"]))
    assert w["can_publish"] is True
    dev.send({**reading, "ref": 1})
    assert (await dev.expect("ack", skip=("sensor_added",)))["ref"] == 1
    assert (await refreshed(dev, mint(ttl=60), 2))["can_publish"] is False
    dev.send({**reading, "ref": 3})
    assert (await dev.expect("error", skip=("sensor_added",)))["code"] == "forbidden"
    # The ingest key is no role: a refresh does not take it away.
    keyed, w = await welcomed(connect, "/ws/sensors", token=mint(ttl=60), key="k" * 32)
    assert w["can_publish"] is True
    assert (await refreshed(keyed, mint(ttl=60), 1))["can_publish"] is True
    keyed.send({**reading, "ref": 2})
    assert (await keyed.expect("ack", skip=("sensor_added",)))["ref"] == 2
    # A moderator who loses the role may no longer delete.
    mod, _ = await welcomed(connect, token=mint(ttl=60, roles=["moderator"]))
    mod.send({"type": "join", "room": "lobby"})
    await mod.expect("joined")
    mod.send({"type": "say", "room": "lobby", "text": "x", "cid": "1"})
    seq = (await mod.expect("ack"))["seq"]
    assert "readonly" not in await refreshed(mod, mint(ttl=60), 1)
    mod.send({"type": "delete", "room": "lobby", "seq": seq})
    assert (await mod.expect("error", skip=("presence", "message")))["code"] == "forbidden"
