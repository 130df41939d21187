"""The sensor service: the registry, the feeds' timers, device ingest and storage.

:class:`SensorService` wires the pure pieces (:mod:`realtime.feeds`,
:mod:`realtime.sensors.fanout`) to timers, the reading store, the hub and
connections.  The contracts it keeps are in :mod:`realtime.sensors`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from tornado.ioloop import IOLoop, PeriodicCallback

from realtime.feeds import (
    DEFAULT_SIMULATED,
    MAX_LABEL_LEN,
    MAX_RATE_HZ,
    MAX_UNIT_LEN,
    HostMetrics,
    Point,
    RingBuffer,
    SensorInfo,
    SimulatedFeed,
    parse_sensor_specs,
    valid_sensor_id,
    validate_points,
)
from realtime.hub import Hub
from realtime.protocol import Outgoing, ProtocolError, has_control_chars
from realtime.sensors.fanout import Fanout, Viewer, thin
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
        self._refilled: set[tuple[str, float, float]] = set()  # put in the rings by resync(), not yet seen live
        on_resync = getattr(hub.backplane, "on_resync", None)
        if on_resync is not None:
            on_resync(self.resync)
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

    async def resync(self) -> None:
        """This node's subscription was lost and is back (cluster mode): the device
        readings other nodes committed meanwhile are in Redis, but pub/sub did not
        bring them here.  Take the points within the window that this node lacks as
        if they had just arrived (its viewers get them, its backfills include them);
        one of them that still arrives live afterwards is dropped, not doubled."""
        if not self.started:
            return
        try:
            loaded = await self.readings_store.load(self.clock() - self.cfg.window_s, self.cfg.max_points)
        except StorageError as e:
            log.warning("device readings missed while resubscribing could not be read: %s", e)
            return
        filled = 0
        for (sid, label, unit, rate_hz), points in loaded:
            sensor = self._sensors.get(sid)
            if sensor is not None and sensor.info.kind != "device":
                continue
            have = set(sensor.ring) if sensor is not None else set()
            missing = [p for p in points if p not in have]
            if sensor is not None and not missing:
                continue
            try:
                info = sensor.info if sensor is not None else SensorInfo(sid, label, unit, rate_hz, "device")
            except ValueError:
                continue
            self._committed(info, missing)
            self._refilled.update((sid, t, v) for t, v in missing)
            filled += len(missing)
        if filled:
            log.info("filled %d device readings missed while resubscribing", filled)
            asyncio.get_running_loop().call_later(10.0, self._refilled.clear)  # late copies come sooner

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
        msg = {"type": "points", "sensor": info.to_json(), "points": points}
        await self._write_for(sensor_id, sensor is None,
                              lambda: self.readings_store.append(meta, points, now, (SENSOR_TOPIC, msg)))
        self.publishes += 1
        if getattr(self.readings_store, "broadcasts", False):  # the other nodes have it from the write
            self.hub.dispatch(SENSOR_TOPIC, Outgoing(msg))
        else:
            self.hub.publish(SENSOR_TOPIC, msg)
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
        if self._refilled:
            points = [p for p in points if not self._seen_in_resync(sensor_id, p)]
        kept = [p for p in points if ring.append(p[0], p[1])]
        sensor.last_ingest = self.clock()
        self.points_in["device"] += len(points)
        if kept:
            self.fanout.push(sensor_id, kept)
            self._kick()

    def _seen_in_resync(self, sensor_id: str, point: Point) -> bool:
        """Whether ``point`` is the live copy of one that resync() already took (once)."""
        key = (sensor_id, point[0], point[1])
        if key in self._refilled:
            self._refilled.discard(key)
            return True
        return False

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
