"""Benchmark scenario: many dashboards watching many sensors at 10 Hz.

    python bench/sensors_scenario.py             # 1,000 viewers x 20 sensors at 10 Hz, 10 s
    python bench/sensors_scenario.py --quick     # 200 viewers, 3 s
    python bench/sensors_scenario.py --viewers 500 --duration 20 --json

or from Python: ``bench.sensors_scenario.run(quick: bool) -> dict``.

What it does: starts ``python server.py`` on a free loopback port with a temporary
data_dir, ``--max_connections_per_ip=0``, no rate limit, no host metrics and
``--simulated_sensors`` set to ``sensors`` simulated streams at ``hz``; pins it to core
0 (``os.sched_setaffinity``) and this process, the load generator, to core 1.  It opens
``viewers`` WebSocket connections (picows on uvloop when installed, else the
``websockets`` library), each subscribing to every sensor with ``max_hz = hz``, waits
``warmup`` seconds, then measures for ``duration`` seconds:

* delivered batches/s: ``readings`` messages received by all viewers, per second
  (the ideal is ``viewers * hz``);
* server CPU per delivered batch: the server process's user+system CPU time over the
  window (all threads, from psutil), divided by the batches delivered;
* tick-to-receive latency p50/p99/max: ``time.time()`` when a viewer's callback sees
  the message minus the server's ``ts`` in it (the time of the feed tick that sent it;
  same machine, same clock).  It includes the server's fan-out, the kernel, and the
  load generator's own queueing;
* load generator CPU, and the busy CPU of *other* processes on the machine during the
  window (from /proc/stat): if that is high, the numbers are noisy.

Target: p99 below 50 ms with 1,000 viewers (PASS/FAIL in the table).  Every connection
goes to 127.0.0.1; every loop is bounded; the server is always stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_P99_MS = 50.0
TARGET_VIEWERS = 1000
PREFIX = b'{"type":"readings","ts":'

try:
    import uvloop
except ImportError:  # pragma: no cover - optional
    uvloop = None  # type: ignore[assignment]

try:
    from picows import WSListener, WSMsgType, ws_connect
except ImportError:  # pragma: no cover - optional
    WSListener = object  # type: ignore[assignment,misc]
    ws_connect = None  # type: ignore[assignment]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sensor_spec(n: int, hz: float) -> str:
    """``n`` simulated sensors at ``hz``: noisy sines with different periods."""
    return ";".join("id=bench.%02d unit=u hz=%g model=sine amplitude=%d period=%g noise=0.2"
                    % (i, hz, 1 + i % 5, 2 + i) for i in range(n))


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM if this process dies, however it dies."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def _cores() -> tuple[set[int] | None, set[int] | None]:
    """(server cores, load generator cores): 0 and the rest, when there are two or more."""
    try:
        avail = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return None, None
    if len(avail) < 2:
        return None, None
    return {avail[0]}, set(avail[1:])


def _core_busy() -> list[float]:
    """CPU seconds each core spent on anything but idling (all processes), from /proc/stat."""
    return [t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)
            for t in psutil.cpu_times(percpu=True)]


def _other_pct(busy0: list[float], busy1: list[float], cores: list[int], ours: float, elapsed: float) -> float | None:
    """Percent of ``cores`` (their mean) that processes other than ``ours`` CPU seconds used."""
    cores = [c for c in cores if c < len(busy0)]
    if not cores or len(cores) >= len(busy0) or elapsed <= 0:
        return None  # not pinned apart: no core is ours alone
    used = sum(busy1[c] - busy0[c] for c in cores)
    return round(max(0.0, used - ours) / elapsed / len(cores) * 100, 1)


def _cpu_busy() -> tuple[float, float]:
    """(busy seconds, total seconds) of the whole machine, from /proc/stat."""
    t = psutil.cpu_times()
    total = sum(t)
    idle = t.idle + getattr(t, "iowait", 0.0)
    return total - idle, total


class Server:
    def __init__(self, port: int, data_dir: str, sensors: int, hz: float, cores: set[int] | None) -> None:
        argv = [sys.executable, "server.py", "--port=%d" % port, "--address=127.0.0.1",
                "--data_dir=%s" % data_dir, "--logging=warning", "--max_connections_per_ip=0",
                "--max_half_open_per_ip=0",
                "--rate_limit=0", "--host_metrics=false", "--ping_interval=0",
                "--simulated_sensors=%s" % sensor_spec(sensors, hz), "--sensor_window=60",
                "--viewer_max_hz=%g" % max(hz, 20.0), "--sqlite_synchronous=NORMAL"]

        def setup() -> None:  # in the child, between fork and exec
            _raise_nofile()
            if cores:
                os.sched_setaffinity(0, cores)
            _die_with_parent()

        self.log = open(os.path.join(data_dir, "server.log"), "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=setup)  # noqa: PLW1509 - no threads here yet
        self.ps = psutil.Process(self.proc.pid)
        self.url = "http://127.0.0.1:%d" % port

    def wait_ready(self, timeout: float = 20.0) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited with %s" % self.proc.returncode)
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("server did not start within %.0f s" % timeout)

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(10)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(5)
        self.log.close()


class Stats:
    """Shared by every viewer: counts and latencies, recorded only while measuring."""

    def __init__(self) -> None:
        self.measuring = False
        self.batches = 0
        self.points = 0
        self.latencies: list[float] = []
        self.errors = 0
        self.error_text = ""
        self.closed = 0

    def on_payload(self, data: bytes, now: float) -> bool:
        """Record one server message; True if it was a ``readings``."""
        if data.startswith(PREFIX):
            # Fast path: ts is the second key (the server writes type, ts, points).
            end = data.index(b",", len(PREFIX))
            ts = float(data[len(PREFIX):end])
            if self.measuring:
                self.batches += 1
                self.latencies.append(now - ts)
            return True
        msg = json.loads(data)
        if msg.get("type") == "readings":
            if self.measuring:
                self.batches += 1
                self.latencies.append(now - msg["ts"])
            return True
        if msg.get("type") == "error":
            self.errors += 1
            self.error_text = self.error_text or data[:200].decode("utf-8", "replace")
        return False


class PicowsViewer(WSListener):  # type: ignore[misc,valid-type]
    def __init__(self, stats: Stats, subscribe: bytes, ready: asyncio.Future[None]) -> None:
        self.stats = stats
        self.subscribe = subscribe
        self.ready = ready
        self.transport: Any = None
        self.welcomed = False

    def on_ws_connected(self, transport: Any) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: Any, frame: Any) -> None:
        if frame.msg_type == WSMsgType.TEXT:
            now = time.time()
            data = frame.get_payload_as_bytes()
            if not self.welcomed:
                self.welcomed = True
                transport.send(WSMsgType.TEXT, self.subscribe)
            elif self.stats.on_payload(data, now) and not self.ready.done():
                self.ready.set_result(None)
        elif frame.msg_type == WSMsgType.CLOSE:
            transport.disconnect()

    def on_ws_disconnected(self, transport: Any) -> None:
        if self.stats.measuring:
            self.stats.closed += 1
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("closed before the first readings"))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.disconnect()


async def _open_picows(url: str, stats: Stats, subscribe: bytes) -> Any:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    _, viewer = await ws_connect(lambda: PicowsViewer(stats, subscribe, ready), url)
    await asyncio.wait_for(ready, 15)
    return viewer


class WebsocketsViewer:
    """The same viewer over the ``websockets`` library (slower; when picows is missing)."""

    def __init__(self, ws: Any, task: asyncio.Task[None]) -> None:
        self.ws = ws
        self.task = task

    def close(self) -> None:
        self.task.cancel()


async def _open_websockets(url: str, stats: Stats, subscribe: bytes) -> Any:
    import websockets

    ws = await websockets.connect(url, max_size=None, ping_interval=None, compression=None)
    await ws.recv()  # welcome
    await ws.send(subscribe.decode())
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    async def reader() -> None:
        try:
            async for raw in ws:
                data = raw.encode() if isinstance(raw, str) else raw
                if stats.on_payload(data, time.time()) and not ready.done():
                    ready.set_result(None)
        except Exception:
            pass
        finally:
            if stats.measuring:
                stats.closed += 1
            await ws.close()

    task = asyncio.ensure_future(reader())
    await asyncio.wait_for(ready, 15)
    return WebsocketsViewer(ws, task)


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[i]


async def _load(url: str, viewers: int, sensors: int, hz: float, warmup: float, duration: float,
                server: Server) -> dict[str, Any]:
    stats = Stats()
    subscribe = json.dumps({"type": "subscribe", "sensors": ["bench.%02d" % i for i in range(sensors)],
                            "max_hz": hz, "backfill": 0}).encode()
    use_picows = ws_connect is not None and os.environ.get("BENCH_CLIENT") != "websockets"
    opener = _open_picows if use_picows else _open_websockets
    gate = asyncio.Semaphore(50)
    opened: list[Any] = []

    async def one() -> None:
        async with gate:
            opened.append(await opener(url, stats, subscribe))

    t0 = time.monotonic()
    results = await asyncio.gather(*(one() for _ in range(viewers)), return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    connect_s = time.monotonic() - t0
    await asyncio.sleep(warmup)
    me = psutil.Process()
    cpu0_server, cpu0_me, busy0, cores0 = server.cpu(), me.cpu_times(), _cpu_busy(), _core_busy()
    t1 = time.monotonic()
    stats.measuring = True
    await asyncio.sleep(duration)
    stats.measuring = False
    elapsed = time.monotonic() - t1
    cpu1_server, cpu1_me, busy1, cores1 = server.cpu(), me.cpu_times(), _cpu_busy(), _core_busy()
    for v in opened:
        v.close()
    await asyncio.sleep(0.2)

    server_cpu = cpu1_server - cpu0_server
    me_cpu = (cpu1_me.user + cpu1_me.system) - (cpu0_me.user + cpu0_me.system)
    machine_busy = busy1[0] - busy0[0]
    other = max(0.0, machine_busy - server_cpu - me_cpu)
    lat = sorted(stats.latencies)
    try:
        server_cores = sorted(server.ps.cpu_affinity())
    except (psutil.Error, AttributeError):
        server_cores = []
    my_cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    batches_per_s = stats.batches / elapsed if elapsed > 0 else 0.0
    return {
        "viewers": viewers,
        "connected": len(opened),
        "connect_failures": len(failures),
        "first_failure": repr(failures[0])[:200] if failures else "",
        "sensors": sensors,
        "hz": hz,
        "duration_s": round(elapsed, 2),
        "connect_s": round(connect_s, 2),
        "client": "picows + %s" % ("uvloop" if uvloop else "asyncio") if use_picows else "websockets",
        "batches_per_s": round(batches_per_s, 1),
        "ideal_batches_per_s": viewers * hz,
        "server_cpu_pct": round(100 * server_cpu / elapsed, 1),
        "server_cpu_us_per_batch": round(1e6 * server_cpu / stats.batches, 1) if stats.batches else None,
        "latency_p50_ms": round(1000 * _percentile(lat, 0.50), 2),
        "latency_p99_ms": round(1000 * _percentile(lat, 0.99), 2),
        "latency_max_ms": round(1000 * lat[-1], 2) if lat else None,
        "loadgen_cpu_pct": round(100 * me_cpu / elapsed, 1),
        "other_cpu_pct": round(100 * other / elapsed, 1),
        # the same, per role: other processes on the server's core(s) and on ours
        "other_srv_core_pct": _other_pct(cores0, cores1, server_cores, server_cpu, elapsed),
        "other_lg_core_pct": _other_pct(cores0, cores1, my_cores, me_cpu, elapsed),
        "errors": stats.errors,
        "error_text": stats.error_text,
        "closed_early": stats.closed,
    }


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def run(quick: bool = False, *, viewers: int | None = None, sensors: int = 20, hz: float = 10.0,
        duration: float | None = None, warmup: float = 2.0) -> dict[str, Any]:
    """Run the scenario once; return its measurements (see the module docstring)."""
    viewers = viewers if viewers is not None else (200 if quick else TARGET_VIEWERS)
    duration = duration if duration is not None else (3.0 if quick else 10.0)
    server_cores, client_cores = _cores()
    _raise_nofile()
    old_affinity = None
    if client_cores:
        old_affinity = os.sched_getaffinity(0)
        os.sched_setaffinity(0, client_cores)
    port = free_port()
    # SIGTERM (e.g. from `timeout`) unwinds through the finally below, which stops the server.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    with tempfile.TemporaryDirectory(prefix="bench-sensors-") as data_dir:
        server = Server(port, data_dir, sensors, hz, server_cores)
        try:
            server.wait_ready()
            url = "ws://127.0.0.1:%d/ws/sensors" % port
            if uvloop is not None:
                result = uvloop.run(_load(url, viewers, sensors, hz, warmup, duration, server))
            else:
                result = asyncio.run(_load(url, viewers, sensors, hz, warmup, duration, server))
        finally:
            server.stop()
            if main_thread:
                signal.signal(signal.SIGTERM, previous)
            if old_affinity is not None:
                os.sched_setaffinity(0, old_affinity)
    result["pinned"] = bool(server_cores)
    p99 = result["latency_p99_ms"]
    delivered = result["batches_per_s"] >= 0.95 * result["ideal_batches_per_s"]
    result["target"] = "p99 < %g ms at %d viewers" % (TARGET_P99_MS, TARGET_VIEWERS)
    ok = (p99 == p99 and p99 < TARGET_P99_MS and delivered and not result["connect_failures"]
          and not result["closed_early"])
    if viewers != TARGET_VIEWERS:
        result["verdict"] = ("pass" if ok else "FAIL") + " (at %d viewers; the target is at %d)" % (
            viewers, TARGET_VIEWERS)
    else:
        result["verdict"] = "PASS" if ok else "FAIL"
    return result


def table(r: dict[str, Any]) -> str:
    rows = [
        ("viewers (connected)", "%d (%d)" % (r["viewers"], r["connected"])),
        ("sensors x rate", "%d x %g Hz" % (r["sensors"], r["hz"])),
        ("delivered batches/s (ideal)", "%.0f (%.0f)" % (r["batches_per_s"], r["ideal_batches_per_s"])),
        ("server CPU", "%.1f %% of a core" % r["server_cpu_pct"]),
        ("server CPU per delivered batch", "%s µs" % r["server_cpu_us_per_batch"]),
        ("tick-to-receive latency p50 / p99 / max", "%.1f / %.1f / %.1f ms" % (
            r["latency_p50_ms"], r["latency_p99_ms"], r["latency_max_ms"] or float("nan"))),
        ("load generator CPU (%s)" % r["client"], "%.1f %% of a core" % r["loadgen_cpu_pct"]),
        ("other processes' CPU during the run", "%.1f %%" % r["other_cpu_pct"]),
        ("target: %s" % r["target"], r["verdict"]),
    ]
    w = max(len(a) for a, _ in rows)
    out = ["| %s | result |" % "measure".ljust(w), "|%s|---|" % ("-" * (w + 2))]
    out += ["| %s | %s |" % (a.ljust(w), b) for a, b in rows]
    if r["connect_failures"] or r["errors"] or r["closed_early"]:
        out.append("\nconnect failures: %d %s; errors: %d %s; closed while measuring: %d" % (
            r["connect_failures"], r["first_failure"], r["errors"], r["error_text"], r["closed_early"]))
    if not r["pinned"]:
        out.append("\n(not pinned: fewer than two cores; the server and the load generator share a CPU)")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="200 viewers for 3 s")
    ap.add_argument("--viewers", type=int, default=None)
    ap.add_argument("--sensors", type=int, default=20)
    ap.add_argument("--hz", type=float, default=10.0)
    ap.add_argument("--duration", type=float, default=None)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--json", action="store_true", help="print the raw result as JSON too")
    args = ap.parse_args(argv)
    r = run(args.quick, viewers=args.viewers, sensors=args.sensors, hz=args.hz, duration=args.duration,
            warmup=args.warmup)
    print(table(r))
    if args.json:
        print(json.dumps(r, indent=2))
    return 0 if not r["verdict"].startswith("FAIL") else 1


if __name__ == "__main__":
    sys.exit(main())
