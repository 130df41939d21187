"""Sensor streaming: the registry, the feeds' timers, device ingest and fan-out.

The pure pieces (ring buffers, validation, conflation, rate gates, simulated
models, host metrics) live in :mod:`realtime.feeds`; this module wires them to
timers, SQLite and connections.  It imports nothing from ``tornado.web``.

Contracts:

* **Timers.**  One ``PeriodicCallback`` per feed (the simulated sensors, this
  host's measurements) and one delivery timer for every viewer, plus a slow
  maintenance timer.  Never one timer per viewer.
* **Durable ingest.**  Readings a device pushes are validated (all or nothing),
  written to SQLite, and acknowledged (HTTP 200 / ``ack``) only after the
  transaction has committed.  Only then do they enter the sensor's ring buffer
  and reach viewers, so nothing a viewer saw is lost by a ``kill -9``.  On start
  the stored readings of the last ``window_s`` seconds refill the ring buffers.
* **Rate.**  A viewer gets at most ``max_hz`` ``readings`` messages a second
  (:class:`~realtime.feeds.RateGate`: at most ``duration * hz + 2`` over any
  stretch), each carrying everything that arrived for its subscriptions since
  its previous message, and the server time ``ts`` of the tick that sent it.
* **Shared encoding.**  Viewers with the same subscription and rate form a
  group; a group's members that are keeping up share one encoded message per
  tick, so 1,000 identical dashboards cost one ``json.dumps`` per tick.
* **Slow viewers conflate, never queue.**  A member whose connection holds more
  than ``backlog_bytes`` unflushed bytes is detached from its group: what it
  misses goes into its own bounded :class:`~realtime.feeds.Conflator` (at most
  ``conflate_points`` points per sensor, evenly thinned, newest kept) until it
  drains; then it gets one catch-up message and rejoins.  It is never closed
  for being slow and never delays the others.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from tornado.ioloop import IOLoop, PeriodicCallback

from realtime.feeds import (
    DEFAULT_SIMULATED,
    MAX_LABEL_LEN,
    MAX_RATE_HZ,
    MAX_UNIT_LEN,
    Conflator,
    HostMetrics,
    Point,
    RateGate,
    RingBuffer,
    SensorInfo,
    SimulatedFeed,
    clamp_hz,
    parse_sensor_specs,
    valid_sensor_id,
    validate_points,
)
from realtime.hub import Hub
from realtime.protocol import Outgoing, ProtocolError, has_control_chars
from realtime.storage.base import Lease, ReadingStore, SensorRow, StorageError, StoreBusy

log = logging.getLogger("realtime.sensors")

ID_RULE = "sensor ids are 1-64 characters of A-Z a-z 0-9 _ . : -"


@dataclass(frozen=True)
class SensorConfig:
    """Every knob of the sensor app; ``handlers/sensors.py`` fills it from options."""

    window_s: float = 600.0
    max_points: int = 10_000
    simulated: str = DEFAULT_SIMULATED
    host_metrics: bool = True
    host_metrics_hz: float = 1.0
    host_prefix: str = "host"
    ingest_key: str = ""
    max_points_per_publish: int = 1000
    max_sensors: int = 1000
    min_hz: float = 0.1
    max_hz: float = 20.0
    default_hz: float = 10.0
    conflate_points: int = 100
    max_subscriptions: int = 100
    max_backfill_points: int = 2000
    backlog_bytes: int = 256 * 1024
    max_future_s: float = 60.0
    expiry_s: float = 0.0
    maintenance_s: float = 30.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.window_s) and self.window_s > 0):
            raise ValueError("sensor_window must be a positive number of seconds")
        if not 0 < self.min_hz <= self.max_hz <= 1000:
            raise ValueError("need 0 < viewer_min_hz <= viewer_max_hz <= 1000")
        if not self.host_metrics_hz > 0:
            raise ValueError("host_metrics_hz must be > 0")
        for name in ("max_points", "max_points_per_publish", "conflate_points", "max_subscriptions",
                     "max_backfill_points", "backlog_bytes"):
            if getattr(self, name) < 1:
                raise ValueError("%s must be at least 1" % name)
        if self.max_sensors < 0 or self.expiry_s < 0 or self.max_future_s < 0:
            raise ValueError("max_sensors, sensor_expiry and ingest_max_future must be >= 0")


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


# -- the service ---------------------------------------------------------------


class Sensor:
    """One stream this server knows: what it is, and its recent points."""

    __slots__ = ("info", "last_ingest", "ring")

    def __init__(self, info: SensorInfo, ring: RingBuffer) -> None:
        self.info = info
        self.ring = ring
        self.last_ingest = 0.0  # wall time of the last reading (device expiry)

    def to_json(self) -> dict[str, Any]:
        d = self.info.to_json()
        latest = self.ring.latest()
        d["latest"] = list(latest) if latest is not None else None
        return d


SENSOR_TOPIC = "sensors"  # device readings and sensor changes, between nodes


class _Bus:
    """The sensor service's subscription to :data:`SENSOR_TOPIC`: device readings
    and sensor changes committed on any node reach every node's registry,
    ring buffers and viewers through it (as data: each node conflates for its
    own viewers)."""

    __slots__ = ("service",)

    def __init__(self, service: "SensorService") -> None:
        self.service = service

    def deliver(self, out: Outgoing) -> None:
        self.service._on_bus(out.obj)


class SensorService:
    """The sensor app: registry, feeds, ingest, viewers.

    Viewer API (called by the socket handler): :meth:`attach`, :meth:`detach`,
    :meth:`subscribe`, :meth:`unsubscribe`.  Device API (socket and HTTP):
    :meth:`check_key`, :meth:`publish`, :meth:`set_meta`, :meth:`delete`.
    """

    def __init__(self, readings: ReadingStore, cfg: SensorConfig, *, hub: Hub | None = None,
                 clock: Callable[[], float] = time.time, host: HostMetrics | None = None,
                 lease: Callable[[str], Lease] | None = None, node_name: str = "") -> None:
        self.readings_store = readings
        self.cfg = cfg
        self.clock = clock
        if hub is None:
            from realtime.backplane.memory import MemoryBackplane

            hub = Hub(MemoryBackplane())
        self.hub = hub
        self._bus = _Bus(self)
        # Cluster mode: the simulated sensors run on one node for the whole
        # cluster, and each machine's metrics on one of its processes; whoever
        # holds the lease sends the points to every node over the hub.
        self._sim_lease = lease("sim") if lease is not None else None
        self._host_lease = lease("host:" + node_name) if lease is not None else None
        self.remote_host_expiry = 30.0  # other machines' metrics vanish after this long without points
        self.fanout = Fanout(conflate_points=cfg.conflate_points, backlog_bytes=cfg.backlog_bytes,
                             min_hz=cfg.min_hz, max_hz=cfg.max_hz)
        self._sensors: dict[str, Sensor] = {}
        self._viewers: dict[Viewer, None] = {}
        self._creating: dict[str, int] = {}  # device sensors being created (write in flight)
        self._timers: list[PeriodicCallback] = []
        self._handles: list[object] = []
        self._kick_scheduled = False
        self._maintaining: asyncio.Task[None] | None = None
        self.started = False
        # counters
        self.points_in: dict[str, int] = {"simulated": 0, "host": 0, "device": 0}
        self.publishes = 0
        self.ticks = 0

        self.sim = SimulatedFeed(parse_sensor_specs(cfg.simulated))
        for s in self.sim.sensors:
            self._add(s.info)
        self.host = host
        if self.host is None and cfg.host_metrics:
            self.host = HostMetrics(prefix=cfg.host_prefix, rate_hz=cfg.host_metrics_hz)
        if self.host is not None:
            for info in self.host.infos:
                if info.id in self._sensors:
                    raise ValueError("host metric %s clashes with a simulated sensor id" % info.id)
                self._add(info)

    # -- registry ------------------------------------------------------------

    def _add(self, info: SensorInfo) -> Sensor:
        sensor = Sensor(info, RingBuffer(self.cfg.window_s, self.cfg.max_points))
        self._sensors[info.id] = sensor
        return sensor

    def get(self, sensor_id: str) -> Sensor | None:
        return self._sensors.get(sensor_id)

    def sensors(self) -> list[Sensor]:
        return list(self._sensors.values())

    def infos(self) -> list[dict[str, Any]]:
        return [s.info.to_json() for s in self._sensors.values()]

    @property
    def device_count(self) -> int:
        return sum(1 for s in self._sensors.values() if s.info.kind == "device")

    def readings(self, sensor_id: str, since: float | None, limit: int) -> dict[str, Any]:
        """``GET /api/sensors/<id>/readings``: from the ring buffer.  With
        ``since``: the oldest ``limit`` points after it (page forward with the
        last ``t``); without: the newest ``limit`` points."""
        sensor = self.require(sensor_id)
        if since is None:
            pts = list(sensor.ring)[-limit:] if limit < len(sensor.ring) else list(sensor.ring)
            more = len(sensor.ring) > limit
        else:
            after = sensor.ring.since(since)
            pts, more = after[:limit], len(after) > limit
        return {"sensor": sensor_id, "points": [[t, v] for t, v in pts], "more": more}

    def require(self, sensor_id: str) -> Sensor:
        if not valid_sensor_id(sensor_id):
            raise ProtocolError("bad_message", ID_RULE)
        sensor = self._sensors.get(sensor_id)
        if sensor is None:
            raise ProtocolError("not_found", "no sensor %s" % sensor_id)
        return sensor

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Refill device sensors from SQLite, prime the simulated ones, start the timers."""
        now = self.clock()
        cfg = self.cfg
        await self.hub.subscribe(SENSOR_TOPIC, self._bus)
        for lease in (self._sim_lease, self._host_lease):
            if lease is not None:
                await lease.start()
        loaded = await self.readings_store.load(now - cfg.window_s, cfg.max_points)
        for (sid, label, unit, rate_hz), points in loaded:
            if sid in self._sensors:
                log.warning("stored device sensor %s is shadowed by a configured sensor; its readings are ignored",
                            sid)
                continue
            try:
                info = SensorInfo(sid, label, unit, rate_hz, "device")
            except ValueError as e:
                log.warning("skipping stored sensor: %s", e)
                continue
            sensor = self._add(info)
            sensor.ring.extend(points)
            sensor.last_ingest = points[-1][0] if points else now
        if self.sim.sensors:
            # No more history than the ring buffers keep (a 1 kHz sensor fills them in 10 s).
            history = min(cfg.window_s, cfg.max_points / self.sim.max_rate_hz)
            for sid, points in self.sim.prime(now, history).items():
                self._sensors[sid].ring.extend(points)
        loop = IOLoop.current()
        if self.sim.sensors:
            tick_hz = min(self.sim.max_rate_hz, 100.0)
            self._start_aligned(loop, PeriodicCallback(self._sim_tick, 1000.0 / tick_hz), tick_hz)
        if self.host is not None:
            self.host.sample()  # the first sample only sets the baselines
            hz = cfg.host_metrics_hz
            self._start_aligned(loop, PeriodicCallback(self._host_tick, 1000.0 / hz), hz)
        self._start_aligned(loop, PeriodicCallback(self._deliver_tick, 1000.0 / cfg.max_hz), cfg.max_hz)
        maint = PeriodicCallback(self._maintain, 1000.0 * cfg.maintenance_s)
        maint.start()
        self._timers.append(maint)
        self.started = True

    def _start_aligned(self, loop: IOLoop, pc: PeriodicCallback, hz: float) -> None:
        """Start ``pc`` just after a multiple of ``1/hz`` of the wall clock: the
        simulated sensors sample on that grid, so each tick finds fresh samples."""
        self._timers.append(pc)
        now = self.clock()
        delay = (math.floor(now * hz) + 1) / hz - now + 0.002
        self._handles.append(loop.call_later(delay, pc.start))

    async def stop(self) -> None:
        loop = IOLoop.current()
        for handle in self._handles:
            loop.remove_timeout(handle)
        for pc in self._timers:
            pc.stop()
        self._timers.clear()
        self._handles.clear()
        self.hub.unsubscribe(SENSOR_TOPIC, self._bus)
        for lease in (self._sim_lease, self._host_lease):
            if lease is not None:
                await lease.stop()
        if self._maintaining is not None and not self._maintaining.done():
            try:
                await self._maintaining
            except Exception:  # logged by _maintenance_pass
                pass

    # -- feeds -----------------------------------------------------------------

    def _sim_tick(self) -> None:
        if self._sim_lease is not None and not self._sim_lease.held:
            return  # another node runs them; its points arrive over the hub
        now = self.clock()
        self.ticks += 1
        points = self.sim.tick(now)
        if self._sim_lease is not None:
            self.hub.publish(SENSOR_TOPIC, {"type": "feed", "kind": "simulated",
                                            "points": {sid: pts for sid, pts in points.items() if pts}})
            return
        self._feed("simulated", points, now)

    def _host_tick(self) -> None:
        assert self.host is not None
        if self._host_lease is not None and not self._host_lease.held:
            return  # another process of this machine reports it
        now = self.clock()
        try:
            values = self.host.sample()
        except Exception:
            log.exception("host metrics failed")
            return
        points = {sid: [(now, v)] for sid, v in values.items()}
        if self._host_lease is not None:
            self.hub.publish(SENSOR_TOPIC, {"type": "feed", "kind": "host", "points": points,
                                            "sensors": [i.to_json() for i in self.host.infos]})
            return
        self._feed("host", points, now)

    def _feed(self, kind: str, points: dict[str, list[Point]], now: float) -> None:
        n = 0
        for sid, pts in points.items():
            sensor = self._sensors.get(sid)
            if sensor is None or sensor.info.kind != kind:
                continue
            sensor.ring.extend(pts)
            sensor.last_ingest = now
            self.fanout.push(sid, pts)
            n += len(pts)
        self.points_in[kind] += n
        if self.fanout.busy:
            self.fanout.run(now)

    def _remote_feed(self, msg: dict[str, Any]) -> None:
        """Points of a feed another node (or this one) runs for the cluster."""
        kind = msg["kind"]
        if kind not in ("simulated", "host"):
            return
        for d in msg.get("sensors", ()):  # another machine's metrics: known from their first points
            if d["id"] not in self._sensors:
                info = SensorInfo(d["id"], d["label"], d["unit"], float(d["rate_hz"]), "host")
                self._add(info).last_ingest = self.clock()
                self._announce({"type": "sensor_added", "sensor": info.to_json()})
        points = {sid: [(float(t), float(v)) for t, v in pts] for sid, pts in msg["points"].items()}
        self._feed(kind, points, self.clock())

    def _deliver_tick(self) -> None:
        if self.fanout.busy:
            self.fanout.run(self.clock())

    def _kick(self) -> None:
        """Run a delivery pass soon (once, however many commits land meanwhile)."""
        if self._kick_scheduled:
            return
        self._kick_scheduled = True

        def run() -> None:
            self._kick_scheduled = False
            self._deliver_tick()

        asyncio.get_running_loop().call_soon(run)

    # -- viewers ---------------------------------------------------------------

    def attach(self, viewer: Viewer) -> Viewer:
        """Start telling this connection about sensors (``sensor_added`` ...)."""
        self._viewers[viewer] = None
        return viewer

    def detach(self, viewer: Viewer) -> None:
        self.fanout.leave(viewer)
        self._viewers.pop(viewer, None)

    def welcome(self, *, can_publish: bool) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "type": "welcome",
            "sensors": self.infos(),
            "server_time": self.clock(),
            "can_publish": can_publish,
            "limits": {
                "min_hz": cfg.min_hz, "max_hz": cfg.max_hz, "default_hz": self.fanout.clamp(cfg.default_hz),
                "window": cfg.window_s, "max_subscriptions": cfg.max_subscriptions,
                "max_backfill_points": cfg.max_backfill_points,
                "max_points_per_publish": cfg.max_points_per_publish,
            },
        }

    def _check_ids(self, raw: Any, what: str) -> list[str]:
        if not isinstance(raw, list):
            raise ProtocolError("bad_message", "'sensors' must be a list of sensor ids, or [\"*\"]")
        limit = max(self.cfg.max_subscriptions, 1)
        if len(raw) > limit:
            raise ProtocolError("too_large", "at most %d sensors per %s" % (limit, what))
        ids: list[str] = []
        for item in raw:
            if item == "*":
                ids.append(item)
            elif not valid_sensor_id(item):
                raise ProtocolError("bad_message", "%r is not a sensor id (%s)" % (str(item)[:70], ID_RULE))
            else:
                ids.append(item)
        return ids

    def subscribe(self, viewer: Viewer, raw_ids: Any, max_hz: float | None, backfill: float
                  ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Add sensors (``["*"]``: all, now and later) to the viewer's
        subscription and/or change its rate.  Returns the ``subscribed`` reply
        and one ``backfill`` message per named sensor when ``backfill > 0``
        (the last ``backfill`` seconds, at most ``max_backfill_points`` points,
        evenly thinned).  All or nothing: an unknown sensor raises
        ``not_found`` and changes nothing."""
        ids = self._check_ids(raw_ids, "subscribe")
        wild = "*" in ids
        named = [i for i in dict.fromkeys(ids) if i != "*"]
        unknown = [i for i in named if i not in self._sensors]
        if unknown:
            raise ProtocolError("not_found", "unknown sensor%s: %s" % (
                "s" if len(unknown) > 1 else "", ", ".join(unknown[:10])))
        new_wild = viewer.wild or wild
        new_ids = frozenset() if new_wild else viewer.ids.union(named)
        if len(new_ids) > self.cfg.max_subscriptions:
            raise ProtocolError("too_large", "at most %d sensors per connection (or subscribe to \"*\")"
                                % self.cfg.max_subscriptions)
        if max_hz is not None and not max_hz > 0:
            raise ProtocolError("bad_message", "'max_hz' must be a number > 0")
        hz = self.fanout.clamp(max_hz) if max_hz is not None else viewer.hz
        requested = list(self._sensors) if wild else named
        current = set(self._sensors) if viewer.wild else set(viewer.ids)
        refill = set(requested) if backfill > 0 else set()
        self.fanout.set_subscription(viewer, wild=new_wild, ids=new_ids, hz=hz, carry=current - refill)
        now = self.clock()
        seconds = min(backfill, self.cfg.window_s)
        backfills = []
        if backfill > 0:
            for sid in requested:
                pts = thin(self._sensors[sid].ring.last(seconds, now), self.cfg.max_backfill_points)
                backfills.append({"type": "backfill", "sensor": sid, "points": [[t, v] for t, v in pts]})
        reply = {"type": "subscribed", "sensors": viewer.subscription(), "max_hz": viewer.hz}
        return reply, backfills

    def unsubscribe(self, viewer: Viewer, raw_ids: Any) -> dict[str, Any]:
        """Remove sensors (``["*"]``: everything).  Removing one sensor from a
        ``*`` subscription leaves the explicit list of all the others."""
        ids = self._check_ids(raw_ids, "unsubscribe")
        if "*" in ids:
            self.fanout.leave(viewer)
        else:
            base = set(self._sensors) if viewer.wild else set(viewer.ids)
            rest = base.difference(ids)
            if len(rest) > self.cfg.max_subscriptions:
                raise ProtocolError("too_large", "that would leave more than %d named sensors; unsubscribe "
                                    "from \"*\" and subscribe to the ones you want" % self.cfg.max_subscriptions)
            self.fanout.set_subscription(viewer, wild=False, ids=rest, hz=viewer.hz, carry=rest)
        return {"type": "unsubscribed", "sensors": viewer.subscription()}

    def _announce(self, msg: dict[str, Any]) -> None:
        out = Outgoing(msg)
        for viewer in self._viewers:
            viewer.conn.deliver(out)

    # -- devices -----------------------------------------------------------------

    def check_key(self, presented: str | None) -> bool:
        """Whether ``presented`` is the ingest key (constant-time comparison)."""
        key = self.cfg.ingest_key
        if not presented or not key:
            return False
        return hmac.compare_digest(presented.encode("utf-8", "replace"), key.encode("utf-8"))

    def _device_sensor(self, sensor_id: str, *, create: bool) -> Sensor | None:
        """The device sensor ``sensor_id`` (None if it does not exist yet and may be
        created); ProtocolError if it is configured, or no room is left."""
        if not valid_sensor_id(sensor_id):
            raise ProtocolError("bad_message", ID_RULE)
        sensor = self._sensors.get(sensor_id)
        if sensor is not None:
            if sensor.info.kind != "device":
                raise ProtocolError("conflict", "sensor %s is %s: this server feeds it, devices cannot"
                                    % (sensor_id, sensor.info.kind))
            return sensor
        if create and sensor_id not in self._creating:
            if self.device_count + len(self._creating) >= self.cfg.max_sensors:
                raise ProtocolError("too_large", "this server holds at most %d device sensors; delete some"
                                    % self.cfg.max_sensors)
        return None

    async def _write(self, write: Callable[[], Awaitable[Any]]) -> Any:
        try:
            return await write()
        except StoreBusy:
            raise ProtocolError("unavailable", "storage is busy; retry shortly") from None
        except StorageError as e:
            log.error("storing sensor data failed: %s", e)
            raise ProtocolError("unavailable", "the readings could not be stored; retry shortly") from None

    async def publish(self, sensor_id: str, raw: Any, *, now: float | None = None) -> int:
        """Store readings a device pushed; returns how many, after commit.

        ``raw`` is what :func:`~realtime.feeds.validate_points` accepts.  The
        sensor is created (and announced) on its first readings.  Nothing is
        stored if anything is wrong.  Once stored, the readings go to every
        node through the hub (this one at once)."""
        now = self.clock() if now is None else now
        sensor = self._device_sensor(sensor_id, create=True)
        points = validate_points(raw, now=now, max_points=self.cfg.max_points_per_publish,
                                 max_future_s=self.cfg.max_future_s, max_past_s=self.cfg.window_s)
        if not points:
            return 0
        info = sensor.info if sensor is not None else SensorInfo(sensor_id, sensor_id, "", 1.0, "device")
        meta = SensorRow(sensor_id, info.label, info.unit, info.rate_hz)
        await self._write_for(sensor_id, sensor is None, lambda: self.readings_store.append(meta, points, now))
        self.publishes += 1
        self.hub.publish(SENSOR_TOPIC, {"type": "points", "sensor": info.to_json(), "points": points})
        return len(points)

    async def _write_for(self, sensor_id: str, creating: bool, write: Callable[[], Awaitable[Any]]) -> None:
        """Commit ``write``; while a write that creates ``sensor_id`` is in flight,
        the id counts as being created, so max_sensors counts it too."""
        if not creating:
            await self._write(write)
            return
        self._creating[sensor_id] = self._creating.get(sensor_id, 0) + 1
        try:
            await self._write(write)
        finally:
            self._release(sensor_id)

    def _release(self, sensor_id: str) -> None:
        n = self._creating.get(sensor_id, 0) - 1
        if n > 0:
            self._creating[sensor_id] = n
        else:
            self._creating.pop(sensor_id, None)

    def _on_bus(self, msg: dict[str, Any]) -> None:
        """A committed change from some node (this one included)."""
        kind = msg.get("type")
        try:
            if kind == "points":
                self._committed(_info_of(msg["sensor"]), [(float(t), float(v)) for t, v in msg["points"]])
            elif kind == "meta":
                self._meta_committed(_info_of(msg["sensor"]))
            elif kind == "removed":
                self._removed(msg["sensor"], msg.get("reason", "deleted"))
            elif kind == "feed":
                self._remote_feed(msg)
        except (KeyError, TypeError, ValueError) as e:
            log.warning("ignoring a malformed sensor event %r: %s", kind, e)

    def _committed(self, info: SensorInfo, points: list[Point]) -> None:
        sensor_id = info.id
        sensor = self._sensors.get(sensor_id)
        if sensor is None:
            sensor = self._add(info)
            self._announce({"type": "sensor_added", "sensor": info.to_json()})
        elif sensor.info.kind != "device":
            return
        ring = sensor.ring
        kept = [p for p in points if ring.append(p[0], p[1])]
        sensor.last_ingest = self.clock()
        self.points_in["device"] += len(points)
        if kept:
            self.fanout.push(sensor_id, kept)
            self._kick()

    def _meta_committed(self, info: SensorInfo) -> None:
        current = self._sensors.get(info.id)
        if current is None:
            current = self._add(info)
            current.last_ingest = self.clock()
            self._announce({"type": "sensor_added", "sensor": info.to_json()})
        elif current.info.kind == "device" and current.info != info:
            current.info = info
            self._announce({"type": "sensor_updated", "sensor": info.to_json()})

    def _removed(self, sensor_id: str, reason: str, kind: str = "device") -> None:
        sensor = self._sensors.get(sensor_id)
        if sensor is None or sensor.info.kind != kind:
            return
        del self._sensors[sensor_id]
        self.fanout.forget_sensor(sensor_id)
        self._announce({"type": "sensor_removed", "sensor": sensor_id, "reason": reason})

    async def set_meta(self, sensor_id: str, body: Any) -> tuple[dict[str, Any], bool]:
        """Create or update a device sensor's label, unit and rate from
        ``{"label": .., "unit": .., "rate_hz": ..}`` (each optional).  Returns
        ``(sensor json, created)`` after commit; viewers get ``sensor_added`` or
        ``sensor_updated``."""
        sensor = self._device_sensor(sensor_id, create=True)
        if type(body) is not dict:
            raise ProtocolError("bad_message", 'send a JSON object: {"label": "...", "unit": "...", "rate_hz": 1}')
        extra = set(body) - {"label", "unit", "rate_hz"}
        if extra:
            raise ProtocolError("bad_message", "unknown key %r (expected label, unit, rate_hz)" % min(extra))
        old = sensor.info if sensor is not None else SensorInfo(sensor_id, sensor_id, "", 1.0, "device")
        label = body.get("label", old.label)
        unit = body.get("unit", old.unit)
        rate = body.get("rate_hz", old.rate_hz)
        for key, value, n in (("label", label, MAX_LABEL_LEN), ("unit", unit, MAX_UNIT_LEN)):
            if not isinstance(value, str):
                raise ProtocolError("bad_message", "'%s' must be a string" % key)
            if len(value) > n:
                raise ProtocolError("too_large", "'%s' is longer than %d characters" % (key, n))
            if has_control_chars(value, allowed=()) or "\n" in value or "\t" in value:
                raise ProtocolError("bad_message", "'%s' contains control characters" % key)
        if type(rate) not in (int, float) or not math.isfinite(rate) or not 0 < rate <= MAX_RATE_HZ:
            raise ProtocolError("bad_message", "'rate_hz' must be a number in (0, %g]" % MAX_RATE_HZ)
        info = SensorInfo(sensor_id, label.strip() or sensor_id, unit.strip(), float(rate), "device")
        now = self.clock()
        meta = SensorRow(sensor_id, info.label, info.unit, info.rate_hz)
        await self._write_for(sensor_id, sensor is None, lambda: self.readings_store.set_meta(meta, now))
        created = self._sensors.get(sensor_id) is None
        self.hub.publish(SENSOR_TOPIC, {"type": "meta", "sensor": info.to_json()})
        current = self._sensors.get(sensor_id)
        return (current.to_json() if current is not None else info.to_json()), created

    async def delete(self, sensor_id: str, *, reason: str = "deleted") -> None:
        """Remove a device sensor and its stored readings; viewers get
        ``sensor_removed``.  Configured sensors cannot be deleted (``conflict``)."""
        sensor = self.require(sensor_id)
        if sensor.info.kind != "device":
            raise ProtocolError("conflict", "sensor %s is %s: remove it from the configuration instead"
                                % (sensor_id, sensor.info.kind))

        await self._write(lambda: self.readings_store.delete(sensor_id))
        if self._sensors.get(sensor_id) is not sensor:
            return  # deleted (or deleted and re-created) meanwhile
        self.hub.publish(SENSOR_TOPIC, {"type": "removed", "sensor": sensor_id, "reason": reason})

    # -- maintenance ---------------------------------------------------------------

    def _maintain(self) -> None:
        if self._maintaining is None or self._maintaining.done():
            self._maintaining = asyncio.ensure_future(self._maintenance_pass())

    async def _maintenance_pass(self) -> None:
        """Trim stored readings to the window (and the point cap), expire silent
        device sensors, and trim rings of sensors that went quiet."""
        try:
            now = self.clock()
            cfg = self.cfg
            for sensor in self._sensors.values():
                sensor.ring.trim(now)
            devices = [s.info.id for s in self._sensors.values() if s.info.kind == "device"]
            if devices:
                await self._write(lambda: self.readings_store.trim(devices, now - cfg.window_s, cfg.max_points))
            own = set(self.host.ids.values()) if self.host is not None else set()
            for sid in [s.info.id for s in self._sensors.values() if s.info.kind == "host" and s.info.id not in own
                        and now - s.last_ingest > self.remote_host_expiry]:
                self._removed(sid, "expired", kind="host")  # that machine is gone
            if cfg.expiry_s > 0:
                stale = [s.info.id for s in self._sensors.values()
                         if s.info.kind == "device" and now - s.last_ingest > cfg.expiry_s]
                for sid in stale:
                    try:
                        await self.delete(sid, reason="expired")
                    except ProtocolError:
                        pass
        except Exception:
            log.exception("sensor maintenance failed")

    # -- metrics -----------------------------------------------------------------------

    def metrics(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        sensors = GaugeMetricFamily("realtime_sensors", "Sensors known, by kind", labels=["kind"])
        counts: dict[str, int] = {"simulated": 0, "host": 0, "device": 0}
        for s in self._sensors.values():
            counts[s.info.kind] = counts.get(s.info.kind, 0) + 1
        for kind, n in sorted(counts.items()):
            sensors.add_metric([kind], n)
        yield sensors
        points = CounterMetricFamily("realtime_sensor_points_ingested", "Sensor readings taken in, by kind",
                                     labels=["kind"])
        for kind, n in sorted(self.points_in.items()):
            points.add_metric([kind], n)
        yield points
        fan = self.fanout
        yield GaugeMetricFamily("realtime_sensor_viewers", "Connections to /ws/sensors", len(self._viewers))
        yield GaugeMetricFamily("realtime_sensor_groups", "Viewer groups (same subscription and rate)", fan.groups)
        yield GaugeMetricFamily("realtime_sensor_viewers_behind", "Viewers detached to catch up (slow or joining)",
                                fan.behind)
        yield CounterMetricFamily("realtime_sensor_batches", "readings messages sent to viewers", fan.messages)
        yield CounterMetricFamily("realtime_sensor_batches_encoded", "readings messages encoded", fan.encoded)
        yield CounterMetricFamily("realtime_sensor_points_conflated", "Points thinned away for slow viewers",
                                  fan.conflated)
        yield CounterMetricFamily("realtime_sensor_slow_viewer_events", "Times a viewer fell behind", fan.detaches)


def _info_of(d: dict[str, Any]) -> SensorInfo:
    return SensorInfo(d["id"], d["label"], d["unit"], float(d["rate_hz"]), "device")
