"""What one viewer has not been sent yet, and when it may be sent it.

:class:`Conflator` holds, per viewer, what arrived since that viewer's last
message, bounded per sensor; :class:`RateGate` says when the viewer may get its
next message.  A slow viewer therefore costs bounded memory and gets a thinned
but faithful picture instead of an ever-growing backlog.  Time is passed in.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from realtime.feeds.points import Point


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
