"""Sensor feeds: the sans-I/O core of the sensor-streaming app.

Nothing here touches a socket, a timer or Tornado.  Every function that needs the
time takes ``now`` (unix seconds, a ``float``) from the caller, so tests run
without sleeping and the handler decides which clock is the truth.

The pieces, in the order a reading travels:

* :func:`validate_points` turns what a device pushed (over ``/ws/sensors`` or
  ``POST /api/sensors/<id>/readings``) into checked ``(t, v)`` points, or raises
  :class:`~realtime.protocol.ProtocolError`.
* :class:`RingBuffer` keeps the recent points of one sensor, bounded by a time
  window *and* a point count, for backfill when a viewer opens a chart.
* :class:`Conflator` holds, per viewer, what arrived since that viewer's last
  message, bounded per sensor; :class:`RateGate` says when the viewer may get its
  next message.  A slow viewer therefore costs bounded memory and gets a thinned
  but faithful picture instead of an ever-growing backlog.
* :class:`SimulatedFeed` (built from :func:`parse_sensor_specs`) and
  :class:`HostMetrics` are the sources that make a fresh machine's dashboard live.

A point is a ``(t, v)`` tuple: ``t`` unix seconds, ``v`` a finite float.  Tuples
and lists encode to the same JSON array, ``[t, v]``.
"""

from __future__ import annotations

import math
import re
import shlex
import struct
import time
import zlib
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from operator import itemgetter
from typing import Any, Protocol

from realtime.protocol import ProtocolError

Point = tuple[float, float]

_time_of = itemgetter(0)

# -- sensors -----------------------------------------------------------------

SENSOR_KINDS = frozenset({"simulated", "host", "device"})
MAX_LABEL_LEN = 100
MAX_UNIT_LEN = 16
MAX_RATE_HZ = 1000.0

_SENSOR_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def valid_sensor_id(s: object) -> bool:
    """True if ``s`` is a usable sensor id: a ``str`` of 1 to 64 characters, each
    an ASCII letter or digit or one of ``_ . : -``.

    The alphabet is safe in a URL path segment (``/api/sensors/<id>/readings``),
    a Redis key, a topic name and an HTML ``id`` attribute without escaping.
    ``.`` and ``:`` allow namespaces such as ``host.cpu`` or ``plant2:boiler.temp``.
    """
    return isinstance(s, str) and _SENSOR_ID.fullmatch(s) is not None


@dataclass(frozen=True, slots=True)
class SensorInfo:
    """What a viewer needs to draw one stream: its id, a label, a unit, the rate
    it is sampled at and where it comes from.

    Construction validates every field and raises ``ValueError``: an id that
    :func:`valid_sensor_id` refuses, a label over 100 or a unit over 16
    characters, a rate that is not a finite number in (0, 1000], or a ``kind``
    other than ``"simulated"``, ``"host"`` or ``"device"``.
    """

    id: str
    label: str
    unit: str
    rate_hz: float
    kind: str

    def __post_init__(self) -> None:
        if not valid_sensor_id(self.id):
            raise ValueError(f"sensor id {self.id!r}: use 1-64 characters of A-Z a-z 0-9 _ . : -")
        if not isinstance(self.label, str) or len(self.label) > MAX_LABEL_LEN:
            raise ValueError(f"sensor {self.id}: label must be a string of at most {MAX_LABEL_LEN} characters")
        if not isinstance(self.unit, str) or len(self.unit) > MAX_UNIT_LEN:
            raise ValueError(f"sensor {self.id}: unit must be a string of at most {MAX_UNIT_LEN} characters")
        rate = self.rate_hz
        if (type(rate) not in (int, float) or not math.isfinite(rate)
                or not 0 < rate <= MAX_RATE_HZ):
            raise ValueError(f"sensor {self.id}: rate_hz must be a number in (0, {MAX_RATE_HZ:g}]")
        if self.kind not in SENSOR_KINDS:
            kinds = ", ".join(sorted(SENSOR_KINDS))
            raise ValueError(f"sensor {self.id}: kind must be one of {kinds}")
        object.__setattr__(self, "rate_hz", float(rate))

    def to_json(self) -> dict[str, Any]:
        """``{"id", "label", "unit", "rate_hz", "kind"}``, as sent to viewers."""
        return {"id": self.id, "label": self.label, "unit": self.unit,
                "rate_hz": self.rate_hz, "kind": self.kind}


# -- ring buffer -------------------------------------------------------------


class RingBuffer:
    """The recent points of one sensor, in time order, for backfill.

    Bounds (both always hold after any call):

    * **count**: at most ``max_points`` points; the oldest go first.  This caps
      memory even when a device floods with a thousand points a second.
    * **time**: no point older than ``window_s`` before the newest point.  Use
      :meth:`trim` to apply the window against the wall clock too, so a sensor
      that went silent does not keep showing old data.

    Out-of-order points: a point at or after the newest one is appended (O(1)).
    A point up to ``reorder_s`` seconds older than the newest is inserted in
    time order (cost grows with how far back it lands; tolerates devices that
    batch or retry).  An older point is refused, counted in ``dropped``, and not
    an error: the stream already moved on.  Equal timestamps keep arrival order.

    Points are assumed valid (finite floats); check input with
    :func:`validate_points` first.
    """

    __slots__ = ("_points", "dropped", "max_points", "reorder_s", "window_s")

    def __init__(self, window_s: float = 600.0, max_points: int = 10_000, *,
                 reorder_s: float = 5.0) -> None:
        if not (math.isfinite(window_s) and window_s > 0):
            raise ValueError("window_s must be a positive number of seconds")
        if max_points < 1:
            raise ValueError("max_points must be at least 1")
        if not (math.isfinite(reorder_s) and reorder_s >= 0):
            raise ValueError("reorder_s must be zero or more seconds")
        self.window_s = float(window_s)
        self.max_points = int(max_points)
        self.reorder_s = float(reorder_s)
        self.dropped = 0
        self._points: deque[Point] = deque(maxlen=self.max_points)

    def __len__(self) -> int:
        return len(self._points)

    def __iter__(self) -> Iterator[Point]:
        return iter(self._points)

    def append(self, t: float, v: float) -> bool:
        """Add one point; return whether it was kept (see the class docstring)."""
        pts = self._points
        if pts and t < pts[-1][0]:
            newest = pts[-1][0]
            if t < newest - self.reorder_s or t < newest - self.window_s:
                self.dropped += 1
                return False
            i = bisect_right(pts, t, key=_time_of)
            if len(pts) == self.max_points:
                if i == 0:
                    # It would be the oldest point of a full buffer: evicted at once.
                    self.dropped += 1
                    return False
                pts.popleft()
                i -= 1
            pts.insert(i, (t, v))
            return True
        pts.append((t, v))  # a full deque drops its oldest point itself
        cutoff = t - self.window_s
        while pts[0][0] < cutoff:
            pts.popleft()
        return True

    def extend(self, points: Iterable[Point]) -> int:
        """Add points (best in time order); return how many were kept."""
        kept = 0
        for t, v in points:
            kept += self.append(t, v)
        return kept

    def _tail(self, start: int) -> list[Point]:
        """Points from index ``start`` on, walking from the nearer end."""
        pts = self._points
        n = len(pts) - start
        if n <= 0:
            return []
        if n < start:
            out = list(islice(reversed(pts), n))
            out.reverse()
            return out
        return list(islice(pts, start, None))

    def since(self, t: float) -> list[Point]:
        """Points strictly after ``t``, oldest first (``since(last_seen_t)``)."""
        return self._tail(bisect_right(self._points, t, key=_time_of))

    def last(self, seconds: float, now: float) -> list[Point]:
        """Points with ``t >= now - seconds``, oldest first (backfill of a chart)."""
        return self._tail(bisect_left(self._points, now - seconds, key=_time_of))

    def latest(self) -> Point | None:
        """The newest point, or ``None`` if empty."""
        return self._points[-1] if self._points else None

    def trim(self, now: float) -> int:
        """Drop points older than ``now - window_s``; return how many went."""
        pts = self._points
        cutoff = now - self.window_s
        n = 0
        while pts and pts[0][0] < cutoff:
            pts.popleft()
            n += 1
        return n

    def clear(self) -> None:
        self._points.clear()


# -- ingest validation -------------------------------------------------------

_SHAPES = ("readings are a number, an object {\"value\": v, \"t\": t} "
           "or a list of [t, value] pairs")


def _number(x: Any, what: str) -> float:
    # type() rather than isinstance(): bool is an int subclass and is refused.
    if type(x) is float:
        if math.isfinite(x):
            return x
        raise ProtocolError("bad_message", f"{what} must be a finite number, not NaN or Infinity")
    if type(x) is int:
        try:
            return float(x)
        except OverflowError:
            raise ProtocolError("bad_message", f"{what} is too large") from None
    if type(x) is bool:
        raise ProtocolError("bad_message", f"{what} must be a number, not true/false")
    if isinstance(x, str):
        raise ProtocolError("bad_message", f"{what} must be a number, not a string")
    raise ProtocolError("bad_message", f"{what} must be a number")


def _check_time(t: float, what: str, now: float, max_future_s: float, max_past_s: float) -> None:
    if t > now + max_future_s:
        hint = " (t is unix seconds; this looks like milliseconds)" if t > 1e11 else ""
        raise ProtocolError("bad_message", f"{what} is more than {max_future_s:g}s in the future{hint}")
    if t < now - max_past_s:
        raise ProtocolError("bad_message", f"{what} is more than {max_past_s:g}s in the past")


def validate_points(raw: Any, *, now: float, max_points: int, max_future_s: float = 60.0,
                    max_past_s: float = 3600.0) -> list[Point]:
    """Check readings pushed by a device and return them as ``(t, v)`` points.

    Accepted shapes (``t`` is unix seconds, ``v`` a number; both may be JSON
    integers or floats):

    * ``21.5`` -- one value, taken at ``now``;
    * ``{"value": 21.5}`` or ``{"value": 21.5, "t": 1700000000.25}`` -- no
      other keys (a typo such as ``"val"`` is an error, not silently ignored);
    * ``[[t, v], [t, v], ...]`` -- a batch of at most ``max_points`` pairs; an
      empty list is valid and yields no points.

    All or nothing: one bad point rejects the whole batch with
    ``ProtocolError("bad_message", ...)`` naming the point; a batch longer than
    ``max_points`` raises ``ProtocolError("too_large", ...)`` before any point is
    read.  Refused: NaN and Infinity, booleans, strings, ``null`` (except
    ``"t": null``, read as "now"), pairs that are not two-element arrays, and
    ``t`` more than ``max_future_s`` after or ``max_past_s`` before ``now``
    (a ``t`` in milliseconds gets a hint saying so).

    The result is sorted by ``t`` (stable), ready for :meth:`RingBuffer.extend`.
    """
    if type(raw) is list:
        if len(raw) > max_points:
            raise ProtocolError("too_large", f"a batch holds at most {max_points} points, got {len(raw)}")
        points: list[Point] = []
        for i, item in enumerate(raw):
            if type(item) is not list or len(item) != 2:
                raise ProtocolError("bad_message", f"point {i} must be a [t, value] pair")
            t = _number(item[0], f"point {i}: t")
            v = _number(item[1], f"point {i}: value")
            _check_time(t, f"point {i}: t", now, max_future_s, max_past_s)
            points.append((t, v))
        points.sort(key=_time_of)
        return points
    if type(raw) is dict:
        extra = set(raw) - {"value", "t"}
        if extra:
            key = min(map(str, extra))
            raise ProtocolError("bad_message",
                                f'unknown key {key!r} in reading (expected "value" and optionally "t")')
        if "value" not in raw:
            raise ProtocolError("bad_message", "a reading object needs a \"value\"")
        v = _number(raw["value"], "value")
        if raw.get("t") is None:
            return [(now, v)]
        t = _number(raw["t"], "t")
        _check_time(t, "t", now, max_future_s, max_past_s)
        return [(t, v)]
    if type(raw) in (int, float):
        return [(now, _number(raw, "value"))]
    if type(raw) is bool or isinstance(raw, str):
        _number(raw, "value")  # raises, with the specific message
    raise ProtocolError("bad_message", _SHAPES)


# -- conflation --------------------------------------------------------------


class _Pending:
    """Points of one sensor awaiting one viewer's next message, at most ``k``.

    Arrival number ``i`` (0, 1, 2, ... since the last send) is kept when
    ``i % stride == 0``; the newest arrival (``tail``) is always delivered.
    While that would be more than ``k`` points, every other kept point is
    dropped and ``stride`` doubles, so ``kept`` is always exactly the arrivals
    at multiples of ``stride``: evenly spread over the whole interval.
    """

    __slots__ = ("count", "kept", "stride", "tail")

    def __init__(self) -> None:
        self.kept: list[Point] = []
        self.stride = 1
        self.count = 0
        self.tail: Point | None = None

    def push(self, p: Point, k: int) -> None:
        self.tail = p
        if k > 1:  # with k == 1 only the tail is delivered
            if self.count % self.stride == 0:
                self.kept.append(p)
            self.count += 1
            # Terminates: size > k >= 2 implies len(kept) >= 2, and each pass drops some.
            while len(self) > k:
                del self.kept[1::2]
                self.stride *= 2
        else:
            self.count += 1

    def points(self) -> list[Point]:
        kept = self.kept
        if self.tail is None or (kept and kept[-1] is self.tail):
            return list(kept)
        return [*kept, self.tail]

    def __len__(self) -> int:
        n = len(self.kept)
        return n if self.tail is None or (n and self.kept[-1] is self.tail) else n + 1


class Conflator:
    """What one viewer has not been sent yet, per sensor, bounded.

    Policy ("even thinning, newest kept"): between two sends a sensor keeps at
    most ``max_points_per_sensor`` (K) points.  Up to K arrivals, all are kept.
    Beyond that the pending points are thinned by arrival order: the first point
    of the interval, then every 2nd, 4th, 8th ... arrival, evenly spread, plus
    the newest point, which is always delivered (latest value wins).  For a
    steadily sampled sensor that is an evenly downsampled picture of the whole
    interval rather than only its end, so a slow viewer's chart has no gaps.

    Memory is O(K) per sensor with pending points, whatever the input rate;
    ``add`` is O(1) amortized per point.  Points keep arrival order (feeds
    deliver them in time order).  ``dropped`` counts points thinned away.
    """

    __slots__ = ("_pending", "dropped", "max_points_per_sensor")

    def __init__(self, max_points_per_sensor: int = 100) -> None:
        if max_points_per_sensor < 1:
            raise ValueError("max_points_per_sensor must be at least 1")
        self.max_points_per_sensor = int(max_points_per_sensor)
        self.dropped = 0
        self._pending: dict[str, _Pending] = {}

    def add(self, sensor_id: str, points: Iterable[Point]) -> None:
        """Queue ``points`` of ``sensor_id`` for the next :meth:`take`."""
        pending = self._pending.get(sensor_id)
        if pending is None:
            pending = self._pending[sensor_id] = _Pending()
        k = self.max_points_per_sensor
        for p in points:
            pending.push(p, k)
        if pending.count == 0:
            del self._pending[sensor_id]

    def take(self) -> dict[str, list[list[float]]] | None:
        """Everything pending as ``{sensor_id: [[t, v], ...]}``, then forget it;
        ``None`` if nothing is pending (send nothing)."""
        if not self._pending:
            return None
        out: dict[str, list[list[float]]] = {}
        for sensor_id, pending in self._pending.items():
            pts = pending.points()
            self.dropped += pending.count - len(pts)
            out[sensor_id] = [[t, v] for t, v in pts]
        self._pending = {}
        return out

    def discard(self, sensor_id: str) -> None:
        """Forget pending points of one sensor (the viewer unsubscribed)."""
        self._pending.pop(sensor_id, None)

    def peek(self, sensor_ids: Iterable[str] | None = None) -> dict[str, list[Point]]:
        """What :meth:`take` would return (for ``sensor_ids`` only, if given),
        without forgetting it: used to carry a viewer's pending points over when
        its subscription changes."""
        pending = self._pending
        if sensor_ids is None:
            return {sid: p.points() for sid, p in pending.items()}
        return {sid: pending[sid].points() for sid in sensor_ids if sid in pending}

    @property
    def pending_points(self) -> int:
        """Points the next :meth:`take` would return."""
        return sum(len(p) for p in self._pending.values())

    def __bool__(self) -> bool:
        return bool(self._pending)


def clamp_hz(hz: float, lo: float = 0.1, hi: float = 60.0) -> float:
    """``hz`` clamped to ``[lo, hi]``; ``ValueError`` if it is not a finite number."""
    if type(hz) not in (int, float) or not math.isfinite(hz):
        raise ValueError("rate must be a finite number of messages per second")
    return float(min(max(hz, lo), hi))


class RateGate:
    """Paces one viewer's batched messages to at most ``hz`` per second.

    The caller (a feed tick) asks :meth:`due`; if true it sends and calls
    :meth:`sent`.  ``max_hz`` is clamped to ``[min_hz, ceiling_hz]``.

    Sends are scheduled on a grid of ``1/hz`` seconds rather than "one interval
    after the last send", so that a viewer asking for 10 Hz from a 10 Hz tick
    gets 10 messages a second despite timer jitter (a tick up to ``slack`` of
    an interval early still counts as on time).  Contract: over any stretch of
    time the number of messages is at most ``duration * hz + 2``, and two
    messages are never closer than ``(0.5 - slack)`` of an interval.  After an
    idle spell (or a late tick, more than half an interval late) the grid
    restarts from that send, so there is never a catch-up burst.
    """

    __slots__ = ("_hz", "_next", "ceiling_hz", "min_hz", "slack")

    def __init__(self, max_hz: float, *, min_hz: float = 0.1, ceiling_hz: float = 60.0,
                 slack: float = 0.1) -> None:
        if not 0 < min_hz <= ceiling_hz:
            raise ValueError("need 0 < min_hz <= ceiling_hz")
        if not 0 <= slack < 0.5:
            raise ValueError("slack must be in [0, 0.5)")
        self.min_hz = float(min_hz)
        self.ceiling_hz = float(ceiling_hz)
        self.slack = float(slack)
        self._hz = clamp_hz(max_hz, self.min_hz, self.ceiling_hz)
        self._next: float | None = None

    @property
    def hz(self) -> float:
        """The effective (clamped) rate."""
        return self._hz

    @property
    def interval(self) -> float:
        return 1.0 / self._hz

    def set_rate(self, max_hz: float) -> float:
        """Change the rate (the viewer asked for another one); return it clamped."""
        self._hz = clamp_hz(max_hz, self.min_hz, self.ceiling_hz)
        return self._hz

    def due(self, now: float) -> bool:
        """May a message go out at ``now``?"""
        return self._next is None or now >= self._next - self.slack * self.interval

    def wait(self, now: float) -> float:
        """Seconds until :meth:`due` becomes true (0.0 if it is)."""
        if self._next is None:
            return 0.0
        return max(0.0, self._next - self.slack * self.interval - now)

    def sent(self, now: float) -> None:
        """Record that a message went out at ``now``."""
        interval = self.interval
        nxt = self._next
        if (nxt is None or now > nxt + 0.5 * interval
                or now < nxt - self.slack * interval):
            self._next = now + interval
        else:
            self._next = nxt + interval


# -- simulated sensor models -------------------------------------------------


class Model(Protocol):
    def sample(self, t: float) -> float:
        """The value at unix time ``t``."""
        ...


_M64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """SplitMix64's finaliser: a fast, well-spread hash of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _gauss(seed: int, t: float) -> float:
    """A standard normal deviate that is a pure function of ``(seed, t)``.

    Noise keyed on the timestamp rather than drawn from a stateful generator
    makes ``sample(t)`` reproducible whatever else was sampled before, and two
    processes simulating the same sensor agree.
    """
    bits = struct.unpack("<Q", struct.pack("<d", t))[0]
    a = _mix64(bits ^ (seed * 0x632BE59BD9B4E019 & _M64))
    b = _mix64(a)
    u1 = ((a >> 11) + 1) * (1.0 / 9007199254740993.0)  # in (0, 1]
    u2 = (b >> 11) * (1.0 / 9007199254740992.0)
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


def _seed_of(seed: int | None) -> int:
    return 0 if seed is None else int(seed) & _M64


def _check_finite(**values: float) -> None:
    for name, value in values.items():
        if type(value) not in (int, float) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number")


class RandomWalk:
    """A bounded random walk: a value that drifts, such as humidity.

    ``step`` is the typical change per second: between samples ``dt`` apart the
    value moves by ``step * sqrt(dt)`` times a normal deviate (``dt`` counted up
    to 60 s), and reflects off ``lo`` and ``hi``, so it always stays in
    ``[lo, hi]``.  The first sample is ``start`` (clamped into range).

    Stateful: deterministic given ``seed`` and the sequence of ``t`` sampled
    (timestamps that go backwards count as ``dt = 0``).
    """

    def __init__(self, start: float = 0.0, step: float = 1.0, lo: float = -100.0,
                 hi: float = 100.0, seed: int | None = None) -> None:
        _check_finite(start=start, step=step, lo=lo, hi=hi)
        if not lo < hi:
            raise ValueError("random walk needs lo < hi")
        if step < 0:
            raise ValueError("random walk step must be >= 0")
        self.lo = float(lo)
        self.hi = float(hi)
        self.step = float(step)
        self.seed = _seed_of(seed)
        self._x = min(max(float(start), self.lo), self.hi)
        self._t: float | None = None

    def sample(self, t: float) -> float:
        if self._t is not None:
            dt = min(max(t - self._t, 0.0), 60.0)
            if dt > 0:
                self._x = self._reflect(self._x + self.step * math.sqrt(dt) * _gauss(self.seed, t))
        self._t = t if self._t is None else max(t, self._t)
        return self._x

    def _reflect(self, x: float) -> float:
        lo, hi = self.lo, self.hi
        if lo <= x <= hi:
            return x
        span = hi - lo
        y = (x - lo) % (2.0 * span)
        if y > span:
            y = 2.0 * span - y
        return min(max(lo + y, lo), hi)


class _Periodic:
    """What the periodic models share: ``offset``, ``amplitude``, ``period_s``,
    optional Gaussian noise that is a pure function of ``(seed, t)``.
    Subclasses define ``shape(frac)`` in [-1, 1] for the phase ``frac`` in [0, 1)."""

    def __init__(self, amplitude: float, period_s: float, offset: float, noise: float,
                 seed: int | None, phase: float = 0.0) -> None:
        _check_finite(amplitude=amplitude, period_s=period_s, offset=offset, noise=noise, phase=phase)
        if period_s <= 0:
            raise ValueError("period must be > 0")
        if noise < 0:
            raise ValueError("noise must be >= 0")
        self.amplitude = float(amplitude)
        self.period_s = float(period_s)
        self.offset = float(offset)
        self.noise = float(noise)
        self.phase = float(phase)
        self.seed = _seed_of(seed)

    def shape(self, frac: float) -> float:
        raise NotImplementedError

    def sample(self, t: float) -> float:
        x = self.offset + self.amplitude * self.shape((t / self.period_s + self.phase) % 1.0)
        if self.noise:
            x += self.noise * _gauss(self.seed, t)
        return x


class NoisySine(_Periodic):
    """``offset + amplitude * sin(2 pi (t / period_s + phase)) + noise * N(0, 1)``.

    A pure function of ``t`` for a given ``seed``.  Without noise the value lies
    in ``[offset - |amplitude|, offset + |amplitude|]``.
    """

    def __init__(self, amplitude: float = 1.0, period_s: float = 60.0, offset: float = 0.0,
                 noise: float = 0.0, seed: int | None = None, phase: float = 0.0) -> None:
        super().__init__(amplitude, period_s, offset, noise, seed, phase)

    def shape(self, frac: float) -> float:
        return math.sin(2.0 * math.pi * frac)


class Sawtooth(_Periodic):
    """Ramps from ``offset - amplitude`` up to ``offset + amplitude`` once per
    ``period_s``, then drops; plus optional noise.  Pure in ``t`` given ``seed``."""

    def __init__(self, amplitude: float = 1.0, period_s: float = 60.0, offset: float = 0.0,
                 noise: float = 0.0, seed: int | None = None) -> None:
        super().__init__(amplitude, period_s, offset, noise, seed)

    def shape(self, frac: float) -> float:
        return 2.0 * frac - 1.0


class Square(_Periodic):
    """``offset + amplitude`` for the first ``duty`` of each period, then
    ``offset - amplitude`` (an on/off load); plus optional noise.  Pure in ``t``."""

    def __init__(self, amplitude: float = 1.0, period_s: float = 60.0, offset: float = 0.0,
                 duty: float = 0.5, noise: float = 0.0, seed: int | None = None) -> None:
        _check_finite(duty=duty)
        if not 0 <= duty <= 1:
            raise ValueError("duty must be in [0, 1]")
        super().__init__(amplitude, period_s, offset, noise, seed)
        self.duty = float(duty)

    def shape(self, frac: float) -> float:
        return 1.0 if frac < self.duty else -1.0


# model name -> (class, {spec key: constructor argument}); "seed" is an int.
_MODELS: dict[str, tuple[Callable[..., Model], dict[str, str]]] = {
    "sine": (NoisySine, {"amplitude": "amplitude", "period": "period_s", "offset": "offset",
                         "noise": "noise", "phase": "phase", "seed": "seed"}),
    "walk": (RandomWalk, {"start": "start", "step": "step", "lo": "lo", "hi": "hi",
                          "seed": "seed"}),
    "sawtooth": (Sawtooth, {"amplitude": "amplitude", "period": "period_s", "offset": "offset",
                            "noise": "noise", "seed": "seed"}),
    "square": (Square, {"amplitude": "amplitude", "period": "period_s", "offset": "offset",
                        "duty": "duty", "noise": "noise", "seed": "seed"}),
}
MODEL_NAMES = tuple(sorted(_MODELS))


def _spec_number(key: str, value: Any) -> float:
    if type(value) in (int, float):
        x = float(value)
    elif isinstance(value, str):
        try:
            x = float(value)
        except ValueError:
            raise ValueError(f"{key}={value!r} is not a number") from None
    else:
        raise ValueError(f"{key} must be a number")
    if not math.isfinite(x):
        raise ValueError(f"{key} must be a finite number")
    return x


def _spec_int(key: str, value: Any) -> int:
    if type(value) is int:
        return value
    if isinstance(value, str):
        try:
            return int(value, 10)
        except ValueError:
            pass
    raise ValueError(f"{key}={value!r} is not an integer")


def make_model(spec: Mapping[str, Any]) -> Model:
    """Build a model from a conf-style spec.

    ``spec["model"]`` is one of ``sine``, ``walk``, ``sawtooth``, ``square``; the
    other keys are its parameters, as numbers or numeric strings::

        {"model": "sine", "amplitude": 10, "period": 30, "offset": 20, "noise": 0.5}
        {"model": "walk", "start": 45, "step": 0.3, "lo": 20, "hi": 90, "seed": 7}
        {"model": "sawtooth", "amplitude": 1, "period": 10}
        {"model": "square", "amplitude": 500, "period": 120, "duty": 0.3, "offset": 800}

    ``period`` is in seconds.  Unknown models and parameters raise ``ValueError``
    listing what is allowed (a misspelt parameter is not silently ignored).
    """
    name = spec.get("model")
    if name == "random_walk":
        name = "walk"
    if name not in _MODELS:
        raise ValueError(f"model must be one of {', '.join(MODEL_NAMES)}, got {name!r}")
    cls, params = _MODELS[name]
    kwargs: dict[str, Any] = {}
    for key, value in spec.items():
        if key == "model":
            continue
        if key not in params:
            allowed = ", ".join(params)
            raise ValueError(f"unknown parameter {key!r} for model {name!r} (allowed: {allowed})")
        kwargs[params[key]] = _spec_int(key, value) if key == "seed" else _spec_number(key, value)
    return cls(**kwargs)


@dataclass(frozen=True, slots=True)
class SimulatedSensor:
    """A simulated stream: what viewers see (``info``) and what produces it."""

    info: SensorInfo
    model: Model

    def sample(self, t: float) -> float:
        return self.model.sample(t)


_SENSOR_KEYS = ("id", "label", "unit", "hz")


def simulated_sensor(spec: Mapping[str, Any]) -> SimulatedSensor:
    """Build one simulated sensor from a dict: ``id`` and ``model`` are required;
    ``label`` (default: the id), ``unit`` (default: none) and ``hz`` (default 1)
    describe the stream; every other key is a :func:`make_model` parameter.
    Without a ``seed`` the seed is derived from the id, so a restart replays the
    same pattern.  Raises ``ValueError``."""
    sensor_id = spec.get("id")
    if not valid_sensor_id(sensor_id):
        raise ValueError(f"id {sensor_id!r}: use 1-64 characters of A-Z a-z 0-9 _ . : -")
    assert isinstance(sensor_id, str)
    try:
        model_spec = {k: v for k, v in spec.items() if k not in _SENSOR_KEYS}
        model_spec.setdefault("seed", zlib.crc32(sensor_id.encode("ascii")))
        model = make_model(model_spec)
        label = spec.get("label", sensor_id)
        unit = spec.get("unit", "")
        hz = _spec_number("hz", spec.get("hz", 1.0))
        info = SensorInfo(id=sensor_id, label=label, unit=unit, rate_hz=hz, kind="simulated")
    except ValueError as e:
        raise ValueError(f"simulated sensor {sensor_id}: {e}") from None
    return SimulatedSensor(info, model)


def _spec_entries(text: str) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(line number, tokens)`` per entry: lines, further split on ``;``."""
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";")
        lexer.whitespace_split = True
        lexer.commenters = ""  # '#' is literal inside a line ("label='Pump #2'")
        try:
            tokens = list(lexer)
        except ValueError as e:  # an unclosed quote
            raise ValueError(f"simulated sensors, line {lineno}: {e}") from None
        entry: list[str] = []
        for token in tokens + [";"]:
            if token and set(token) == {";"}:
                if entry:
                    yield lineno, entry
                entry = []
            else:
                entry.append(token)


def parse_sensor_specs(text: str) -> list[SimulatedSensor]:
    """Parse the ``simulated_sensors`` option: one sensor per line (or per
    ``;``-separated entry), each a list of ``key=value`` words::

        id=sim.temp label="Room temperature" unit=°C hz=1 model=sine amplitude=2 period=600 offset=21
        id=sim.hum label=Humidity unit=% hz=0.5 model=walk start=45 step=0.2 lo=20 hi=90

    Values with spaces are quoted, shell-style.  Lines starting with ``#`` and
    blank lines are skipped; an empty string means no simulated sensors.  The
    keys are those of :func:`simulated_sensor`.  Ids must be unique.

    Raises ``ValueError`` naming the line and the problem, so a bad config file
    stops the server at start-up rather than producing an empty dashboard.
    """
    sensors: list[SimulatedSensor] = []
    seen: set[str] = set()
    for lineno, tokens in _spec_entries(text):
        spec: dict[str, str] = {}
        for token in tokens:
            key, sep, value = token.partition("=")
            if not sep or not key:
                raise ValueError(f"simulated sensors, line {lineno}: expected key=value, got {token!r}")
            if key in spec:
                raise ValueError(f"simulated sensors, line {lineno}: {key} given twice")
            spec[key] = value
        try:
            sensor = simulated_sensor(spec)
        except ValueError as e:
            raise ValueError(f"simulated sensors, line {lineno}: {e}") from None
        if sensor.info.id in seen:
            raise ValueError(f"simulated sensors, line {lineno}: duplicate id {sensor.info.id}")
        seen.add(sensor.info.id)
        sensors.append(sensor)
    return sensors


DEFAULT_SIMULATED = """\
id=sim.temperature label=Temperature unit=°C hz=1 model=sine amplitude=3 period=300 offset=21 noise=0.15
id=sim.humidity label=Humidity unit=% hz=1 model=walk start=45 step=0.4 lo=20 hi=90
id=sim.pressure label=Pressure unit=hPa hz=0.5 model=walk start=1013 step=0.3 lo=980 hi=1040
id=sim.vibration label=Vibration unit=mm/s hz=10 model=sine amplitude=2 period=1.7 offset=4 noise=0.6
id=sim.power label="Power draw" unit=W hz=2 model=square amplitude=350 period=90 duty=0.35 offset=900 noise=25
id=sim.tank label="Tank level" unit=% hz=1 model=sawtooth amplitude=40 period=240 offset=50 noise=0.5
"""
"""The default ``simulated_sensors`` option: six streams, one of them at 10 Hz,
so that a fresh install's dashboard is alive."""


class SimulatedFeed:
    """Samples simulated sensors on their own grids; driven by one timer.

    Each sensor is sampled at the times ``k / rate_hz`` (integer ``k``), so
    timestamps are evenly spaced whatever the timer's jitter, and sensors of
    different rates share one tick: call :meth:`tick` at least ``max_rate_hz``
    times a second and each sensor yields the samples that fell due.

    After a stall (a blocked event loop, a suspended laptop) at most
    ``max_catchup_s`` seconds of samples are produced; older ones are skipped.
    """

    def __init__(self, sensors: Iterable[SimulatedSensor], *, max_catchup_s: float = 5.0) -> None:
        self.sensors = list(sensors)
        self.max_catchup_s = float(max_catchup_s)
        self._next_k: dict[str, int] = {}

    @property
    def infos(self) -> list[SensorInfo]:
        return [s.info for s in self.sensors]

    @property
    def max_rate_hz(self) -> float:
        """The fastest sensor's rate (0.0 with no sensors): the tick rate to use."""
        return max((s.info.rate_hz for s in self.sensors), default=0.0)

    def _run(self, sensor: SimulatedSensor, first_k: int, last_k: int) -> list[Point]:
        hz = sensor.info.rate_hz
        sample = sensor.model.sample
        out: list[Point] = []
        for k in range(first_k, last_k + 1):
            t = k / hz
            out.append((t, sample(t)))
        self._next_k[sensor.info.id] = max(last_k + 1, first_k)
        return out

    def prime(self, now: float, history_s: float) -> dict[str, list[Point]]:
        """Samples in ``(now - history_s, now]``, so that the ring buffers start
        full.  Call once, before the first :meth:`tick`."""
        if self._next_k:
            raise RuntimeError("prime() must come before the first tick()")
        out: dict[str, list[Point]] = {}
        for s in self.sensors:
            hz = s.info.rate_hz
            first_k = math.floor((now - history_s) * hz) + 1
            out[s.info.id] = self._run(s, first_k, math.floor(now * hz))
        return out

    def tick(self, now: float) -> dict[str, list[Point]]:
        """Samples due since the last tick, per sensor, in time order.  Sensors
        with nothing due are left out; the first tick yields one sample each."""
        out: dict[str, list[Point]] = {}
        for s in self.sensors:
            hz = s.info.rate_hz
            last_k = math.floor(now * hz)
            first_k = self._next_k.get(s.info.id, last_k)
            first_k = max(first_k, math.ceil((now - self.max_catchup_s) * hz))
            if first_k <= last_k:
                out[s.info.id] = self._run(s, first_k, last_k)
        return out


# -- host measurements -------------------------------------------------------


class HostMetrics:
    """This host's own measurements, from psutil, as a feed.

    :meth:`sample` returns ``{sensor_id: value}``:

    ========================  =====================================  =====
    ``<prefix>.cpu``          CPU busy, all cores, since last sample  %
    ``<prefix>.mem``          memory in use                           %
    ``<prefix>.load1``        load average over 1 minute              --
    ``<prefix>.net_rx``       bytes received per second, non-loopback B/s
    ``<prefix>.net_tx``       bytes sent per second, non-loopback     B/s
    ========================  =====================================  =====

    CPU and network are rates over the time since the previous call (the first
    call measures from construction); a metric that cannot be computed yet, or
    that the platform lacks, is left out rather than reported as a made-up 0.
    Cheap enough for 1 Hz: a handful of reads of ``/proc`` on Linux.  Keeps its
    own counters, so it does not disturb (or get disturbed by) other callers of
    ``psutil.cpu_percent``.  ``prefix`` lets each node of a cluster publish its
    own ``node2.cpu``.
    """

    def __init__(self, *, prefix: str = "host", rate_hz: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, ps: Any = None) -> None:
        if ps is None:
            import psutil

            ps = psutil
        self._ps = ps
        self._clock = clock
        p = prefix
        self.ids = {"cpu": p + ".cpu", "mem": p + ".mem", "load1": p + ".load1",
                    "net_rx": p + ".net_rx", "net_tx": p + ".net_tx"}
        self.infos = [
            SensorInfo(self.ids["cpu"], "CPU", "%", rate_hz, "host"),
            SensorInfo(self.ids["mem"], "Memory used", "%", rate_hz, "host"),
            SensorInfo(self.ids["load1"], "Load average (1 min)", "", rate_hz, "host"),
            SensorInfo(self.ids["net_rx"], "Network received", "B/s", rate_hz, "host"),
            SensorInfo(self.ids["net_tx"], "Network sent", "B/s", rate_hz, "host"),
        ]
        self._loopback = self._find_loopback()
        self._cpu = self._cpu_totals()
        self._net = self._net_totals()
        self._stamp = clock()

    def _find_loopback(self) -> set[str]:
        names: set[str] = set()
        try:
            for name, st in self._ps.net_if_stats().items():
                if "loopback" in getattr(st, "flags", "").split(","):
                    names.add(name)
        except (OSError, AttributeError):
            pass
        return names

    def _is_loopback(self, name: str) -> bool:
        return name in self._loopback or name in ("lo", "lo0") or "loopback" in name.lower()

    def _cpu_totals(self) -> tuple[float, float] | None:
        """(all time, idle time) in seconds, summed over cores."""
        try:
            ct = self._ps.cpu_times()
        except (OSError, AttributeError):
            return None
        total = sum(ct)
        # guest time is already counted in user/nice on Linux
        total -= getattr(ct, "guest", 0.0) + getattr(ct, "guest_nice", 0.0)
        idle = ct.idle + getattr(ct, "iowait", 0.0)
        return total, idle

    def _net_totals(self) -> tuple[int, int] | None:
        """(bytes received, bytes sent) over non-loopback interfaces."""
        try:
            per_nic = self._ps.net_io_counters(pernic=True)
        except (OSError, AttributeError, RuntimeError):
            return None
        rx = tx = 0
        for name, c in per_nic.items():
            if not self._is_loopback(name):
                rx += c.bytes_recv
                tx += c.bytes_sent
        return rx, tx

    def sample(self) -> dict[str, float]:
        """The current measurements (finite floats), keyed by sensor id."""
        now = self._clock()
        dt = now - self._stamp
        self._stamp = now
        out: dict[str, float] = {}

        cpu = self._cpu_totals()
        if cpu is not None and self._cpu is not None:
            d_total = cpu[0] - self._cpu[0]
            d_idle = cpu[1] - self._cpu[1]
            if d_total > 0:
                out[self.ids["cpu"]] = min(max(100.0 * (d_total - d_idle) / d_total, 0.0), 100.0)
        self._cpu = cpu

        try:
            out[self.ids["mem"]] = float(self._ps.virtual_memory().percent)
        except (OSError, AttributeError):
            pass

        try:
            out[self.ids["load1"]] = float(self._ps.getloadavg()[0])
        except (OSError, AttributeError):
            pass

        net = self._net_totals()
        if net is not None and self._net is not None and dt > 0:
            d_rx = net[0] - self._net[0]
            d_tx = net[1] - self._net[1]
            # A negative delta means an interface went away: skip one sample.
            if d_rx >= 0 and d_tx >= 0:
                out[self.ids["net_rx"]] = d_rx / dt
                out[self.ids["net_tx"]] = d_tx / dt
        self._net = net

        return {k: v for k, v in out.items() if math.isfinite(v)}
