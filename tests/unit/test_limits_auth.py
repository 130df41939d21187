import time

import jwt
import pytest

from realtime.auth import Authenticator, AuthError, clean_name
from realtime.limits import ConnectionCounter, FloodGuard, TokenBucket


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_token_bucket_refills_at_rate():
    clock = Clock()
    b = TokenBucket(rate=10, burst=5, clock=clock)
    assert all(b.take() for _ in range(5))
    assert not b.take()
    clock.t += 0.1
    assert b.take() and not b.take()
    clock.t += 100
    assert sum(b.take() for _ in range(20)) == 5  # never more than the burst


def test_zero_rate_means_unlimited():
    b = TokenBucket(rate=0, burst=1)
    assert all(b.take() for _ in range(1000))


def test_flood_guard_limits_then_closes():
    clock = Clock()
    g = FloodGuard(rate=1, burst=2, strikes=3, clock=clock)
    assert [g.check() for _ in range(2)] == ["ok", "ok"]
    assert [g.check() for _ in range(3)] == ["limited"] * 3
    assert g.check() == "flood"


def test_flood_guard_forgives_after_a_quiet_period():
    clock = Clock()
    g = FloodGuard(rate=1, burst=2, strikes=3, clock=clock)
    for _ in range(5):
        g.check()
    clock.t += 10
    assert g.check() == "ok"


def test_connection_counter():
    c = ConnectionCounter(2)
    assert c.acquire("a") and c.acquire("a") and not c.acquire("a")
    assert c.acquire("b")
    c.release("a")
    assert c.acquire("a")
    assert c.total == 3
    unlimited = ConnectionCounter(0)
    assert all(unlimited.acquire("a") for _ in range(1000))


def test_guest_session_round_trip_keeps_identity():
    auth = Authenticator(b"s" * 32)
    ann = auth.identify(name="ann", session=None, token=None)
    again = auth.identify(name=None, session=auth.session_for(ann), token=None)
    assert (again.id, again.name) == (ann.id, "ann")
    renamed = auth.identify(name="Ann B", session=auth.session_for(ann), token=None)
    assert renamed.id == ann.id and renamed.name == "Ann B"


def test_forged_or_foreign_session_is_a_new_guest():
    auth = Authenticator(b"s" * 32)
    other = Authenticator(b"t" * 32)
    ann = auth.new_guest("ann")
    forged = other.session_for(ann)
    assert auth.identify(name=None, session=forged, token=None).id != ann.id
    assert auth.identify(name=None, session="garbage.x", token=None).id != ann.id


def test_bad_names_refused():
    auth = Authenticator(b"s" * 32)
    with pytest.raises(AuthError) as e:
        auth.identify(name="a\x00b", session=None, token=None)
    assert e.value.status == 400
    assert clean_name("  x  ") == "x"
    assert clean_name("x" * 33) is None
    assert clean_name("\u202eevil") is None  # bidi override


def test_token_mode():
    auth = Authenticator(b"s" * 32, mode="token", jwt_secret="k" * 32)
    tok = auth.make_token("u-1", "Ann", ["publish"], ttl=60)
    ident = auth.identify(name=None, session=None, token=tok)
    assert (ident.id, ident.name, ident.guest) == ("u-1", "Ann", False)
    assert ident.can("publish") and not ident.can("edit")
    expired = jwt.encode({"sub": "u", "exp": int(time.time()) - 10}, "k" * 32, algorithm="HS256")
    with pytest.raises(AuthError) as e:
        auth.identify(name=None, session=None, token=expired)
    assert e.value.expired and e.value.status == 401
    with pytest.raises(AuthError):
        auth.identify(name=None, session=None, token=None)
    wrong_key = jwt.encode({"sub": "u", "exp": int(time.time()) + 60}, "z" * 32, algorithm="HS256")
    with pytest.raises(AuthError):
        auth.identify(name=None, session=None, token=wrong_key)
