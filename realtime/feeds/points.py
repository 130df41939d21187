"""One sensor's stream: what it is, the points a device may push, the recent ones kept.

A point is a ``(t, v)`` tuple: ``t`` unix seconds, ``v`` a finite float.  Tuples
and lists encode to the same JSON array, ``[t, v]``.

* :class:`SensorInfo` (with :func:`valid_sensor_id`) describes a stream.
* :func:`validate_points` turns what a device pushed (over ``/ws/sensors`` or
  ``POST /api/sensors/<id>/readings``) into checked points, or raises
  :class:`~realtime.protocol.ProtocolError`.
* :class:`RingBuffer` keeps the recent points of one sensor, bounded by a time
  window *and* a point count, for backfill when a viewer opens a chart.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from operator import itemgetter
from typing import Any

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
