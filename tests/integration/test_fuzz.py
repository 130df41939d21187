"""Random messages at every endpoint: each gets an answer or a documented close,
and the server never logs an error (no handler exception escapes)."""

from __future__ import annotations

import json
import logging
import random

import pytest

TYPES = {
    "/ws/chat": ["join", "leave", "say", "typing", "ping", "nope"],
    "/ws/sensors": ["subscribe", "unsubscribe", "publish", "ping", "nope"],
    "/ws/edit/fuzzdoc": ["op", "cursor", "ping", "nope"],
}
# Valid messages to start from, so that mutations reach past the first check.
VALID = {
    "/ws/chat": [{"type": "join", "room": "lobby"}, {"type": "say", "room": "lobby", "text": "hi", "cid": "c"},
                 {"type": "typing", "room": "lobby"}, {"type": "join", "room": "lobby", "since": 0, "epoch": "e"}],
    "/ws/sensors": [{"type": "subscribe", "sensors": ["*"], "max_hz": 5, "backfill": 10},
                    {"type": "unsubscribe", "sensors": ["*"]}],
    "/ws/edit/fuzzdoc": [{"type": "op", "rev": 0, "op": ["x"], "seq": 1},
                         {"type": "cursor", "rev": 0, "anchor": 0, "head": 0}],
}
FIELDS = ["room", "text", "cid", "since", "epoch", "sensors", "max_hz", "backfill", "sensor", "points",
          "value", "rev", "op", "seq", "anchor", "head", "ref"]


def junk(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice([0, -1, 1, 2**31, -(2**63), 10**30, 7])
    if kind == 2:
        return rng.choice([0.5, -1e300, 1e-300, 3.14])
    if kind == 3:
        return rng.choice(["", "lobby", "x" * 3000, "😀", "a\x00b", "\u202e", "fuzzdoc", "*"])
    if kind == 4:
        return rng.randrange(-5, 50)
    if kind == 5:
        return "".join(rng.choice("ab😀 \n") for _ in range(rng.randrange(6)))
    if kind == 6:
        return [junk(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 7:
        return {rng.choice(FIELDS): junk(rng, depth + 1) for _ in range(rng.randrange(4))}
    return [rng.randrange(-3, 5), "ab", -1]


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("app_options", [{"rate_limit": 0, "max_connections_per_ip": 0}])
@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_messages_never_break_the_server(connect, app_options, seed, caplog):
    caplog.set_level(logging.ERROR)
    rng = random.Random(seed)
    answered = 0
    for path, types in TYPES.items():
        client = await connect(path, name="fuzz")
        first = await client.recv()
        assert first is not None and first["type"] in ("welcome", "snapshot"), first
        for i in range(300):
            if rng.random() < 0.5:
                msg = dict(rng.choice(VALID[path]))
                for _ in range(rng.randrange(3)):  # mutate a field or two, or none
                    msg[rng.choice(list(msg) + FIELDS)] = junk(rng)
                msg["type"] = msg.get("type") if isinstance(msg.get("type"), str) else "ping"
            else:
                msg = {"type": rng.choice(types)}
                for _ in range(rng.randrange(5)):
                    msg[rng.choice(FIELDS)] = junk(rng)
            msg["ref"] = i
            client.send(json.dumps(msg))
        # Then a ping: once its pong arrives, every earlier message was handled.
        client.send(json.dumps({"type": "ping", "ref": "end"}))
        while True:
            reply = await client.recv(10)
            if reply is None:
                # Closing is allowed only with a documented code, never 1011 (server fault).
                assert client.conn.close_code in (1008, 1009, 1013), client.conn.close_code
                break
            if reply.get("type") == "pong" and reply.get("ref") == "end":
                break
            answered += 1
        client.close()
    assert answered >= 300  # most messages got an answer (error or reply) before any close
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, "\n".join(r.getMessage() for r in errors[:5])
