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

The modules: :mod:`~realtime.feeds.points` (sensor ids and info, validation, the
ring buffer), :mod:`~realtime.feeds.conflation` (conflator, rate gate),
:mod:`~realtime.feeds.simulated` (models, the ``simulated_sensors`` option, the
feed) and :mod:`~realtime.feeds.host` (this host's measurements, through psutil).
"""

from realtime.feeds.conflation import Conflator, RateGate, clamp_hz
from realtime.feeds.host import HostMetrics
from realtime.feeds.points import (
    MAX_LABEL_LEN,
    MAX_RATE_HZ,
    MAX_UNIT_LEN,
    SENSOR_KINDS,
    Point,
    RingBuffer,
    SensorInfo,
    valid_sensor_id,
    validate_points,
)
from realtime.feeds.simulated import (
    DEFAULT_SIMULATED,
    MODEL_NAMES,
    Model,
    NoisySine,
    RandomWalk,
    Sawtooth,
    SimulatedFeed,
    SimulatedSensor,
    Square,
    make_model,
    parse_sensor_specs,
    simulated_sensor,
)

__all__ = [
    "DEFAULT_SIMULATED", "MAX_LABEL_LEN", "MAX_RATE_HZ", "MAX_UNIT_LEN", "MODEL_NAMES", "SENSOR_KINDS",
    "Conflator", "HostMetrics", "Model", "NoisySine", "Point", "RandomWalk", "RateGate", "RingBuffer",
    "Sawtooth", "SensorInfo", "SimulatedFeed", "SimulatedSensor", "Square", "clamp_hz", "make_model",
    "parse_sensor_specs", "simulated_sensor", "valid_sensor_id", "validate_points",
]
