"""Simulated sensors: the models, the ``simulated_sensors`` option, the feed.

Every model's ``sample(t)`` is a pure function of its parameters and ``t``
(noise included), so a restart, or another node, replays the same pattern.
:func:`parse_sensor_specs` reads the option; :class:`SimulatedFeed` samples the
sensors on their own time grids when the caller's timer ticks.
"""

from __future__ import annotations

import math
import shlex
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from realtime.feeds.points import Point, SensorInfo, valid_sensor_id


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
