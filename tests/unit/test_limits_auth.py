import time

import jwt
import pytest

from realtime.auth import Authenticator, AuthError, clean_name
from realtime.limits import ConnectionCounter, FloodGuard, PerAddressBudget, TokenBucket, address_key


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


def test_per_address_budget_charges_each_address_apart_and_refills_per_minute():
    clock = Clock()
    b = PerAddressBudget(per_minute=6, burst=3, clock=clock)
    assert [b.take("10.0.0.1") for _ in range(4)] == [True, True, True, False]
    assert b.take("10.0.0.2")  # another address has its own budget
    clock.t += 10  # 6 a minute: one more every 10 s
    assert [b.take("10.0.0.1") for _ in range(2)] == [True, False]
    assert b.refused == 2
    unlimited = PerAddressBudget(per_minute=0, burst=1, clock=clock)
    assert all(unlimited.take("10.0.0.1") for _ in range(1000)) and len(unlimited) == 0


def test_per_address_budget_forgets_addresses_whose_bucket_is_full_again():
    clock = Clock()
    b = PerAddressBudget(per_minute=60, burst=5, clock=clock)  # full again 5 s after the last charge
    for i in range(1000):
        b.take("10.0.%d.%d" % (i // 256, i % 256))
    assert len(b) == 1000
    clock.t += 4.9
    b.take("10.9.9.9")
    assert len(b) == 1001  # not full yet: remembered
    clock.t += 0.2
    b.take("10.9.9.9")
    assert len(b) == 1  # the thousand are full again: forgotten, which changes nothing for them
    assert all(b.take("10.0.0.1") for _ in range(5)) and not b.take("10.0.0.1")


def test_per_address_budget_tracks_a_bounded_number_of_addresses():
    clock = Clock()
    b = PerAddressBudget(per_minute=1, burst=1, max_addresses=100, clock=clock)
    for i in range(10_000):
        b.take("2001:db8:%x::1" % i)
    assert len(b) == 100


def test_an_ipv6_address_counts_by_its_64_and_a_mapped_ipv4_as_ipv4():
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("::ffff:192.0.2.7") == address_key("192.0.2.7") == "192.0.2.7"
    assert address_key("?") == "?"
    b = PerAddressBudget(per_minute=1, burst=2, clock=Clock())
    assert b.take("2001:db8::1") and b.take("2001:db8::2") and not b.take("2001:db8::ffff:3")


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
