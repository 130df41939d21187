"""Unit tests for realtime.sensors' pure parts: fan-out groups, conflation of slow
viewers, rate caps, backfill thinning, the ingest key.  No sockets, no sleeping:
connections are fakes and time is passed in."""

from __future__ import annotations

import json
import os
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from realtime.auth import load_or_create_secret
from realtime.feeds import Conflator
from realtime.sensors import Fanout, SensorConfig, Viewer, thin

T0 = 1_700_000_000.0


class FakeConn:
    """A connection whose backlog the test controls."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.got: list[dict] = []
        self.outs: list[object] = []
        self.backlog = 0

    def deliver(self, out) -> None:
        self.outs.append(out)
        self.got.append(json.loads(out.text))

    def buffered_bytes(self) -> int:
        return self.backlog

    def points(self, sensor: str) -> list[list[float]]:
        return [p for m in self.got if m["type"] == "readings" for p in m["points"].get(sensor, [])]


def make_viewer(fan: Fanout, ids=("a",), hz=10.0, wild=False, name=""):
    v = Viewer(FakeConn(name), hz)
    fan.set_subscription(v, wild=wild, ids=ids, hz=hz)
    return v


def feed(fan: Fanout, sensor: str, t: float, v: float | None = None) -> None:
    fan.push(sensor, [(t, round(t - T0, 6) if v is None else v)])


# -- thin --------------------------------------------------------------------


def test_thin_keeps_everything_when_it_fits():
    pts = [(float(i), 0.0) for i in range(5)]
    assert thin(pts, 5) is pts
    assert thin(pts, 10) is pts


def test_thin_spreads_evenly_and_keeps_both_ends():
    pts = [(float(i), 0.0) for i in range(101)]
    out = thin(pts, 11)
    assert [p[0] for p in out] == [float(i) for i in range(0, 101, 10)]
    assert thin(pts, 1) == [pts[-1]]
    assert thin([], 3) == []


@given(st.integers(0, 300), st.integers(1, 50))
def test_thin_bounds_and_order(m, n):
    pts = [(float(i), float(i)) for i in range(m)]
    out = thin(pts, n)
    assert len(out) == min(m, n)
    assert out == sorted(out)
    if m:
        assert out[-1] == pts[-1]
        assert len(set(out)) == len(out)


# -- fan-out -----------------------------------------------------------------


def test_viewers_with_the_same_subscription_share_one_encoded_message():
    fan = Fanout()
    viewers = [make_viewer(fan, ("a", "b")) for _ in range(100)]
    other = make_viewer(fan, ("a",))
    assert fan.groups == 2
    feed(fan, "a", T0 + 0.1)
    feed(fan, "b", T0 + 0.1)
    assert fan.run(T0 + 0.1) == 101
    # Everyone was joining, so each got its own first message; now they are members.
    feed(fan, "a", T0 + 0.2)
    feed(fan, "b", T0 + 0.2)
    encoded = fan.encoded
    assert fan.run(T0 + 0.2) == 101
    assert fan.encoded - encoded == 2  # one per group, not one per viewer
    outs = {id(v.conn.outs[-1]) for v in viewers}
    assert len(outs) == 1
    msg = viewers[0].conn.got[-1]
    assert msg == {"type": "readings", "ts": T0 + 0.2, "points": {"a": [[T0 + 0.2, 0.2]], "b": [[T0 + 0.2, 0.2]]}}
    assert other.conn.got[-1]["points"] == {"a": [[T0 + 0.2, 0.2]]}


def test_a_viewer_only_gets_its_sensors_and_nothing_before_it_subscribed():
    fan = Fanout()
    early = make_viewer(fan, ("a",))
    feed(fan, "a", T0)
    late = make_viewer(fan, ("a",))
    feed(fan, "b", T0 + 0.05)
    feed(fan, "a", T0 + 0.05)
    fan.run(T0 + 0.1)
    assert early.conn.points("a") == [[T0, 0.0], [T0 + 0.05, 0.05]]
    assert late.conn.points("a") == [[T0 + 0.05, 0.05]]
    assert all("b" not in m["points"] for v in (early, late) for m in v.conn.got)


@pytest.mark.parametrize("hz", [1.0, 2.0, 5.0, 10.0])
def test_rate_cap_holds_and_nothing_is_lost_below_the_conflation_bound(hz):
    fan = Fanout(max_hz=20.0)
    v = make_viewer(fan, ("a",), hz=hz)
    t = T0
    # A 50 Hz sensor and a 50 Hz tick for 10 seconds.
    for k in range(500):
        t = T0 + k * 0.02
        feed(fan, "a", t)
        fan.run(t)
    n = len(v.conn.got)
    assert n <= 10 * hz + 2
    assert n >= 10 * hz - 2
    fan.run(t + 1 / hz)  # the tail still pending
    assert len(v.conn.points("a")) == 500  # 50/hz points per message fit in K=100


def test_the_rate_is_clamped_to_the_configured_range():
    fan = Fanout(min_hz=0.5, max_hz=20.0)
    assert make_viewer(fan, hz=1000).hz == 20.0
    assert make_viewer(fan, hz=0.01).hz == 0.5


def test_a_slow_viewer_is_detached_conflated_and_rejoins_without_gaps_or_doubles():
    fan = Fanout(conflate_points=10, backlog_bytes=1000)
    fast = make_viewer(fan, ("a",), name="fast")
    slow = make_viewer(fan, ("a",), name="slow")
    t = T0
    for k in range(10):  # both in sync
        t = T0 + k * 0.1
        feed(fan, "a", t)
        fan.run(t)
    assert len(slow.conn.got) == 10
    slow.conn.backlog = 5000  # its socket stops draining
    for k in range(10, 60):
        t = T0 + k * 0.1
        feed(fan, "a", t)
        fan.run(t)
    assert fan.behind == 1
    assert len(slow.conn.got) == 10  # nothing more was queued for it
    assert len(fast.conn.got) == 60  # and the other viewer never noticed
    assert slow.own is not None and slow.own.pending_points <= 10  # bounded, whatever the backlog lasted
    slow.conn.backlog = 0  # drained
    for k in range(60, 63):
        t = T0 + k * 0.1
        feed(fan, "a", t)
        fan.run(t)
    assert fan.behind == 0
    catch_up = slow.conn.got[10]
    assert catch_up["conflated"] > 0
    pts = catch_up["points"]["a"]
    assert len(pts) <= 10
    assert pts[0][0] == pytest.approx(T0 + 1.0)  # the first point it missed...
    assert pts[-1][0] == pytest.approx(T0 + 6.0)  # ...to the latest: latest value wins
    # After rejoining it shares the group's messages again: no point twice, in order.
    ts = [p[0] for p in slow.conn.points("a")]
    assert ts == sorted(set(ts))
    assert ts[-2:] == [pytest.approx(T0 + 6.1), pytest.approx(T0 + 6.2)]
    assert slow.conn.outs[-1] is fast.conn.outs[-1]


def test_a_detached_viewer_catches_up_even_when_no_new_data_arrives():
    fan = Fanout(backlog_bytes=100)
    v = make_viewer(fan, ("a",))
    feed(fan, "a", T0)
    fan.run(T0)
    v.conn.backlog = 1000
    feed(fan, "a", T0 + 0.1)
    fan.run(T0 + 0.1)
    assert fan.busy  # still holding a point for it
    v.conn.backlog = 0
    fan.run(T0 + 0.5)
    assert v.conn.points("a")[-1] == [T0 + 0.1, 0.1]
    assert not fan.busy


def test_changing_rate_keeps_the_pending_points_of_kept_sensors():
    fan = Fanout()
    v = make_viewer(fan, ("a", "b"), hz=1.0)
    feed(fan, "a", T0)
    fan.run(T0)  # sends; next due at T0 + 1
    feed(fan, "a", T0 + 0.2)
    feed(fan, "b", T0 + 0.2)
    fan.set_subscription(v, wild=False, ids=("a", "b"), hz=5.0, carry=("a",))
    fan.run(T0 + 0.3)
    last = v.conn.got[-1]
    assert last["points"] == {"a": [[T0 + 0.2, 0.2]]}  # b was not carried (say, it got a backfill)


def test_wildcard_viewers_get_sensors_that_appear_later():
    fan = Fanout()
    v = make_viewer(fan, (), wild=True)
    feed(fan, "brand.new", T0)
    fan.run(T0)
    assert v.conn.points("brand.new") == [[T0, 0.0]]


def test_forget_sensor_drops_it_from_named_subscriptions_and_pending():
    fan = Fanout()
    named = make_viewer(fan, ("a", "b"))
    only = make_viewer(fan, ("a",))
    wild = make_viewer(fan, (), wild=True)
    feed(fan, "a", T0)
    feed(fan, "b", T0)
    fan.forget_sensor("a")
    fan.run(T0 + 0.1)
    assert named.ids == frozenset({"b"})
    assert not only.subscribed and only.group is None
    assert wild.wild
    assert named.conn.got[-1]["points"] == {"b": [[T0, 0.0]]}
    assert only.conn.got == []
    assert wild.conn.got[-1]["points"] == {"b": [[T0, 0.0]]}


def test_leaving_removes_empty_groups():
    fan = Fanout()
    a = make_viewer(fan, ("a",))
    b = make_viewer(fan, ("a",))
    assert fan.groups == 1
    fan.leave(a)
    assert fan.groups == 1
    fan.leave(b)
    assert fan.groups == 0
    feed(fan, "a", T0)
    assert fan.run(T0) == 0
    assert not fan.busy
    fan.leave(b)  # twice is harmless


def test_unsubscribing_everything_leaves_the_group():
    fan = Fanout()
    v = make_viewer(fan, ("a",))
    fan.set_subscription(v, wild=False, ids=(), hz=10.0)
    assert fan.groups == 0 and v.group is None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 4)), min_size=1, max_size=80))
def test_no_point_is_delivered_twice_or_out_of_order_whatever_the_backlog(script):
    """Random stalls: every viewer sees strictly increasing timestamps, always
    ends with the newest point, and never holds more than K pending per sensor."""
    fan = Fanout(conflate_points=5, backlog_bytes=10)
    viewers = [make_viewer(fan, ("a",), hz=10.0) for _ in range(3)]
    t = T0
    for step, (stall, which) in enumerate(script):
        v = viewers[which % 3]
        v.conn.backlog = 100 if stall else 0
        t = T0 + step * 0.1
        feed(fan, "a", t)
        fan.run(t)
        for w in viewers:
            assert w.own is None or w.own.pending_points <= 5
    for w in viewers:
        w.conn.backlog = 0
    fan.run(t + 1.0)
    for w in viewers:
        ts = [p[0] for p in w.conn.points("a")]
        assert ts == sorted(set(ts))
        assert ts[-1] == t


# -- conflator peek (used when a subscription changes) ---------------------------


def test_conflator_peek_does_not_consume():
    c = Conflator(3)
    c.add("a", [(1.0, 1.0), (2.0, 2.0)])
    c.add("b", [(1.0, 5.0)])
    assert c.peek(["a", "zzz"]) == {"a": [(1.0, 1.0), (2.0, 2.0)]}
    assert c.peek() == {"a": [(1.0, 1.0), (2.0, 2.0)], "b": [(1.0, 5.0)]}
    assert c.take() == {"a": [[1.0, 1.0], [2.0, 2.0]], "b": [[1.0, 5.0]]}


# -- configuration and the key ----------------------------------------------------


@pytest.mark.parametrize("bad", [
    {"window_s": 0}, {"window_s": float("inf")}, {"min_hz": 0}, {"min_hz": 5, "max_hz": 1},
    {"max_points": 0}, {"conflate_points": 0}, {"host_metrics_hz": 0}, {"expiry_s": -1},
])
def test_sensor_config_refuses_nonsense(bad):
    with pytest.raises(ValueError):
        SensorConfig(**bad)


def test_ingest_key_is_generated_once_private_and_reused(tmp_path):
    path = str(tmp_path / "d" / "ingest_key")
    key = load_or_create_secret(path)
    assert len(key) >= 32
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_or_create_secret(path) == key
