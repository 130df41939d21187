"""This host's own measurements (CPU, memory, load, network) as a feed.

The one piece of :mod:`realtime.feeds` that reads the machine: through psutil
(or a stand-in passed as ``ps``, for tests), never on its own timer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from realtime.feeds.points import SensorInfo


class HostMetrics:
    """This host's own measurements, from psutil, as a feed.

    :meth:`sample` returns ``{sensor_id: value}``:

    ========================  =====================================  =====
    ``<prefix>.cpu``          CPU busy, all cores, since last sample  %
    ``<prefix>.mem``          memory in use                           %
    ``<prefix>.load1``        load average over 1 minute              --
    ``<prefix>.net_rx``       bytes received per second, non-loopback B/s
    ``<prefix>.net_tx``       bytes sent per second, non-loopback     B/s
    ========================  =====================================  =====

    CPU and network are rates over the time since the previous call (the first
    call measures from construction); a metric that cannot be computed yet, or
    that the platform lacks, is left out rather than reported as a made-up 0.
    Cheap enough for 1 Hz: a handful of reads of ``/proc`` on Linux.  Keeps its
    own counters, so it does not disturb (or get disturbed by) other callers of
    ``psutil.cpu_percent``.  ``prefix`` lets each node of a cluster publish its
    own ``node2.cpu``.
    """

    def __init__(self, *, prefix: str = "host", rate_hz: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, ps: Any = None) -> None:
        if ps is None:
            import psutil

            ps = psutil
        self._ps = ps
        self._clock = clock
        p = prefix
        self.ids = {"cpu": p + ".cpu", "mem": p + ".mem", "load1": p + ".load1",
                    "net_rx": p + ".net_rx", "net_tx": p + ".net_tx"}
        self.infos = [
            SensorInfo(self.ids["cpu"], "CPU", "%", rate_hz, "host"),
            SensorInfo(self.ids["mem"], "Memory used", "%", rate_hz, "host"),
            SensorInfo(self.ids["load1"], "Load average (1 min)", "", rate_hz, "host"),
            SensorInfo(self.ids["net_rx"], "Network received", "B/s", rate_hz, "host"),
            SensorInfo(self.ids["net_tx"], "Network sent", "B/s", rate_hz, "host"),
        ]
        self._loopback = self._find_loopback()
        self._cpu = self._cpu_totals()
        self._net = self._net_totals()
        self._stamp = clock()

    def _find_loopback(self) -> set[str]:
        names: set[str] = set()
        try:
            for name, st in self._ps.net_if_stats().items():
                if "loopback" in getattr(st, "flags", "").split(","):
                    names.add(name)
        except (OSError, AttributeError):
            pass
        return names

    def _is_loopback(self, name: str) -> bool:
        return name in self._loopback or name in ("lo", "lo0") or "loopback" in name.lower()

    def _cpu_totals(self) -> tuple[float, float] | None:
        """(all time, idle time) in seconds, summed over cores."""
        try:
            ct = self._ps.cpu_times()
        except (OSError, AttributeError):
            return None
        total = sum(ct)
        # guest time is already counted in user/nice on Linux
        total -= getattr(ct, "guest", 0.0) + getattr(ct, "guest_nice", 0.0)
        idle = ct.idle + getattr(ct, "iowait", 0.0)
        return total, idle

    def _net_totals(self) -> tuple[int, int] | None:
        """(bytes received, bytes sent) over non-loopback interfaces."""
        try:
            per_nic = self._ps.net_io_counters(pernic=True)
        except (OSError, AttributeError, RuntimeError):
            return None
        rx = tx = 0
        for name, c in per_nic.items():
            if not self._is_loopback(name):
                rx += c.bytes_recv
                tx += c.bytes_sent
        return rx, tx

    def sample(self) -> dict[str, float]:
        """The current measurements (finite floats), keyed by sensor id."""
        now = self._clock()
        dt = now - self._stamp
        self._stamp = now
        out: dict[str, float] = {}

        cpu = self._cpu_totals()
        if cpu is not None and self._cpu is not None:
            d_total = cpu[0] - self._cpu[0]
            d_idle = cpu[1] - self._cpu[1]
            if d_total > 0:
                out[self.ids["cpu"]] = min(max(100.0 * (d_total - d_idle) / d_total, 0.0), 100.0)
        self._cpu = cpu

        try:
            out[self.ids["mem"]] = float(self._ps.virtual_memory().percent)
        except (OSError, AttributeError):
            pass

        try:
            out[self.ids["load1"]] = float(self._ps.getloadavg()[0])
        except (OSError, AttributeError):
            pass

        net = self._net_totals()
        if net is not None and self._net is not None and dt > 0:
            d_rx = net[0] - self._net[0]
            d_tx = net[1] - self._net[1]
            # A negative delta means an interface went away: skip one sample.
            if d_rx >= 0 and d_tx >= 0:
                out[self.ids["net_rx"]] = d_rx / dt
                out[self.ids["net_tx"]] = d_tx / dt
        self._net = net

        return {k: v for k, v in out.items() if math.isfinite(v)}
