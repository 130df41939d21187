"""Unit tests for realtime.feeds: pure, no sockets, no sleeping (time is injected)."""

from __future__ import annotations

import math
from collections import namedtuple
from itertools import pairwise
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from realtime.feeds import (
    DEFAULT_SIMULATED,
    Conflator,
    HostMetrics,
    NoisySine,
    RandomWalk,
    RateGate,
    RingBuffer,
    Sawtooth,
    SensorInfo,
    SimulatedFeed,
    Square,
    clamp_hz,
    make_model,
    parse_sensor_specs,
    valid_sensor_id,
    validate_points,
)
from realtime.protocol import ProtocolError

NOW = 1_700_000_000.0


# -- sensors -----------------------------------------------------------------


@pytest.mark.parametrize("sid", ["a", "host.cpu", "plant2:boiler.temp", "A-b_C.9:z", "x" * 64])
def test_valid_sensor_ids(sid: str) -> None:
    assert valid_sensor_id(sid)


@pytest.mark.parametrize("sid", ["", "x" * 65, "a b", "a/b", "temp\n", "température", "a?b", None, 5])
def test_invalid_sensor_ids(sid: object) -> None:
    assert not valid_sensor_id(sid)


def test_sensor_info_to_json() -> None:
    info = SensorInfo("sim.temp", "Temperature", "°C", 2, "simulated")
    assert info.to_json() == {"id": "sim.temp", "label": "Temperature", "unit": "°C",
                              "rate_hz": 2.0, "kind": "simulated"}
    assert type(info.rate_hz) is float


@pytest.mark.parametrize("kwargs", [
    {"id": "bad id"},
    {"label": "x" * 101},
    {"unit": "x" * 17},
    {"rate_hz": 0},
    {"rate_hz": -1.0},
    {"rate_hz": 5000.0},
    {"rate_hz": math.nan},
    {"rate_hz": True},
    {"kind": "virtual"},
])
def test_sensor_info_rejects(kwargs: dict) -> None:
    fields: dict[str, Any] = {"id": "s", "label": "S", "unit": "", "rate_hz": 1.0, "kind": "device"}
    fields.update(kwargs)
    with pytest.raises(ValueError):
        SensorInfo(**fields)


# -- ring buffer -------------------------------------------------------------


def test_ring_count_bound_drops_oldest() -> None:
    ring = RingBuffer(window_s=1000, max_points=3)
    for i in range(5):
        ring.append(float(i), float(i * 10))
    assert len(ring) == 3
    assert list(ring) == [(2.0, 20.0), (3.0, 30.0), (4.0, 40.0)]
    assert ring.latest() == (4.0, 40.0)


def test_ring_time_window_relative_to_newest() -> None:
    ring = RingBuffer(window_s=10, max_points=1000)
    ring.extend([(NOW + i, float(i)) for i in range(30)])
    assert [t for t, _ in ring] == [NOW + i for i in range(19, 30)]


def test_ring_trim_against_wall_clock() -> None:
    ring = RingBuffer(window_s=10, max_points=1000)
    ring.extend([(NOW + i, 0.0) for i in range(5)])
    assert ring.trim(NOW + 13) == 3
    assert [t for t, _ in ring] == [NOW + 3, NOW + 4]
    assert ring.trim(NOW + 100) == 2
    assert len(ring) == 0 and ring.latest() is None


def test_ring_since_is_strictly_after_and_last_is_inclusive() -> None:
    ring = RingBuffer(window_s=100, max_points=100)
    ring.extend([(NOW + i, float(i)) for i in range(10)])
    assert ring.since(NOW + 7) == [(NOW + 8, 8.0), (NOW + 9, 9.0)]
    assert ring.since(NOW + 9) == []
    assert len(ring.since(0)) == 10
    assert ring.since(NOW + 2.5)[0] == (NOW + 3, 3.0)
    assert ring.last(3, NOW + 9) == [(NOW + 6, 6.0), (NOW + 7, 7.0), (NOW + 8, 8.0), (NOW + 9, 9.0)]
    assert ring.last(1000, NOW + 9) == list(ring)
    assert ring.last(1, NOW + 100) == []


def test_ring_empty() -> None:
    ring = RingBuffer()
    assert len(ring) == 0
    assert ring.latest() is None
    assert ring.since(0) == [] and ring.last(10, NOW) == []


def test_ring_out_of_order_within_tolerance_is_inserted_in_order() -> None:
    ring = RingBuffer(window_s=100, max_points=100, reorder_s=5)
    ring.extend([(NOW, 0.0), (NOW + 2, 2.0), (NOW + 4, 4.0)])
    assert ring.append(NOW + 1, 1.0)
    assert ring.append(NOW + 2, 2.5)  # equal time: after the earlier arrival
    assert list(ring) == [(NOW, 0.0), (NOW + 1, 1.0), (NOW + 2, 2.0), (NOW + 2, 2.5),
                          (NOW + 4, 4.0)]
    assert ring.latest() == (NOW + 4, 4.0)
    assert ring.dropped == 0


def test_ring_too_late_points_are_dropped_and_counted() -> None:
    ring = RingBuffer(window_s=100, max_points=100, reorder_s=5)
    ring.extend([(NOW, 0.0), (NOW + 10, 1.0)])
    assert not ring.append(NOW + 4, 9.0)
    assert ring.dropped == 1
    assert list(ring) == [(NOW, 0.0), (NOW + 10, 1.0)]


def test_ring_late_point_into_full_buffer() -> None:
    ring = RingBuffer(window_s=100, max_points=3, reorder_s=10)
    ring.extend([(NOW + 1, 1.0), (NOW + 2, 2.0), (NOW + 3, 3.0)])
    assert not ring.append(NOW + 0.5, 0.5)  # would be the oldest: evicted at once
    assert ring.append(NOW + 2.5, 2.5)  # evicts the oldest instead
    assert list(ring) == [(NOW + 2, 2.0), (NOW + 2.5, 2.5), (NOW + 3, 3.0)]


@pytest.mark.parametrize("kwargs", [{"window_s": 0}, {"window_s": math.inf}, {"max_points": 0},
                                    {"reorder_s": -1}])
def test_ring_rejects_bad_bounds(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        RingBuffer(**kwargs)


@settings(max_examples=150, deadline=None)
@given(
    steps=st.lists(st.tuples(st.floats(-8, 5, allow_nan=False), st.floats(-1e6, 1e6)),
                   max_size=300),
    window=st.floats(0.5, 50),
    max_points=st.integers(1, 40),
    reorder=st.floats(0, 6),
)
def test_ring_bounds_hold_for_any_input(steps: list, window: float, max_points: int,
                                        reorder: float) -> None:
    ring = RingBuffer(window_s=window, max_points=max_points, reorder_s=reorder)
    t = NOW
    for dt, v in steps:
        t += dt
        ring.append(t, v)
        pts = list(ring)
        assert len(ring) == len(pts) <= max_points
        times = [p[0] for p in pts]
        assert times == sorted(times)
        assert times[0] >= times[-1] - window
    pts = list(ring)
    for cut in [NOW - 10, NOW, t - 1, t]:
        assert ring.since(cut) == [p for p in pts if p[0] > cut]
        assert ring.last(3, cut) == [p for p in pts if p[0] >= cut - 3]


# -- validation --------------------------------------------------------------


def _validate(raw: object, max_points: int = 100) -> list:
    return validate_points(raw, now=NOW, max_points=max_points)


@pytest.mark.parametrize("raw, expected", [
    (21.5, [(NOW, 21.5)]),
    (-3, [(NOW, -3.0)]),
    ({"value": 1.5}, [(NOW, 1.5)]),
    ({"value": 1.5, "t": None}, [(NOW, 1.5)]),
    ({"value": 2, "t": NOW - 10}, [(NOW - 10, 2.0)]),
    ([], []),
    ([[NOW - 1, 1], [NOW, 2.5]], [(NOW - 1, 1.0), (NOW, 2.5)]),
    ([[NOW, 2], [NOW - 1, 1]], [(NOW - 1, 1.0), (NOW, 2.0)]),  # sorted by t
    ([[int(NOW), 0]], [(NOW, 0.0)]),
    ([[NOW + 59, 0]], [(NOW + 59, 0.0)]),
])
def test_validate_good_shapes(raw: object, expected: list) -> None:
    points = _validate(raw)
    assert points == expected
    assert all(type(t) is float and type(v) is float for t, v in points)


@pytest.mark.parametrize("raw, fragment", [
    (math.nan, "finite"),
    (math.inf, "finite"),
    (-math.inf, "finite"),
    ("21.5", "string"),
    (True, "true/false"),
    (None, "readings are"),
    ({"value": math.nan}, "finite"),
    ({"value": "1"}, "string"),
    ({"value": False}, "true/false"),
    ({"value": None}, "number"),
    ({"value": 1, "t": math.inf}, "finite"),
    ({"value": 1, "t": "now"}, "string"),
    ({"t": NOW}, "needs a \"value\""),
    ({"val": 1}, "unknown key"),
    ({"value": 1, "unit": "C"}, "unknown key"),
    ({"value": 1, "t": NOW + 3600}, "future"),
    ({"value": 1, "t": NOW * 1000}, "milliseconds"),
    ({"value": 1, "t": NOW - 7200}, "past"),
    ({"value": 1, "t": -5}, "past"),
    ({"value": 10 ** 400}, "too large"),
    ([[NOW, math.nan]], "point 0: value"),
    ([[NOW, math.inf]], "point 0: value"),
    ([[math.nan, 1]], "point 0: t"),
    ([[NOW, "1"]], "string"),
    ([[NOW, True]], "true/false"),
    ([[True, 1]], "true/false"),
    ([[NOW, None]], "number"),
    ([[NOW]], "pair"),
    ([[NOW, 1, 2]], "pair"),
    ([NOW, 1], "pair"),
    ([{"t": NOW, "value": 1}], "pair"),
    ([[NOW, [1]]], "number"),
    ([[NOW + 61, 1]], "future"),
    ([[NOW - 3601, 1]], "past"),
    ([[NOW, 1], [NOW, 2], [NOW, math.nan]], "point 2"),  # all or nothing
    ("", "string"),
    (b"1", "readings are"),
])
def test_validate_rejects(raw: object, fragment: str) -> None:
    with pytest.raises(ProtocolError) as info:
        _validate(raw)
    assert info.value.code == "bad_message"
    assert fragment in info.value.message


def test_validate_oversize_batch_is_too_large() -> None:
    with pytest.raises(ProtocolError) as info:
        _validate([[NOW, 1]] * 11, max_points=10)
    assert info.value.code == "too_large"
    assert "10" in info.value.message
    assert len(_validate([[NOW, 1]] * 10, max_points=10)) == 10


def test_validate_limits_are_configurable() -> None:
    assert validate_points({"value": 1, "t": NOW + 100}, now=NOW, max_points=1,
                           max_future_s=120) == [(NOW + 100, 1.0)]
    with pytest.raises(ProtocolError):
        validate_points({"value": 1, "t": NOW - 20}, now=NOW, max_points=1, max_past_s=10)


# -- conflation --------------------------------------------------------------


def test_conflator_nothing_pending() -> None:
    c = Conflator(5)
    assert c.take() is None
    assert c.pending_points == 0 and not c
    c.add("a", [])
    assert c.take() is None


def test_conflator_under_the_bound_keeps_everything_in_order() -> None:
    c = Conflator(10)
    c.add("a", [(1.0, 1.0), (2.0, 2.0)])
    c.add("b", [(1.5, 7.0)])
    c.add("a", [(3.0, 3.0)])
    assert c.pending_points == 4 and c
    assert c.take() == {"a": [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]], "b": [[1.5, 7.0]]}
    assert c.take() is None
    assert c.dropped == 0


def test_conflator_thins_evenly_and_keeps_first_and_newest() -> None:
    c = Conflator(5)
    c.add("a", [(float(i), float(i)) for i in range(100)])
    assert c.pending_points == 5
    taken = c.take()
    assert taken is not None
    times = [p[0] for p in taken["a"]]
    assert len(times) == 5 and times[0] == 0.0 and times[-1] == 99.0
    stride = times[1] - times[0]  # evenly spread over the whole interval
    assert stride >= 16 and all(b - a == stride for a, b in pairwise(times[:-1]))
    assert c.dropped == 95


def test_conflator_thinning_spans_several_adds() -> None:
    c = Conflator(4)
    for i in range(40):
        c.add("a", [(float(i), 0.0)])
    taken = c.take()
    assert taken is not None
    times = [p[0] for p in taken["a"]]
    assert times[0] == 0.0 and times[-1] == 39.0 and len(times) <= 4
    # the next interval starts afresh
    c.add("a", [(40.0, 0.0)])
    assert c.take() == {"a": [[40.0, 0.0]]}


def test_conflator_k1_is_latest_wins() -> None:
    c = Conflator(1)
    c.add("a", [(1.0, 1.0), (2.0, 2.0)])
    c.add("a", [(3.0, 3.0)])
    assert c.pending_points == 1
    assert c.take() == {"a": [[3.0, 3.0]]}


def test_conflator_discard() -> None:
    c = Conflator(3)
    c.add("a", [(1.0, 1.0)])
    c.add("b", [(1.0, 1.0)])
    c.discard("a")
    c.discard("zzz")
    assert c.take() == {"b": [[1.0, 1.0]]}


def test_conflator_rejects_zero_bound() -> None:
    with pytest.raises(ValueError):
        Conflator(0)


@settings(max_examples=150, deadline=None)
@given(k=st.integers(1, 12),
       batches=st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 40)), max_size=30))
def test_conflator_never_exceeds_k_and_keeps_newest(k: int, batches: list) -> None:
    c = Conflator(k)
    sent: dict[str, list] = {}
    seq = 0
    for sensor, n in batches:
        pts = [(float(seq + i), float(seq + i)) for i in range(n)]
        seq += n
        c.add(sensor, pts)
        sent.setdefault(sensor, []).extend(pts)
        assert c.pending_points <= k * 3
    total_pending = c.pending_points
    out = c.take() or {}
    assert sum(len(v) for v in out.values()) == total_pending
    for sensor, pts in sent.items():
        if not pts:
            assert sensor not in out
            continue
        got = [tuple(p) for p in out[sensor]]
        assert 1 <= len(got) <= k
        assert got[-1] == pts[-1]  # latest always delivered
        assert got == sorted(got) and set(got) <= set(pts)  # a subsequence, in order
        if k >= 2:
            assert got[0] == pts[0]
        if len(pts) <= k:
            assert got == pts
    assert c.dropped == sum(len(p) for p in sent.values()) - total_pending


# -- rate gate ---------------------------------------------------------------


def _count_sends(gate: RateGate, ticks: list[float]) -> list[float]:
    sends = []
    for now in ticks:
        if gate.due(now):
            gate.sent(now)
            sends.append(now)
    return sends


def test_rate_gate_first_message_is_due_at_once() -> None:
    gate = RateGate(2)
    assert gate.due(NOW) and gate.wait(NOW) == 0.0
    gate.sent(NOW)
    assert not gate.due(NOW + 0.1)
    assert gate.wait(NOW) == pytest.approx(0.45)
    assert gate.due(NOW + 0.5)


def test_rate_gate_slows_a_fast_tick() -> None:
    gate = RateGate(1)
    ticks = [NOW + i / 10 for i in range(100)]  # 10 Hz for 10 s
    sends = _count_sends(gate, ticks)
    # on a 1 s grid; a tick up to 10% of an interval early counts as on time
    assert 10 <= len(sends) <= 11
    assert all(b - a == pytest.approx(1.0, abs=0.11) for a, b in pairwise(sends))
    assert all(b - a == pytest.approx(1.0) for a, b in pairwise(sends[1:]))


def test_rate_gate_at_the_tick_rate_tolerates_jitter() -> None:
    gate = RateGate(10)
    jitter = [0.0, 0.004, -0.003, 0.008, -0.006, 0.002, 0.0, -0.008, 0.005, 0.001]
    ticks = [NOW + i / 10 + jitter[i % 10] for i in range(100)]
    assert len(_count_sends(gate, ticks)) == 100


def test_rate_gate_restarts_after_idle_without_a_burst() -> None:
    gate = RateGate(5)
    gate.sent(NOW)
    sends = _count_sends(gate, [NOW + 60 + i / 100 for i in range(100)])  # 100 Hz for 1 s
    assert sends[0] == NOW + 60
    assert len(sends) <= 6  # no catch-up for the idle minute
    assert all(b - a >= 0.18 for a, b in pairwise(sends))


def test_rate_gate_clamps() -> None:
    assert RateGate(1000).hz == 60.0
    assert RateGate(0).hz == 0.1
    assert RateGate(-5).hz == 0.1
    assert RateGate(5, min_hz=1, ceiling_hz=2).hz == 2.0
    gate = RateGate(1)
    assert gate.set_rate(30) == 30.0 and gate.interval == pytest.approx(1 / 30)
    assert clamp_hz(0.5) == 0.5
    for bad in (math.nan, math.inf, "5", None):
        with pytest.raises(ValueError):
            clamp_hz(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        RateGate(1, min_hz=0)


@settings(max_examples=150, deadline=None)
@given(hz=st.floats(0.1, 60),
       gaps=st.lists(st.floats(0.0005, 3.0), min_size=1, max_size=300))
def test_rate_gate_never_exceeds_its_rate(hz: float, gaps: list) -> None:
    gate = RateGate(hz)
    ticks, t = [], NOW
    for g in gaps:
        t += g
        ticks.append(t)
    sends = _count_sends(gate, ticks)
    interval = 1 / hz
    for a, b in pairwise(sends):
        assert b - a >= (0.5 - gate.slack) * interval - 1e-9
    for i, a in enumerate(sends):
        for j in range(i + 1, len(sends)):
            assert j - i + 1 <= (sends[j] - a) * hz + 2 + 1e-9


# -- models ------------------------------------------------------------------


def test_sine_is_pure_and_seeded() -> None:
    a = NoisySine(10, 30, offset=5, noise=0.5, seed=1)
    b = NoisySine(10, 30, offset=5, noise=0.5, seed=1)
    c = NoisySine(10, 30, offset=5, noise=0.5, seed=2)
    times = [NOW + i * 0.1 for i in range(200)]
    va = [a.sample(t) for t in times]
    assert va == [b.sample(t) for t in reversed(times)][::-1]  # order does not matter
    assert va != [c.sample(t) for t in times]
    assert all(math.isfinite(v) for v in va)


def test_sine_without_noise_stays_in_range() -> None:
    m = NoisySine(amplitude=3, period_s=7, offset=20)
    values = [m.sample(NOW + i * 0.05) for i in range(1000)]
    assert min(values) >= 17 - 1e-9 and max(values) <= 23 + 1e-9
    assert max(values) - min(values) > 5.9


def test_noise_looks_like_unit_noise() -> None:
    m = NoisySine(amplitude=0, period_s=1, offset=0, noise=1, seed=9)
    values = [m.sample(NOW + i * 0.01) for i in range(4000)]
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / len(values)
    assert abs(mean) < 0.1 and 0.85 < var < 1.15


def test_sawtooth_and_square() -> None:
    saw = Sawtooth(amplitude=2, period_s=10, offset=1)
    assert saw.sample(0.0) == pytest.approx(-1.0)
    assert saw.sample(5.0) == pytest.approx(1.0)
    assert saw.sample(9.99) == pytest.approx(3.0, abs=0.01)
    sq = Square(amplitude=5, period_s=10, offset=100, duty=0.3)
    assert sq.sample(1.0) == 105 and sq.sample(2.9) == 105 and sq.sample(3.1) == 95
    assert sq.sample(11.0) == 105


def test_random_walk_deterministic_and_starts_at_start() -> None:
    times = [NOW + i for i in range(300)]
    a = [RandomWalk(50, 2, 0, 100, seed=3).sample(times[0])]
    w1, w2, w3 = (RandomWalk(50, 2, 0, 100, seed=s) for s in (3, 3, 4))
    assert a == [50.0]
    v1 = [w1.sample(t) for t in times]
    assert v1 == [w2.sample(t) for t in times]
    assert v1 != [w3.sample(t) for t in times]
    assert len(set(v1)) > 250  # it does move


@settings(max_examples=100, deadline=None)
@given(start=st.floats(-1e3, 1e3), step=st.floats(0, 1e4), lo=st.floats(-1e3, 0),
       width=st.floats(0.001, 1e3), seed=st.integers(0, 2 ** 64),
       gaps=st.lists(st.floats(-5, 100), max_size=100))
def test_random_walk_stays_in_bounds(start: float, step: float, lo: float, width: float,
                                     seed: int, gaps: list) -> None:
    hi = lo + width
    w = RandomWalk(start, step, lo, hi, seed=seed)
    t = NOW
    for g in [0.0] + gaps:
        t += g
        v = w.sample(t)
        assert lo <= v <= hi


@pytest.mark.parametrize("cls, kwargs", [
    (RandomWalk, {"lo": 5, "hi": 5}),
    (RandomWalk, {"step": -1}),
    (RandomWalk, {"start": math.nan}),
    (NoisySine, {"period_s": 0}),
    (NoisySine, {"noise": -1}),
    (Sawtooth, {"period_s": -1}),
    (Square, {"duty": 2}),
])
def test_models_reject_bad_parameters(cls: type, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        cls(**kwargs)


def test_make_model() -> None:
    m = make_model({"model": "sine", "amplitude": 10, "period": 30, "offset": "2", "seed": "7"})
    assert isinstance(m, NoisySine)
    assert (m.amplitude, m.period_s, m.offset, m.seed) == (10.0, 30.0, 2.0, 7)
    assert isinstance(make_model({"model": "walk", "lo": 0, "hi": 1}), RandomWalk)
    assert isinstance(make_model({"model": "random_walk"}), RandomWalk)
    assert isinstance(make_model({"model": "sawtooth"}), Sawtooth)
    assert isinstance(make_model({"model": "square", "duty": 0.2}), Square)


@pytest.mark.parametrize("spec, fragment", [
    ({}, "model must be one of"),
    ({"model": "cosine"}, "model must be one of"),
    ({"model": "sine", "amplitud": 1}, "unknown parameter 'amplitud'"),
    ({"model": "sine", "period": "fast"}, "not a number"),
    ({"model": "sine", "period": "nan"}, "finite"),
    ({"model": "sine", "period": [1]}, "must be a number"),
    ({"model": "sine", "seed": "1.5"}, "not an integer"),
    ({"model": "walk", "lo": 3, "hi": 1}, "lo < hi"),
])
def test_make_model_rejects(spec: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        make_model(spec)


# -- simulated sensor specs --------------------------------------------------


def test_default_simulated_sensors_parse() -> None:
    sensors = parse_sensor_specs(DEFAULT_SIMULATED)
    assert len(sensors) == 6
    assert len({s.info.id for s in sensors}) == 6
    assert any(s.info.rate_hz >= 10 for s in sensors)
    assert all(s.info.kind == "simulated" for s in sensors)
    for s in sensors:
        assert math.isfinite(s.sample(NOW))


def test_parse_sensor_specs_format() -> None:
    text = """
    # a comment line
    id=plant:boiler label="Boiler #2 temp" unit=°C hz=2 model=sine amplitude=5 period=60

    id=a model=walk; id=b label='B; quoted' model=square duty=0.25 ;id=c model=sawtooth
    """
    sensors = parse_sensor_specs(text)
    assert [s.info.id for s in sensors] == ["plant:boiler", "a", "b", "c"]
    boiler = sensors[0].info
    assert (boiler.label, boiler.unit, boiler.rate_hz) == ("Boiler #2 temp", "°C", 2.0)
    assert sensors[1].info.label == "a" and sensors[1].info.unit == "" and sensors[1].info.rate_hz == 1.0
    assert sensors[2].info.label == "B; quoted"
    assert parse_sensor_specs("") == [] and parse_sensor_specs("  \n# off\n") == []


def test_parse_sensor_specs_default_seed_is_per_id() -> None:
    a1, b = parse_sensor_specs("id=a model=sine noise=1\nid=b model=sine noise=1")
    (a2,) = parse_sensor_specs("id=a model=sine noise=1")
    assert a1.sample(NOW) == a2.sample(NOW) != b.sample(NOW)


@pytest.mark.parametrize("text, fragment", [
    ("model=sine", "id None"),
    ("id=bad/id model=sine", "id 'bad/id'"),
    ("id=a", "model must be one of"),
    ("id=a model=sine\nid=a model=walk", "line 2: duplicate id a"),
    ("id=a model=sine amplitude", "expected key=value"),
    ("id=a model=sine =5", "expected key=value"),
    ("id=a id=b model=sine", "id given twice"),
    ("id=a model=sine label='open", "line 1"),
    ("id=a model=sine hz=0", "rate_hz"),
    ("id=a model=sine hz=5000", "rate_hz"),
    ("id=a model=sine hz=fast", "not a number"),
    ("id=a model=sine unit=" + "u" * 20, "unit"),
    ("id=a model=sine periodd=3", "unknown parameter"),
])
def test_parse_sensor_specs_rejects(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_sensor_specs(text)


# -- simulated feed ----------------------------------------------------------


def _feed() -> SimulatedFeed:
    return SimulatedFeed(parse_sensor_specs("id=slow model=sine hz=1\nid=fast model=walk hz=10"),
                         max_catchup_s=5)


def test_feed_samples_on_each_sensors_grid() -> None:
    feed = _feed()
    assert feed.max_rate_hz == 10.0
    assert [i.id for i in feed.infos] == ["slow", "fast"]
    first = feed.tick(NOW + 0.05)
    assert {k: [t for t, _ in v] for k, v in first.items()} == {"slow": [NOW], "fast": [NOW]}
    second = feed.tick(NOW + 0.35)
    assert "slow" not in second
    assert [t for t, _ in second["fast"]] == pytest.approx([NOW + 0.1, NOW + 0.2, NOW + 0.3])
    assert feed.tick(NOW + 0.36) == {}
    third = feed.tick(NOW + 1.0)
    assert [t for t, _ in third["slow"]] == [NOW + 1]
    assert len(third["fast"]) == 7


def test_feed_catch_up_is_bounded() -> None:
    feed = _feed()
    feed.tick(NOW)
    out = feed.tick(NOW + 3600)
    assert len(out["fast"]) == 51 and len(out["slow"]) == 6
    assert out["fast"][0][0] == pytest.approx(NOW + 3595)


def test_feed_prime_fills_history_then_ticks_continue() -> None:
    feed = _feed()
    history = feed.prime(NOW + 0.5, 60)
    assert len(history["slow"]) == 60 and len(history["fast"]) == 600
    assert history["fast"][-1][0] == pytest.approx(NOW + 0.5)
    nxt = feed.tick(NOW + 0.75)
    assert [t for t, _ in nxt["fast"]] == pytest.approx([NOW + 0.6, NOW + 0.7])
    with pytest.raises(RuntimeError):
        feed.prime(NOW + 1, 10)


# -- host metrics ------------------------------------------------------------


def test_host_metrics_real_host_gives_finite_numbers() -> None:
    host = HostMetrics()
    ids = {i.id for i in host.infos}
    assert ids == {"host.cpu", "host.mem", "host.load1", "host.net_rx", "host.net_tx"}
    assert all(i.kind == "host" for i in host.infos)
    for _ in range(2):
        values = host.sample()
        assert set(values) <= ids
        assert "host.mem" in values
        assert all(type(v) is float and math.isfinite(v) and v >= 0 for v in values.values())
        assert 0 <= values["host.mem"] <= 100


class _FakePsutil:
    """Counters the test controls."""

    def __init__(self) -> None:
        self.cpu = {"user": 10.0, "nice": 0.0, "system": 5.0, "idle": 80.0, "iowait": 5.0,
                    "guest": 1.0, "guest_nice": 0.0}
        self.nics = {"lo": [1000, 1000], "eth0": [5000, 2000], "wlan0": [0, 0]}

    def cpu_times(self) -> tuple:
        return namedtuple("cputimes", list(self.cpu))(**self.cpu)

    def virtual_memory(self) -> SimpleNamespace:
        return SimpleNamespace(percent=42.5)

    def getloadavg(self) -> tuple[float, float, float]:
        return (0.75, 0.5, 0.25)

    def net_if_stats(self) -> dict:
        return {"lo": SimpleNamespace(flags="up,loopback,running"),
                "eth0": SimpleNamespace(flags="up,broadcast,running")}

    def net_io_counters(self, pernic: bool = False) -> dict:
        assert pernic
        return {k: SimpleNamespace(bytes_recv=v[0], bytes_sent=v[1]) for k, v in self.nics.items()}


def test_host_metrics_rates_from_counter_deltas() -> None:
    ps = _FakePsutil()
    clock = iter([100.0, 102.0, 103.0, 104.0]).__next__
    host = HostMetrics(prefix="node2", ps=ps, clock=clock)
    ps.cpu.update(user=25.0, idle=85.0)  # +15 busy, +5 idle
    ps.nics["lo"] = [9999999, 9999999]  # loopback is ignored
    ps.nics["eth0"] = [7000, 3000]
    ps.nics["wlan0"] = [1000, 0]
    assert host.sample() == {"node2.cpu": 75.0, "node2.mem": 42.5, "node2.load1": 0.75,
                             "node2.net_rx": 1500.0, "node2.net_tx": 500.0}
    # no CPU time passed: no CPU figure rather than a made-up one; an interface vanished:
    # no network figure for one sample
    del ps.nics["wlan0"]
    assert host.sample() == {"node2.mem": 42.5, "node2.load1": 0.75}
    ps.nics["eth0"] = [7100, 3000]
    ps.cpu.update(idle=95.0)
    assert host.sample() == {"node2.cpu": 0.0, "node2.mem": 42.5, "node2.load1": 0.75,
                             "node2.net_rx": 100.0, "node2.net_tx": 0.0}


def test_host_metrics_missing_platform_features_are_left_out() -> None:
    class Bare(_FakePsutil):
        def getloadavg(self) -> tuple[float, float, float]:
            raise OSError("not on this platform")

        def net_if_stats(self) -> dict:
            raise AttributeError("net_if_stats")

    host = HostMetrics(ps=Bare(), clock=iter([0.0, 1.0]).__next__)
    values = host.sample()
    assert "host.load1" not in values
    assert values["host.mem"] == 42.5 and values["host.net_rx"] == 0.0
