"""Sensor streaming over ``/ws/sensors``, ``/api/sensors`` and the ``/dashboard`` page.

Thin adapters over :class:`realtime.sensors.SensorService`: parse, authorize,
call the core, reply.  ``server.py`` imports this module at start-up (its
options must exist before the command line is parsed) and calls
:func:`register`.

Who may publish: a device that presents the **ingest key** (``--ingest_key``;
by default generated once into ``data_dir/ingest_key``), as
``Authorization: Bearer <key>``, ``X-Ingest-Key: <key>`` or ``?key=<key>``; or,
in token mode, a token whose roles include ``publish``.  Viewers need nothing.
A WebSocket handshake that presents a *wrong* key is refused with HTTP 403;
one without a key is a viewer, and its ``publish`` messages get ``forbidden``.

Security caveat: the ingest key is a shared secret with full write access to
device sensors.  Serve it over TLS (``--certfile``), keep the file private, and
rotate it by changing ``--ingest_key`` (or deleting the file) and restarting.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import socket
from typing import Any

from tornado.options import define, options

from handlers.base import BaseSocketHandler, JSONHandler
from handlers.pages import Page
from realtime.auth import AuthError, load_or_create_secret
from realtime.context import Context
from realtime.feeds import DEFAULT_SIMULATED
from realtime.protocol import Outgoing, ProtocolError, get_number, get_str
from realtime.sensors import SensorConfig, SensorService, Viewer

log = logging.getLogger("realtime.sensors")

META_BODY_LIMIT = 4096  # bytes of a PUT /api/sensors/<id> body (label and unit are short)

# -- options -------------------------------------------------------------------
define("sensor_window", default=600.0, type=float,
       help="seconds of readings kept per sensor (ring buffer and SQLite); also the longest backfill")
define("sensor_max_points", default=10000, type=int,
       help="points kept per sensor at most, whatever its rate")
define("simulated_sensors", default=DEFAULT_SIMULATED, type=str,
       help="simulated sensors, one per line or ';'-separated: id= label= unit= hz= model=sine|walk|sawtooth|square"
            " plus the model's parameters; '' = none")
define("host_metrics", default=True, type=bool,
       help="publish this host's CPU %, memory %, load average and network bytes/s as sensors host.*")
define("node_name", default="", type=str,
       help="cluster mode: this machine's name, for its host metrics (host.<name>.cpu ...); default: the hostname")
define("host_metrics_hz", default=1.0, type=float, help="samples per second of the host metrics")
define("ingest_key", default="", type=str,
       help="key devices present to publish readings (Authorization: Bearer, X-Ingest-Key or ?key=);"
            " '' = generated once into data_dir/ingest_key")
define("max_points_per_publish", default=1000, type=int,
       help="points one publish (WebSocket message or POST) may carry; more is refused with too_large")
define("max_sensors", default=1000, type=int, help="device sensors this server holds at most")
define("viewer_min_hz", default=0.1, type=float, help="slowest readings rate (messages/s) a viewer may ask for")
define("viewer_max_hz", default=20.0, type=float,
       help="fastest readings rate (messages/s) a viewer may ask for; also the delivery tick rate")
define("viewer_default_hz", default=10.0, type=float, help="readings rate of a viewer that does not ask for one")
define("conflate_points", default=100, type=int,
       help="points per sensor in one readings message at most; beyond, evenly thinned, newest kept")
define("max_subscriptions", default=100, type=int, help="sensors one connection may name (\"*\" = all counts as one)")
define("max_backfill_points", default=2000, type=int,
       help="points per sensor in one backfill message at most (evenly thinned over the span)")
define("sensor_backlog_bytes", default=256 * 1024, type=int,
       help="unflushed bytes past which a viewer gets no new readings message; its readings conflate until it drains")
define("ingest_max_future", default=60.0, type=float,
       help="seconds a reading's timestamp may be ahead of the server clock")
define("sensor_expiry", default=0.0, type=float,
       help="remove a device sensor after this many seconds without readings (0 = keep until deleted)")


def _opt(cfg: Any, name: str) -> Any:
    """An option from the app's config namespace, else from tornado.options."""
    return getattr(cfg, name) if hasattr(cfg, name) else getattr(options, name)


def sensor_config(cfg: Any, secret: Any = None) -> SensorConfig:
    """``secret(name)`` gives a generated secret (a file in data_dir, or the
    cluster's in Redis); used for the ingest key when none is configured."""
    key = _opt(cfg, "ingest_key")
    if not key and secret is not None:
        key = secret("ingest_key")
    elif not key:
        path = os.path.join(cfg.data_dir, "ingest_key")
        key = load_or_create_secret(path)
        log.info("sensor ingest key is in %s (send it as Authorization: Bearer <key>)", os.path.abspath(path))
    return SensorConfig(
        window_s=_opt(cfg, "sensor_window"),
        max_points=_opt(cfg, "sensor_max_points"),
        simulated=_opt(cfg, "simulated_sensors"),
        host_metrics=_opt(cfg, "host_metrics"),
        host_metrics_hz=_opt(cfg, "host_metrics_hz"),
        ingest_key=key,
        max_points_per_publish=_opt(cfg, "max_points_per_publish"),
        max_sensors=_opt(cfg, "max_sensors"),
        min_hz=_opt(cfg, "viewer_min_hz"),
        max_hz=_opt(cfg, "viewer_max_hz"),
        default_hz=_opt(cfg, "viewer_default_hz"),
        conflate_points=_opt(cfg, "conflate_points"),
        max_subscriptions=_opt(cfg, "max_subscriptions"),
        max_backfill_points=_opt(cfg, "max_backfill_points"),
        backlog_bytes=_opt(cfg, "sensor_backlog_bytes"),
        max_future_s=_opt(cfg, "ingest_max_future"),
        expiry_s=_opt(cfg, "sensor_expiry"),
    )


def register(ctx: Context) -> list[Any]:
    """Build the sensor service into ``ctx.services["sensors"]``; return the routes."""
    cfg = sensor_config(ctx.cfg, ctx.secret)
    lease = getattr(ctx.storage, "lease", None)
    node = _opt(ctx.cfg, "node_name") or socket.gethostname()
    if lease is not None:  # cluster mode: each machine's metrics under its own name
        cfg = dataclasses.replace(cfg, host_prefix="host." + re.sub(r"[^A-Za-z0-9_.:-]", "_", node)[:40])
    ctx.services["sensors"] = SensorService(ctx.storage.reading_store(), cfg, hub=ctx.hub, lease=lease,
                                            node_name=node)
    kw = {"ctx": ctx}
    return [
        (r"/dashboard", DashboardPage, kw),
        (r"/ws/sensors", SensorSocketHandler, kw),
        (r"/api/sensors", SensorListAPI, kw),
        (r"/api/sensors/([^/]+)", SensorAPI, kw),
        (r"/api/sensors/([^/]+)/readings", SensorReadingsAPI, kw),
    ]


def _bearer(headers: Any) -> str | None:
    auth = headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return None


# -- the socket ------------------------------------------------------------------


class SensorSocketHandler(BaseSocketHandler):
    """``/ws/sensors``: viewers subscribe; devices with the key publish.

    Per-connection state is one attribute, ``viewer`` (the base keeps its own in
    ``rt``), so that an idle connection stays small."""

    app_name = "sensors"

    def initialize(self, ctx: Any) -> None:  # type: ignore[override]
        super().initialize(ctx)
        self.viewer: Viewer | None = None

    def prepare(self) -> None:
        """The base's identity and limits, then the ingest key: a key that is
        presented must be right (HTTP 403 otherwise); without one, a viewer."""
        super().prepare()
        if self.handshake_refused:
            return
        svc: SensorService = self.ctx.sensors
        viewer = self.viewer = Viewer(self, svc.fanout.clamp(svc.cfg.default_hz))
        key = self.get_query_argument("key", None) or self.request.headers.get("X-Ingest-Key")
        if key is not None:
            if not svc.check_key(key):
                self.refuse(403, "wrong ingest key")
                return
            viewer.publisher = True
        elif self.ctx.auth.mode == "open" and svc.check_key(_bearer(self.request.headers)):
            viewer.publisher = True
        if self.user is not None and self.user.can("publish"):
            viewer.publisher = True

    def opened(self, *args: str) -> None:
        viewer = self.viewer
        assert viewer is not None
        svc: SensorService = self.ctx.sensors
        svc.attach(viewer)
        self.send(svc.welcome(can_publish=viewer.publisher))

    def closed(self) -> None:
        if self.viewer is not None:
            self.ctx.sensors.detach(self.viewer)

    def on_backlog(self, out: Outgoing) -> None:
        """Readings never get here (fan-out stops at ``sensor_backlog_bytes`` and
        conflates); other messages still queue, up to a hard cap (four times
        ``max_write_buffer``) that only a client that never reads yet keeps
        asking for backfill reaches: that one is closed with 1013."""
        if self.buffered_bytes() <= 4 * self.cfg.max_write_buffer:
            self.enqueue(out)
            return
        super().on_backlog(out)

    def msg_subscribe(self, msg: dict[str, Any]) -> None:
        assert self.viewer is not None
        max_hz = get_number(msg, "max_hz", required=False)
        backfill = get_number(msg, "backfill", required=False, minimum=0) or 0.0
        reply, backfills = self.ctx.sensors.subscribe(self.viewer, msg.get("sensors"), max_hz, backfill)
        self.reply(msg, reply)
        for b in backfills:
            self.send(b)

    def msg_unsubscribe(self, msg: dict[str, Any]) -> None:
        assert self.viewer is not None
        reply = self.ctx.sensors.unsubscribe(self.viewer, msg.get("sensors"))
        self.reply(msg, reply)

    async def msg_publish(self, msg: dict[str, Any]) -> None:
        if self.viewer is None or not self.viewer.publisher:
            raise ProtocolError("forbidden", "publishing needs the ingest key (connect with ?key=<ingest key>)"
                                " or a token with the publish role")
        sensor = get_str(msg, "sensor", max_len=200)
        assert sensor is not None
        if "points" in msg:
            raw = msg["points"]
        elif "value" in msg:
            raw = {k: msg[k] for k in ("value", "t") if k in msg}
        else:
            raise ProtocolError("bad_message", "'points' is required: [[t, value], ...] (t in unix seconds)")
        stored = await self.ctx.sensors.publish(sensor, raw)
        ack: dict[str, Any] = {"type": "ack", "sensor": sensor, "stored": stored}
        self.reply(msg, ack)


# -- HTTP ------------------------------------------------------------------------


class _SensorHTTP(JSONHandler):
    """Reads need what the socket needs (a token in token mode, else nothing);
    writes need the ingest key or a publish token, checked before the body is read."""

    @property
    def svc(self) -> SensorService:
        return self.ctx.sensors  # type: ignore[no-any-return]

    def prepare(self) -> None:
        if self.request.method in ("PUT", "POST", "DELETE"):
            self.authorized()
            return
        super().prepare()

    def authorized(self) -> bool:
        """The ingest key (``Authorization: Bearer``, ``X-Ingest-Key`` or ``?key=``),
        or in token mode a token with the ``publish`` role.  Answers 401 when no
        credential came, 403 when a wrong one did, and returns False then."""
        key = self.request.headers.get("X-Ingest-Key") or self.get_query_argument("key", None)
        bearer = _bearer(self.request.headers)
        if key is None and bearer is None:
            self.set_header("WWW-Authenticate", 'Bearer realm="sensors"')
            self.fail(401, "unauthorized", "publishing needs the ingest key: Authorization: Bearer <key>")
            return False
        if key is not None:
            if self.svc.check_key(key):
                return True
            self.fail(403, "forbidden", "wrong ingest key")
            return False
        if self.svc.check_key(bearer):
            return True
        if self.ctx.auth.mode == "token":
            try:
                ident = self.ctx.auth.verify_token(bearer or "")
            except AuthError as e:
                self.set_header("WWW-Authenticate", 'Bearer realm="sensors", error="invalid_token"')
                self.fail(401, "unauthorized", e.message)
                return False
            if ident.can("publish"):
                return True
            self.fail(403, "forbidden", "this token lacks the publish role")
            return False
        self.fail(403, "forbidden", "wrong ingest key")
        return False

    def body(self) -> Any:
        """The JSON body (its size was bounded by ``body_limits`` before it was read)."""
        if not self.body_bytes.strip():
            raise ProtocolError("bad_message", "send a JSON body")
        return self.json_body()


class SensorListAPI(_SensorHTTP):
    """``GET /api/sensors``: every sensor with its newest reading."""

    def get(self) -> None:
        self.finish({"sensors": [s.to_json() for s in self.svc.sensors()], "server_time": self.svc.clock()})


class SensorAPI(_SensorHTTP):
    """``GET``, ``PUT`` (label, unit, rate_hz) and ``DELETE /api/sensors/<id>``."""

    body_limits = {"PUT": META_BODY_LIMIT}

    def get(self, sensor_id: str) -> None:
        sensor = self.svc.require(sensor_id)
        self.finish({"sensor": {**sensor.to_json(), "points": len(sensor.ring)}})

    async def put(self, sensor_id: str) -> None:
        body = self.body()
        sensor, created = await self.svc.set_meta(sensor_id, body)
        self.set_status(201 if created else 200)
        self.finish({"sensor": sensor, "created": created})

    async def delete(self, sensor_id: str) -> None:
        await self.svc.delete(sensor_id)
        self.finish({"deleted": sensor_id})


class SensorReadingsAPI(_SensorHTTP):
    """``GET /api/sensors/<id>/readings?since=&limit=`` and ``POST`` readings."""

    body_limits = {"POST": "max_body_size"}

    def get(self, sensor_id: str) -> None:
        since = self._float_arg("since")
        raw_limit = self.get_query_argument("limit", None)
        limit = 1000
        if raw_limit:
            try:
                limit = int(raw_limit)
            except ValueError:
                raise ProtocolError("bad_message", "'limit' must be an integer") from None
            if not 1 <= limit <= 10_000:
                raise ProtocolError("bad_message", "'limit' must be between 1 and 10000")
        self.finish(self.svc.readings(sensor_id, since, limit))

    def _float_arg(self, name: str) -> float | None:
        raw = self.get_query_argument(name, None)
        if raw is None or raw == "":
            return None
        try:
            value = float(raw)
        except ValueError:
            raise ProtocolError("bad_message", "'%s' must be a number (unix seconds)" % name) from None
        if not math.isfinite(value):
            raise ProtocolError("bad_message", "'%s' must be a finite number" % name)
        return value

    async def post(self, sensor_id: str) -> None:
        """Body: ``[[t, v], ...]``, ``21.5``, ``{"value": v, "t": t}`` or
        ``{"points": [[t, v], ...]}``.  200 ``{"stored": n}`` after commit."""
        body = self.body()
        if type(body) is dict and "points" in body:
            if len(body) > 1:
                raise ProtocolError("bad_message", 'an object with "points" has no other keys')
            body = body["points"]
        stored = await self.svc.publish(sensor_id, body)
        self.finish({"sensor": sensor_id, "stored": stored})


# -- the page ----------------------------------------------------------------------


class DashboardPage(Page):
    template = "dashboard.html"
    title = "Dashboard"
