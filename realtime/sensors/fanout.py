"""Sensor fan-out, with no I/O: who watches which sensor, at what rate.

:class:`Fanout` turns points into ``readings`` messages: viewers with the same
subscription and rate form a group that shares one conflator, one rate gate
and one encoded message per send; a member whose connection is backlogged is
detached to its own conflator until it drains (the contracts are in
:mod:`realtime.sensors`).  Time is passed in; the only call out is
``conn.deliver``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from realtime.feeds import Conflator, Point, RateGate, clamp_hz
from realtime.protocol import Outgoing


def thin(points: list[Point], n: int) -> list[Point]:
    """At most ``n`` of ``points``, evenly spread, always keeping the first and
    the newest (a chart of the whole span, not just its end)."""
    m = len(points)
    if m <= n:
        return points
    if n <= 1:
        return points[-1:]
    step = (m - 1) / (n - 1)
    return [points[round(i * step)] for i in range(n)]


# -- fan-out -------------------------------------------------------------------


class ViewerConn(Protocol):
    """What fan-out needs from a connection (``handlers.base.BaseSocketHandler`` has it)."""

    def deliver(self, out: Outgoing) -> None: ...

    def buffered_bytes(self) -> int: ...


class Viewer:
    """One connection to ``/ws/sensors``: its subscription and rate.

    ``own`` is its private conflator while it is detached from its group
    (joining, or too slow to be sent the group's message); ``None`` while it
    is a member that is keeping up."""

    __slots__ = ("conn", "group", "hz", "ids", "own", "publisher", "wild")

    def __init__(self, conn: ViewerConn, hz: float) -> None:
        self.conn = conn
        self.publisher = False  # presented the ingest key (a token's publish role is checked per publish)
        self.wild = False
        self.ids: frozenset[str] = frozenset()
        self.hz = hz
        self.group: _Group | None = None
        self.own: Conflator | None = None

    @property
    def subscribed(self) -> bool:
        return self.wild or bool(self.ids)

    def subscription(self) -> list[str]:
        return ["*"] if self.wild else sorted(self.ids)


GroupKey = tuple[bool, frozenset[str], float]


class _Group:
    """Viewers with one subscription and one rate: one conflator, one gate,
    one encoded message per send for every member that keeps up."""

    __slots__ = ("detached", "gate", "hz", "ids", "key", "members", "pending", "wild")

    def __init__(self, key: GroupKey, conflate_points: int, min_hz: float, max_hz: float) -> None:
        self.key = key
        self.wild, self.ids, self.hz = key
        self.gate = RateGate(self.hz, min_hz=min_hz, ceiling_hz=max_hz)
        self.pending = Conflator(conflate_points)
        self.members: dict[Viewer, None] = {}
        self.detached: dict[Viewer, None] = {}


class Fanout:
    """Who watches which sensor, at what rate; turns points into ``readings``
    messages.  Pure apart from calling ``conn.deliver``: time is passed in.

    Call :meth:`push` as points arrive and :meth:`run` on every tick.
    """

    def __init__(self, *, conflate_points: int = 100, backlog_bytes: int = 256 * 1024,
                 min_hz: float = 0.1, max_hz: float = 20.0) -> None:
        self.conflate_points = conflate_points
        self.backlog_bytes = backlog_bytes
        self.min_hz = min_hz
        self.max_hz = max_hz
        self._groups: dict[GroupKey, _Group] = {}
        self._by_sensor: dict[str, set[_Group]] = {}
        self._wild: set[_Group] = set()
        self._dirty: set[_Group] = set()
        # counters for /metrics and the benchmark
        self.messages = 0  # readings messages handed to connections
        self.encoded = 0  # readings messages encoded
        self.detaches = 0  # times a member fell behind and was detached
        self.conflated = 0  # points thinned away (latest value always kept)

    # -- membership --------------------------------------------------------

    @property
    def groups(self) -> int:
        return len(self._groups)

    @property
    def behind(self) -> int:
        """Viewers currently detached (joining or catching up)."""
        return sum(len(g.detached) for g in self._groups.values())

    def clamp(self, hz: float) -> float:
        return clamp_hz(hz, self.min_hz, self.max_hz)

    def set_subscription(self, viewer: Viewer, *, wild: bool, ids: Iterable[str], hz: float,
                         carry: Iterable[str] = ()) -> None:
        """Give ``viewer`` this subscription and rate.

        Points already pending for the viewer's sensors in ``carry`` follow it;
        the rest of its pending points are dropped (the caller sends those
        sensors' backfill instead, or they were unsubscribed).  The viewer
        starts detached, with its own conflator, and joins its group's members
        at the group's next send: it never gets a point twice, and never one
        from before it subscribed unless carried."""
        carried: dict[str, list[Point]] = {}
        if viewer.group is not None:
            src = viewer.own if viewer.own is not None else viewer.group.pending
            carried = src.peek(carry)
            self._remove(viewer)
        hz = self.clamp(hz)
        idset = frozenset() if wild else frozenset(ids)
        viewer.wild, viewer.ids, viewer.hz = wild, idset, hz
        viewer.own = None
        if not wild and not idset:
            return
        group = self._group((wild, idset, hz))
        own = Conflator(self.conflate_points)
        for sid, pts in carried.items():
            own.add(sid, pts)
        viewer.own = own
        viewer.group = group
        group.detached[viewer] = None
        self._dirty.add(group)

    def leave(self, viewer: Viewer) -> None:
        """The viewer is gone (or unsubscribed from everything)."""
        if viewer.group is not None:
            self._remove(viewer)
        viewer.own = None
        viewer.wild, viewer.ids = False, frozenset()

    def _group(self, key: GroupKey) -> _Group:
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(key, self.conflate_points, self.min_hz, self.max_hz)
            if group.wild:
                self._wild.add(group)
            else:
                for sid in group.ids:
                    self._by_sensor.setdefault(sid, set()).add(group)
        return group

    def _remove(self, viewer: Viewer) -> None:
        group = viewer.group
        viewer.group = None
        if group is None:
            return
        group.members.pop(viewer, None)
        group.detached.pop(viewer, None)
        if group.members or group.detached:
            return
        del self._groups[group.key]
        self._dirty.discard(group)
        if group.wild:
            self._wild.discard(group)
        else:
            for sid in group.ids:
                groups = self._by_sensor.get(sid)
                if groups is not None:
                    groups.discard(group)
                    if not groups:
                        del self._by_sensor[sid]

    def viewers_of(self, sensor_id: str) -> list[Viewer]:
        """Viewers subscribed to ``sensor_id`` by name (not by ``*``)."""
        out: list[Viewer] = []
        for group in self._by_sensor.get(sensor_id, ()):
            out.extend(group.members)
            out.extend(group.detached)
        return out

    # -- data ----------------------------------------------------------------

    def push(self, sensor_id: str, points: list[Point]) -> None:
        """New points of one sensor, in time order, for everyone watching it."""
        if not points:
            return
        groups = self._by_sensor.get(sensor_id)
        if groups:
            for group in groups:
                self._push(group, sensor_id, points)
        for group in self._wild:
            self._push(group, sensor_id, points)

    def _push(self, group: _Group, sensor_id: str, points: list[Point]) -> None:
        group.pending.add(sensor_id, points)
        for viewer in group.detached:
            own = viewer.own
            if own is not None:
                own.add(sensor_id, points)
        self._dirty.add(group)

    def forget_sensor(self, sensor_id: str) -> None:
        """The sensor went away: drop its pending points.  Viewers that named it
        keep the rest of their subscription (``*`` viewers keep ``*``)."""
        for group in self._wild:
            group.pending.discard(sensor_id)
            for viewer in group.detached:
                if viewer.own is not None:
                    viewer.own.discard(sensor_id)
        for viewer in self.viewers_of(sensor_id):
            rest = viewer.ids - {sensor_id}
            self.set_subscription(viewer, wild=False, ids=rest, hz=viewer.hz, carry=rest)

    @property
    def busy(self) -> bool:
        """Whether :meth:`run` has anything to do."""
        return bool(self._dirty)

    def run(self, now: float) -> int:
        """Send every group that is due its ``readings`` message; return how many
        messages went out."""
        sent_total = 0
        limit = self.backlog_bytes
        for group in list(self._dirty):
            if not group.gate.due(now):
                continue
            sent = False
            pending = group.pending
            dropped = pending.dropped
            batch = pending.take()
            if batch is not None and group.members:
                conflated = pending.dropped - dropped
                self.conflated += conflated
                out = Outgoing(_readings(now, batch, conflated))
                self.encoded += 1
                behind: list[Viewer] = []
                delivered = 0
                for viewer in tuple(group.members):
                    conn = viewer.conn
                    if conn.buffered_bytes() > limit:
                        behind.append(viewer)
                    else:
                        conn.deliver(out)
                        delivered += 1
                sent_total += delivered
                sent = delivered > 0
                for viewer in behind:
                    # It missed this message: keep it, conflated, in its own buffer.
                    missed = Conflator(self.conflate_points)
                    for sid, pts in batch.items():
                        missed.add(sid, [(p[0], p[1]) for p in pts])
                    viewer.own = missed
                    del group.members[viewer]
                    group.detached[viewer] = None
                    self.detaches += 1
            if group.detached:
                for viewer in tuple(group.detached):
                    conn = viewer.conn
                    if conn.buffered_bytes() > limit:
                        continue  # still draining: keep conflating
                    own = viewer.own
                    if own is not None:
                        dropped = own.dropped
                        data = own.take()
                        if data is not None:
                            conflated = own.dropped - dropped
                            self.conflated += conflated
                            conn.deliver(Outgoing(_readings(now, data, conflated)))
                            self.encoded += 1
                            sent_total += 1
                            sent = True
                    # Caught up: the group's pending is empty (it was just taken),
                    # and so is this viewer's; from now on they are the same.
                    viewer.own = None
                    del group.detached[viewer]
                    group.members[viewer] = None
            if sent:
                group.gate.sent(now)
            if not group.detached:
                self._dirty.discard(group)
        self.messages += sent_total
        return sent_total


def _readings(now: float, points: dict[str, Any], conflated: int) -> dict[str, Any]:
    msg: dict[str, Any] = {"type": "readings", "ts": now, "points": points}
    if conflated:
        msg["conflated"] = conflated
    return msg
