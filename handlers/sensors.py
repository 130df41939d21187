"""Sensor streaming over ``/ws/sensors``, ``/api/sensors`` and the ``/dashboard`` page.

Thin adapters over :class:`realtime.sensors.SensorService`: parse, authorize,
call the core, reply.  ``server.py`` calls :func:`register` (the options
are in realtime/config.py).

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

from handlers.base import BaseSocketHandler, JSONHandler
from handlers.pages import Page
from realtime.auth import AuthError, load_or_create_secret
from realtime.config import Config
from realtime.context import Context
from realtime.protocol import Outgoing, ProtocolError, get_number, get_str
from realtime.sensors import SensorConfig, SensorService, Viewer

log = logging.getLogger("realtime.sensors")

META_BODY_LIMIT = 4096  # bytes of a PUT /api/sensors/<id> body (label and unit are short)


def sensor_config(cfg: Config, secret: Any = None) -> SensorConfig:
    """``secret(name)`` gives a generated secret (a file in data_dir, or the
    cluster's in Redis); used for the ingest key when none is configured."""
    key = cfg.ingest_key
    if not key and secret is not None:
        key = secret("ingest_key")
    elif not key:
        path = os.path.join(cfg.data_dir, "ingest_key")
        key = load_or_create_secret(path)
        log.info("sensor ingest key is in %s (send it as Authorization: Bearer <key>)", os.path.abspath(path))
    return SensorConfig(
        window_s=cfg.sensor_window,
        max_points=cfg.sensor_max_points,
        simulated=cfg.simulated_sensors,
        host_metrics=cfg.host_metrics,
        host_metrics_hz=cfg.host_metrics_hz,
        ingest_key=key,
        max_points_per_publish=cfg.max_points_per_publish,
        max_sensors=cfg.max_sensors,
        min_hz=cfg.viewer_min_hz,
        max_hz=cfg.viewer_max_hz,
        default_hz=cfg.viewer_default_hz,
        conflate_points=cfg.conflate_points,
        max_subscriptions=cfg.max_subscriptions,
        max_backfill_points=cfg.max_backfill_points,
        backlog_bytes=cfg.sensor_backlog_bytes,
        max_future_s=cfg.ingest_max_future,
        expiry_s=cfg.sensor_expiry,
    )


def register(ctx: Context) -> list[Any]:
    """Build the sensor service into ``ctx.services["sensors"]``; return the routes."""
    cfg = sensor_config(ctx.cfg, ctx.secret)
    lease = getattr(ctx.storage, "lease", None)
    node = ctx.cfg.node_name or socket.gethostname()
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

    @property
    def may_publish(self) -> bool:
        """The ingest key was presented at the handshake, or the token's roles
        (now: a ``refresh`` may change them) include ``publish``."""
        viewer, user = self.viewer, self.user
        return viewer is not None and (viewer.publisher or (user is not None and user.can("publish")))

    def rights(self) -> dict[str, Any]:
        return {"can_publish": self.may_publish}

    def opened(self, *args: str) -> None:
        viewer = self.viewer
        assert viewer is not None
        svc: SensorService = self.ctx.sensors
        svc.attach(viewer)
        self.send(svc.welcome(can_publish=self.may_publish))

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
        if not self.may_publish:
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
