"""Sensor streaming: the registry, the feeds' timers, device ingest and fan-out.

The pure pieces of a stream (ring buffers, validation, conflation, rate gates,
simulated models, host metrics) live in :mod:`realtime.feeds`; the fan-out to
viewers, also pure, in :mod:`realtime.sensors.fanout`; the service that wires
them to timers, storage and connections in :mod:`realtime.sensors.service`.
It imports nothing from ``tornado.web``.

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

from realtime.sensors.fanout import Fanout, GroupKey, Viewer, ViewerConn, thin
from realtime.sensors.service import ID_RULE, SENSOR_TOPIC, Sensor, SensorConfig, SensorService

__all__ = ["ID_RULE", "SENSOR_TOPIC", "Fanout", "GroupKey", "Sensor", "SensorConfig", "SensorService", "Viewer",
           "ViewerConn", "thin"]
