"""Benchmark runner: one command, every scenario, a table.

How to run (from the repository root; needs picows, uvloop, websockets, psutil --
``pip install -e .[bench]``)::

    python bench/run.py --quick                 # about a minute: 1,000 connections, 200 dashboards
    python bench/run.py                         # full: 10,000 connections, 1,000 dashboards, ~10 minutes
    python bench/run.py --scenarios fanout,slow --servers tornado,server
    python bench/run.py --quick --no-write      # print only, leave docs/ and bench/results/ alone
    python bench/run.py --server-arg=--max_write_buffer=262144   # pass options to server.py
    python bench/run.py --scenarios sensors,editor --servers server  # the two other apps only
    python bench/run.py --scenarios cluster --servers server --merge  # refresh one section of the page

It prints a progress line on stderr while it runs, then markdown tables and the target
ratios on stdout, and writes the same to docs/BENCHMARKS.md (with the command, the
machine and the date) and the raw numbers to bench/results/ (git-ignored). Run it on a
quiet machine: the report flags every run during which other processes used our cores.

Systems under test (``--servers``), each a fresh process on a free port:

- ``tornado``       bench/baselines/tornado_chat.py: ``write_message(dict)`` per member, as
                    Tornado's demos do (``tornado-once``, not run by default: the same,
                    with the JSON encoded once per message)
- ``ws-loop``       bench/baselines/websockets_chat.py --fanout=loop: the tutorial's
                    ``for ws in clients: await ws.send(m)``
- ``ws-broadcast``  the same server with the library's ``broadcast()``
- ``server``        our server.py (reported "not available" while it does not exist or
                    does not start)

Scenarios (``--scenarios``):

- ``connect``     open N connections, ``--concurrency`` handshakes at a time; handshakes/s
                  counts from the first connect to the last ``welcome``
- ``idle``        server RSS growth per connected, idle client (before any join)
- ``fanout``      one room with every client in it; one member says ~100-byte messages
                  at a steady rate; every member (sender included) receives each one
- ``throughput``  the same room, publishing as fast as the server delivers: about half a
                  second of deliveries kept in flight (delivered msgs/s is the server's
                  capacity when its CPU is near 100 %)
- ``rooms``       many rooms of 10; the first member of each publishes, a steady total rate
- ``slow``        one small room, ~1,800-byte messages at a high rate (enough to overflow
                  the kernel's socket buffers, ~4 MB per connection on loopback), run once
                  as a control and once with every fifth client no longer reading its
                  socket: server RSS growth and the fast clients' p99 against the control
- ``sensors``     bench/sensors_scenario.py: 1,000 dashboards (200 with --quick) each
                  watching 20 simulated sensors at 10 Hz; tick-to-receive p99 and server
                  CPU per delivered batch
- ``editor``      bench/editor_scenario.py: 50 editors on one document, 1,000 ops/s in
                  total, acks only after a durable commit; applied ops/s and ack p99
- ``cluster``     bench/cluster_scenario.py: the fanout and rooms loads on one node with
                  SQLite, one node on Redis, and two nodes on Redis with the members split
                  (CPU per delivery over every node and redis-server, say->ack, delivery to
                  the other node's members), then 50 editors through two nodes

sensors, editor and cluster run last, against server.py only (the baselines are chat servers),
each on its own fresh servers (and redis-server) that the scenario script starts itself, pinned
the same way; the
load generator's pool is stopped first and the scenario's clients run in this process on
the load generator's core. ``--server-arg`` does not reach them.

connect, idle, fanout and throughput share one set of connections; rooms and slow open
their own. A full run starts a fresh server for each of the three groups; --quick runs
the first two on one server, and slow always gets a fresh one (memory an earlier group
freed would hide the growth it measures).

Measurement: the server runs on core 0 and the load generator (bench/loadgen.py,
picows on uvloop) plus this runner on core 1, so neither steals the other's CPU. CPU
time is the processes' own user+system time (the kernel's rusage counters, all threads,
read from /proc), taken before and after each measured run; memory is RSS. Latency is
end to end: the publisher writes its ``time.monotonic_ns()`` into the text and each
receiver subtracts it from its own clock (CLOCK_MONOTONIC is one clock for every process
on the machine). A message counts as lost when a reading client has not received it
once publishing has stopped and nothing has arrived for a quiet period (3 s; 1 s with
--quick; 10 s and 4 s while some messages are not acknowledged yet, since a durable server
can hold a batch behind a slow commit). Messages and acks of an earlier run that arrive
during a later one are counted as late, never as delivered. Other processes' use of the
two cores during each measured run is read from /proc/stat and flagged in the table's
notes: on a shared machine it is the main noise.

Every connection goes to 127.0.0.1; every loop is bounded in count and time, the whole
run by a time budget; every process started here is stopped on exit, error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):
    sys.path.insert(0, ROOT)

from bench import procs, report
from bench.latency import merged

SCENARIOS = ["connect", "idle", "fanout", "throughput", "rooms", "slow", "sensors", "editor", "cluster"]
ONE_ROOM = {"connect", "idle", "fanout", "throughput"}
APPS = ["sensors", "editor", "cluster"]  # server.py only, after the chat scenarios
DEFAULT_SERVERS = ["tornado", "ws-loop", "ws-broadcast", "server"]
SERVER_CORES = {0}
LOADGEN_CORES = {1}
ALL_CORES: set[int] = set()  # the runner's affinity before it pinned itself (the apps' scripts pin from it)


@dataclass
class Profile:
    conns: int
    concurrency: int
    reps: int
    fanout_rate: float       # says per second into the one room
    fanout_secs: float
    throughput_secs: float
    rooms_size: int
    rooms_rate: float        # says per second, all rooms together
    rooms_secs: float
    slow_members: int
    slow_rate: float
    slow_text: int
    slow_control_secs: float
    slow_secs: float
    text_len: int = 100
    settle: float = 1.0
    quiet: float = 3.0       # a run ends this long after the last message arrived ...
    quiet_unacked: float = 10.0  # ... or this long, while some says are not acknowledged yet
    reuse_server: bool = False  # one server for connect..rooms instead of one per group
    inflight_secs: float = 0.5       # throughput: deliveries in flight, in seconds of delivery
    inflight_min: int = 10000        # ... but at least this many deliveries
    inflight_max: int = 200000       # ... and at most this many
    budget: float = 1200.0   # seconds for the whole run; sessions past it are skipped


PROFILES = {
    "quick": Profile(conns=1000, concurrency=100, reps=1, fanout_rate=8, fanout_secs=1.2,
                     throughput_secs=1.2, rooms_size=10, rooms_rate=800,
                     rooms_secs=1.2, slow_members=10, slow_rate=1000, slow_text=1800,
                     slow_control_secs=0.8, slow_secs=2.5, settle=0.2, quiet=1.0, quiet_unacked=3.0,
                     reuse_server=True,
                     budget=150),
    "full": Profile(conns=10000, concurrency=200, reps=3, fanout_rate=1, fanout_secs=8,
                    throughput_secs=5, rooms_size=10, rooms_rate=800,
                    rooms_secs=6, slow_members=20, slow_rate=400, slow_text=1800,
                    slow_control_secs=8, slow_secs=14, settle=1.0, budget=1500),
}


@dataclass
class ServerSpec:
    name: str
    label: str
    argv: Callable[[int, str], list[str]]
    note: str = ""
    required_file: str | None = None


def _baseline(path: str, *extra: str) -> Callable[[int, str], list[str]]:
    return lambda port, _data: [sys.executable, os.path.join(ROOT, path), f"--port={port}",
                                "--address=127.0.0.1", *extra]


SERVERS: dict[str, ServerSpec] = {s.name: s for s in [
    ServerSpec("tornado", "Tornado write_message (demo)",
               _baseline("bench/baselines/tornado_chat.py", "--encode=each"),
               "write_message(dict) to each member: JSON-encoded per recipient, as in Tornado's demos"),
    ServerSpec("tornado-once", "Tornado write_message, encode once",
               _baseline("bench/baselines/tornado_chat.py", "--encode=once"),
               "write_message(str) to each member, the JSON encoded once per message"),
    ServerSpec("ws-loop", "websockets, await send() loop",
               _baseline("bench/baselines/websockets_chat.py", "--fanout=loop"),
               "global set of clients, await send() to each in turn (the tutorial)"),
    ServerSpec("ws-broadcast", "websockets broadcast()",
               _baseline("bench/baselines/websockets_chat.py", "--fanout=broadcast"),
               "the library's broadcast(): no await, no backpressure"),
    ServerSpec("server", "server.py (ours)",
               lambda port, data: [sys.executable, os.path.join(ROOT, "server.py"), f"--port={port}",
                                   "--address=127.0.0.1", f"--data_dir={data}",
                                   "--max_connections_per_ip=0", "--max_half_open_per_ip=0", "--rate_limit=0",
                                   "--room_creates_per_minute=0", "--logging=warning"],
               "durable: each chat message is committed to SQLite before fan-out",
               required_file="server.py"),
]}


# -- progress ---------------------------------------------------------------------


class Progress:
    """One status line on stderr, redrawn in place on a terminal, or a line per change."""

    def __init__(self, total: int) -> None:
        self.start = time.monotonic()
        self.total = total
        self.step = 0
        self.where = ""
        self.detail = ""
        self.tty = sys.stderr.isatty()
        self._last_draw = 0.0
        self._last_line = ""

    def next(self, where: str) -> None:
        self.step += 1
        self.where = where
        self.detail = ""
        self.draw(force=True)

    def stage(self, detail: str) -> None:
        self.detail = detail
        self.draw(force=not self.tty)

    def sub(self, text: str) -> None:
        self.detail = self.detail.split(" · ")[0] + " · " + text
        self.draw()

    def draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < (0.2 if self.tty else 5.0):
            return
        self._last_draw = now
        detail = " · " + self.detail if self.detail else ""
        line = f"[{now - self.start:4.0f}s] {self.step}/{self.total} {self.where}{detail}"
        if self.tty:
            width = shutil.get_terminal_size((100, 20)).columns - 1
            sys.stderr.write("\r" + line[:width].ljust(width))
        elif line != self._last_line:
            sys.stderr.write(line + "\n")
        self._last_line = line
        sys.stderr.flush()

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
        sys.stderr.write("finished in %.0f s\n" % (time.monotonic() - self.start))
        sys.stderr.flush()


# -- the run ----------------------------------------------------------------------


class SessionError(RuntimeError):
    pass


@dataclass
class Running:
    name: str
    child: procs.Child
    port: int
    data_dir: str

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/chat"


class Meter:
    """CPU of the server, the load generator and everything else on their cores, over
    one measured interval. 'other' is what the two cores did beyond our processes:
    other people's work on a shared machine, which the table then flags."""

    def __init__(self, server: procs.Child, pool: procs.WorkerPool) -> None:
        self.server, self.pool = server, pool
        self.t0 = time.monotonic()
        self.srv0, self.lg0, self.me0 = server.cpu_seconds(), pool.cpu_seconds(), procs.own_cpu_seconds()
        self.busy0 = procs.core_busy()

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self.t0
        srv = self.server.cpu_seconds() - self.srv0
        lg = self.pool.cpu_seconds() - self.lg0
        me = procs.own_cpu_seconds() - self.me0
        busy = [b - a for a, b in zip(self.busy0, procs.core_busy())]
        out = {"wall_s": wall, "srv_cpu_s": srv, "lg_cpu_s": lg,
               "srv_cpu_pct": srv / wall * 100, "lg_cpu_pct": lg / wall * 100}
        if SERVER_CORES and LOADGEN_CORES:
            srv_core = sum(busy[c] for c in SERVER_CORES if c < len(busy))
            lg_core = sum(busy[c] for c in LOADGEN_CORES if c < len(busy))
            out["other_srv_core_pct"] = max(0.0, srv_core - srv) / wall * 100
            out["other_lg_core_pct"] = max(0.0, lg_core - lg - me) / wall * 100
        return out


@dataclass
class Sample:
    """Peak server RSS while a run is in progress."""
    child: procs.Child | None = None
    peak: int = 0
    last: float = 0.0

    def __call__(self) -> None:
        now = time.monotonic()
        if self.child is not None and now - self.last >= 0.1:
            self.last = now
            self.peak = max(self.peak, self.child.rss())


@dataclass
class Bench:
    args: argparse.Namespace
    profile: Profile
    results: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.started = time.monotonic()
        self.log_dir = tempfile.mkdtemp(prefix="bench-logs-")
        self.pool: procs.WorkerPool | None = None
        self.tag = 0
        self.sample = Sample()
        self.write_cap: int | None = self.args.write_cap
        self.write_cap_source = "--write-cap" if self.args.write_cap else ""
        self.data_dirs: list[str] = []
        self.waited = 0.0

    # -- processes -------------------------------------------------------------

    def start_pool(self) -> None:
        workers = []
        for i in range(self.args.workers):
            child = procs.Child([sys.executable, os.path.join(ROOT, "bench", "loadgen.py")],
                                cores=LOADGEN_CORES, cwd=ROOT, pipes=True,
                                log_path=os.path.join(self.log_dir, f"loadgen-{i}.log"))
            workers.append(procs.Worker(child))
        self.pool = procs.WorkerPool(workers)
        ready = self.pool.wait_ready(30)
        self.client_kind = "picows + uvloop" if all(r.get("picows") for r in ready) else "websockets (fallback)"

    def restart_pool(self) -> None:
        if self.pool:
            self.pool.close()
        self.start_pool()

    def start_server(self, name: str, session: str) -> Running:
        spec = SERVERS[name]
        if spec.required_file and not os.path.exists(os.path.join(ROOT, spec.required_file)):
            raise SessionError(f"not available: {spec.required_file} does not exist yet")
        port = procs.free_port()
        data_dir = tempfile.mkdtemp(prefix=f"bench-{name}-")
        self.data_dirs.append(data_dir)
        argv = spec.argv(port, data_dir)
        if name == "server":
            argv += self.args.server_arg
        child = procs.Child(argv, cores=SERVER_CORES, cwd=ROOT,
                            log_path=os.path.join(self.log_dir, f"{name}-{session}.log"))
        if not procs.wait_for_port(port, child, 30):
            tail = child.log_tail(4)
            code = child.stop(grace=2)
            shutil.rmtree(data_dir, ignore_errors=True)
            last = tail.splitlines()[-1] if tail else f"exit code {code}"
            raise SessionError(f"not available: did not start ({last[:200]})")
        time.sleep(self.profile.settle)  # import-time allocations settle before the first RSS reading
        return Running(name, child, port, data_dir)

    def stop_server(self, srv: Running) -> None:
        srv.child.stop(grace=5)
        shutil.rmtree(srv.data_dir, ignore_errors=True)

    def discover_write_cap(self) -> None:
        """The real server's per-connection unflushed-bytes cap, from its --help."""
        if self.write_cap or not os.path.exists(os.path.join(ROOT, "server.py")):
            return
        try:
            out = subprocess.run([sys.executable, os.path.join(ROOT, "server.py"), "--help"], cwd=ROOT,
                                 capture_output=True, text=True, timeout=20, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return
        text = out.stdout + out.stderr
        for arg in self.args.server_arg:  # an explicit override wins
            m = re.match(r"--max[-_]write[-_]buffer=(\d+)$", arg)
            if m:
                self.write_cap, self.write_cap_source = int(m.group(1)), "--server-arg"
                return
        m = re.search(r"--max[-_]write[-_]buffer\b.*?\(default (\d+)\)", text, re.DOTALL)
        if m:
            self.write_cap, self.write_cap_source = int(m.group(1)), "server.py --help (max_write_buffer)"

    # -- helpers ---------------------------------------------------------------

    def over_budget(self) -> bool:
        return time.monotonic() - self.started > self.profile.budget

    def record(self, scenario: str, server: str, result: dict[str, Any]) -> None:
        self.results.setdefault(scenario, {})[server] = result

    def call(self, cmd: str, wait: float, per_worker: list[dict[str, Any]] | None = None,
             **kw: Any) -> list[dict[str, Any]]:
        assert self.pool is not None
        return self.pool.call(cmd, wait, per_worker, tick=self.tick, on_progress=self.progress.sub, **kw)

    def tick(self) -> None:
        self.sample()
        self.progress.draw()

    def connect_some(self, srv: Running, n: int) -> dict[str, Any]:
        """:meth:`connect`, failing the session when not one connection succeeded."""
        con = self.connect(srv, n)
        if con["conns"] == 0:
            raise SessionError("no connection succeeded: {}".format("; ".join(con["failures"])))
        return con

    def connect(self, srv: Running, n: int) -> dict[str, Any]:
        w = self.args.workers
        timeout = max(30.0, n / 100)
        assert self.pool is not None, "start_pool() first"
        meter = Meter(srv.child, self.pool)
        replies = self.call("connect", timeout + 30,
                            [{"start": i, "stop": n, "step": w} for i in range(w)],
                            url=srv.url, concurrency=max(1, self.args.concurrency // w), timeout=timeout)
        cpu = meter.stop()
        connected = sum(r["connected"] for r in replies)
        secs = max(r["seconds"] for r in replies)
        hist = merged(r["hist"] for r in replies)
        failures = [f for r in replies for f in r["failures"]]
        return dict(cpu, conns=connected, wanted=n, failed=n - connected, failures=failures[:3],
                    rate=connected / secs if secs > 0 else None,
                    us_per_unit=cpu["srv_cpu_s"] / connected * 1e6 if connected else None,
                    p50_ms=_ms(hist.percentile_us(50)), p99_ms=_ms(hist.percentile_us(99)))

    def join(self, mode: str, size: int, expected: int) -> dict[str, Any]:
        replies = self.call("join", 90, mode=mode, size=size, timeout=60)
        joined = sum(r["clients"] for r in replies)
        if joined == 0:
            raise SessionError(f"no client could join ({expected} connected)")
        return {"joined": joined, "publishers": sum(r["publishers"] for r in replies),
                "timed_out": any(r["timed_out"] for r in replies)}

    def measured_run(self, srv: Running, publish: dict[str, Any], drain_timeout: float = 30.0) -> dict[str, Any]:
        """Publish, wait for delivery, and turn both sides' counters into one result."""
        self.tag = (self.tag + 1) % 10000
        self.call("reset", 10, tag=f"{self.tag:04d}")
        commits0 = store_commits(srv)
        assert self.pool is not None, "start_pool() first"
        meter = Meter(srv.child, self.pool)
        t0_ns = time.monotonic_ns()
        pubs = self.call("publish", publish["duration"] + 30, **publish)
        published: dict[str, int] = {}
        windows = [r["window"] for r in pubs if r.get("window")]
        for reply in pubs:
            for room, count in reply["published"].items():
                published[room] = published.get(room, 0) + count
        acks_expected = [{"acks_expected": sum(r["published"].values())} for r in pubs]
        drains = self.call("drain", drain_timeout + 15, acks_expected, published=published,
                           quiet=self.profile.quiet, quiet_unacked=self.profile.quiet_unacked,
                           timeout=drain_timeout)
        cpu = meter.stop()
        if not srv.child.alive():
            raise SessionError(f"server exited during the run: {srv.child.log_tail(2)}")
        commits1 = store_commits(srv)
        delivered = sum(d["recv_fast"] + d["recv_stalled"] for d in drains)
        last_ns = max(d["last_recv_ns"] for d in drains)
        # Rate over the publishing time, or until the last arrival if that came later.
        span = max((last_ns - t0_ns) / 1e9, publish["duration"]) if last_ns else None
        hist = merged(d["hist"] for d in drains)
        codes: dict[str, int] = {}
        for d in drains:
            for code, count in d["close_codes"].items():
                codes[code] = codes.get(code, 0) + count
        return dict(
            cpu, published=sum(published.values()), acks=sum(d["acks"] for d in drains),
            expected=sum(d["expected_fast"] for d in drains), delivered=delivered,
            rate=delivered / span if span else None,
            us_per_msg=cpu["srv_cpu_s"] / delivered * 1e6 if delivered else None,
            p50_ms=_ms(hist.percentile_us(50)), p99_ms=_ms(hist.percentile_us(99)), samples=hist.n,
            lost=sum(d["lost_fast"] for d in drains), dup=sum(d["dup_fast"] for d in drains),
            errors=sum(d["errors"] for d in drains),
            error_text=next((d["error_text"] for d in drains if d["error_text"]), ""),
            disconnects=sum(d["disconnects"] for d in drains), close_codes=codes,
            stale=sum(d["stale"] for d in drains),
            commits=commits1 - commits0 if commits0 is not None and commits1 is not None else None,
            inflight=windows[0] * sum(d["expected_fast"] for d in drains) / max(1, sum(published.values()))
            if windows else None)

    def repeat(self, srv: Running, label: str, reps: int, publish: dict[str, Any]) -> dict[str, Any]:
        runs = []
        for rep in range(reps):
            self.progress.stage(f"{label} run {rep + 1}/{reps}")
            runs.append(self.measured_run(srv, publish))
        return summarize(runs)

    # -- sessions --------------------------------------------------------------

    def run_system(self, name: str) -> None:
        """Every selected scenario against one system: a fresh server per group of
        scenarios, or (``reuse_server``, the quick profile) one server for the one-room and
        the many-rooms groups. ``slow`` always gets a fresh server: memory that an earlier
        group freed would hide the growth it measures."""
        groups = self.groups(name)
        srv: Running | None = None
        for index, (scenarios, body) in enumerate(groups):
            self.progress.next(f"{name} · {'+'.join(scenarios)}")
            if self.over_budget():
                self.fail(name, scenarios, f"skipped: over the {self.profile.budget:.0f} s time budget")
                continue
            fresh = srv is None
            if srv is None:
                self.wait_quiet()
            try:
                if srv is None:
                    self.progress.stage("starting")
                    srv = self.start_server(name, scenarios[0])
                    self.sample = Sample(srv.child)
                body(srv, fresh)
            except (SessionError, procs.WorkerError) as exc:
                self.fail(name, scenarios, str(exc))
                if isinstance(exc, procs.WorkerError):
                    self.restart_pool()
                if str(exc).startswith("not available"):
                    for rest, _ in groups[index + 1:]:
                        self.progress.next(f"{name} · {'+'.join(rest)}")
                        self.fail(name, rest, str(exc))
                    return
            # Ctrl-C and SIGTERM skip this: procs.stop_all() has already stopped everything.
            if srv is not None:
                self.close_clients()
                next_is_slow = index + 1 < len(groups) and groups[index + 1][0] == ["slow"]
                if not self.profile.reuse_server or next_is_slow or not srv.child.alive():
                    self.stop_server(srv)
                    srv = None
                    self.sample = Sample()
        if srv is not None:
            self.stop_server(srv)
        self.sample = Sample()

    def wait_quiet(self) -> None:
        """Before starting a server, wait (within ``--wait-quiet`` seconds for the whole run)
        until other processes use less than a quarter of either core."""
        while self.waited < self.args.wait_quiet:
            before, t0 = procs.core_busy(), time.monotonic()
            time.sleep(1.0)
            busy = [(b - a) / (time.monotonic() - t0) for a, b in zip(before, procs.core_busy())]
            self.waited += time.monotonic() - t0
            if max(busy) < 0.25:
                return
            self.progress.stage(f"waiting for a quiet machine (cores {' '.join(f'{b:.0%}' for b in busy)} busy)")

    def groups(self, name: str) -> list[tuple[list[str], Callable[[Running, bool], None]]]:
        """The selected scenarios in groups that share one set of connections."""
        groups: list[tuple[list[str], Callable[[Running, bool], None]]] = []
        one = [s for s in SCENARIOS if s in ONE_ROOM and s in self.args.scenarios]
        if one:
            groups.append((one, lambda srv, fresh: self.one_room(name, one, srv)))
        if "rooms" in self.args.scenarios:
            groups.append((["rooms"], lambda srv, fresh: self.rooms(name, srv, fresh)))
        if "slow" in self.args.scenarios:  # last: it can leave a server wedged (ws-loop)
            groups.append((["slow"], lambda srv, fresh: self.slow(name, srv)))
        return groups

    def fail(self, name: str, scenarios: list[str], why: str) -> None:
        for sc in scenarios:
            self.results.setdefault(sc, {}).setdefault(name, {}).setdefault("error", why)

    def close_clients(self) -> None:
        try:
            self.call("close", 20, timeout=5)
        except procs.WorkerError:
            self.restart_pool()

    def one_room(self, name: str, scenarios: list[str], srv: Running) -> None:
        p = self.profile
        rss0 = srv.child.rss()
        self.progress.stage(f"connecting {p.conns}")
        con = self.connect_some(srv, p.conns)
        self.record("connect", name, con)
        time.sleep(p.settle)
        rss1 = srv.child.rss()
        self.record("idle", name, {"conns": con["conns"], "rss_before": rss0, "rss_after": rss1,
                                   "kib_per_conn": (rss1 - rss0) / con["conns"] / 1024})
        if not {"fanout", "throughput"} & set(scenarios):
            return
        self.progress.stage("joining one room")
        joined = self.join("one", 1, con["conns"])
        time.sleep(p.settle)
        base = {"conns": joined["joined"], "rooms": 1,
                "kib_per_conn": (srv.child.rss() - rss0) / joined["joined"] / 1024,
                "join_timed_out": joined["timed_out"]}
        if "fanout" in scenarios:
            res = self.repeat(srv, "fanout", p.reps, {
                "mode": "rate", "rate": p.fanout_rate, "total_publishers": joined["publishers"],
                "duration": p.fanout_secs, "text_len": p.text_len})
            res.update(base, offered=p.fanout_rate * joined["joined"])
            self.record("fanout", name, res)
        if "throughput" in scenarios:
            members = joined["joined"]
            res = self.repeat(srv, "throughput", p.reps, {
                "mode": "window", "window_min": max(2, -(-p.inflight_min // members)),
                "window_max": max(2, p.inflight_max // members), "window_secs": p.inflight_secs,
                "duration": p.throughput_secs, "text_len": p.text_len})
            res.update(base)
            self.record("throughput", name, res)

    def rooms(self, name: str, srv: Running, fresh: bool) -> None:
        p = self.profile
        rss0 = srv.child.rss()
        self.progress.stage(f"connecting {p.conns}")
        con = self.connect_some(srv, p.conns)
        self.progress.stage(f"joining rooms of {p.rooms_size}")
        joined = self.join("groups", p.rooms_size, con["conns"])
        time.sleep(p.settle)
        # On a server that already served a scenario, freed memory is reused: no figure.
        kib = (srv.child.rss() - rss0) / joined["joined"] / 1024 if fresh else None
        res = self.repeat(srv, "rooms", p.reps, {
            "mode": "rate", "rate": p.rooms_rate, "total_publishers": joined["publishers"],
            "duration": p.rooms_secs, "text_len": p.text_len})
        res.update(conns=joined["joined"], rooms=joined["publishers"], kib_per_conn=kib,
                   offered=p.rooms_rate * p.rooms_size, join_timed_out=joined["timed_out"])
        self.record("rooms", name, res)

    def slow(self, name: str, srv: Running) -> None:
        p = self.profile
        publish = {"mode": "rate", "rate": p.slow_rate, "total_publishers": 1, "text_len": p.slow_text}
        self.progress.stage(f"connecting {p.slow_members}")
        con = self.connect_some(srv, p.slow_members)
        joined = self.join("one", 1, con["conns"])
        time.sleep(p.settle)
        self.progress.stage("control run, every client reading")
        control = self.measured_run(srv, dict(publish, duration=p.slow_control_secs))
        stalled = sum(r["stalled"] for r in self.call("stall", 10, every=5))
        time.sleep(0.2)
        rss_before = srv.child.rss()
        self.sample.peak = rss_before
        self.progress.stage(f"{stalled} of {joined['joined']} clients stalled")
        run = self.measured_run(srv, dict(publish, duration=p.slow_secs))
        peak = max(self.sample.peak, srv.child.rss())
        self.progress.stage("reading the stalled clients' sockets again")
        resumed = self.call("resume", 20, quiet=0.3, timeout=3)
        codes: dict[str, int] = {}
        for r in resumed:
            for code, count in r["close_codes"].items():
                codes[code] = codes.get(code, 0) + count
        cap = self.write_cap if name == "server" else None
        run.update(conns=joined["joined"], stalled=stalled, control=control,
                   rss_before=rss_before, rss_peak=peak, growth=peak - rss_before,
                   bound=stalled * cap if cap else None, write_cap=cap,
                   stalled_closed=sum(r["disconnected_stalled"] for r in resumed),
                   stalled_close_codes=codes,
                   p99_ratio=(run["p99_ms"] / control["p99_ms"]
                              if run["p99_ms"] and control["p99_ms"] else None))
        self.record("slow", name, run)

    def apps(self) -> list[str]:
        return [s for s in APPS if s in self.args.scenarios]

    def run(self) -> None:
        apps = self.apps()
        self.progress = Progress(sum(len(self.groups(name)) for name in self.args.servers) + len(apps))
        if "server" in self.args.servers:
            self.discover_write_cap()
        if any(self.groups(name) for name in self.args.servers):
            self.start_pool()
            for name in self.args.servers:
                self.run_system(name)
        if self.pool:
            self.pool.close()
            self.pool = None
        for scenario in apps:
            self.run_app(scenario)
        self.progress.done()

    def run_app(self, scenario: str) -> None:
        """One of the other apps' scenario scripts, against server.py only: the script starts
        its own server on core 0 and runs its clients here, on the load generator's core."""
        self.progress.next(f"server · {scenario}")
        if "server" not in self.args.servers:
            self.fail("server", [scenario], "not run: --servers does not include server")
            return
        if not os.path.exists(os.path.join(ROOT, "server.py")):
            self.fail("server", [scenario], "not available: server.py does not exist yet")
            return
        if self.over_budget():
            self.fail("server", [scenario], f"skipped: over the {self.profile.budget:.0f} s time budget")
            return
        self.wait_quiet()
        self.progress.stage("running bench/{}_scenario.py{}".format(scenario, " --quick" if self.args.quick else ""))
        module = importlib.import_module(f"bench.{scenario}_scenario")
        pinned = os.sched_getaffinity(0) if ALL_CORES else None
        try:
            if ALL_CORES:  # the script pins its server to the first core and itself to the rest
                os.sched_setaffinity(0, ALL_CORES)
            raw = module.run(self.args.quick)
        except Exception as exc:  # a failed scenario is a row with its error, not a failed run
            self.fail("server", [scenario], f"failed: {type(exc).__name__}: {exc}"[:300])
            return
        finally:
            if pinned:
                os.sched_setaffinity(0, pinned)
        self.record(scenario, "server", app_record(scenario, raw))
        if not hasattr(self, "client_kind"):  # no chat scenario ran: name the scripts' client
            self.client_kind = raw.get("client", "?")


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of the rates, costs and percentiles over repeated runs; totals of the counts."""
    out: dict[str, Any] = {"reps": len(runs), "runs": runs}
    for key in ("rate", "us_per_msg", "p50_ms", "p99_ms", "srv_cpu_pct", "lg_cpu_pct", "inflight",
                "other_srv_core_pct", "other_lg_core_pct"):
        values = [r[key] for r in runs if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    for key in ("published", "acks", "expected", "delivered", "lost", "dup", "errors", "disconnects", "stale"):
        out[key] = sum(r[key] for r in runs)
    out["error_text"] = next((r["error_text"] for r in runs if r["error_text"]), "")
    commits = [r.get("commits") for r in runs]
    out["commits"] = sum(commits) if commits and None not in commits else None  # type: ignore[arg-type]
    codes: dict[str, int] = {}
    for r in runs:
        for code, count in r["close_codes"].items():
            codes[code] = codes.get(code, 0) + count
    out["close_codes"] = codes
    return out


def store_commits(srv: Running) -> int | None:
    """server.py's count of SQLite commits so far (its /healthz), read outside measured
    intervals; None for the baselines or when it cannot be read."""
    if srv.name != "server":
        return None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/healthz", timeout=2) as resp:
            return int(json.loads(resp.read())["store"]["commits"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _ms(us: float | None) -> float | None:
    return us / 1000 if us is not None else None


def _num(value: Any) -> float | None:
    """A measurement, or None for a missing or NaN one."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def app_record(scenario: str, raw: dict[str, Any]) -> dict[str, Any]:
    """A scenario script's result in the runner's vocabulary (the keys report.py reads:
    rate, us_per_msg, p50_ms, p99_ms, srv_cpu_pct, lg_cpu_pct, other_*_core_pct), with
    the script's own dict kept under ``raw``."""
    if scenario == "sensors":
        return {
            "conns": raw["connected"], "viewers": raw["viewers"], "sensors": raw["sensors"], "hz": raw["hz"],
            "rate": _num(raw["batches_per_s"]), "ideal": raw["ideal_batches_per_s"],
            "us_per_msg": _num(raw["server_cpu_us_per_batch"]),
            "p50_ms": _num(raw["latency_p50_ms"]), "p99_ms": _num(raw["latency_p99_ms"]),
            "max_ms": _num(raw["latency_max_ms"]),
            "srv_cpu_pct": raw["server_cpu_pct"], "lg_cpu_pct": raw["loadgen_cpu_pct"],
            "other_srv_core_pct": raw.get("other_srv_core_pct"), "other_lg_core_pct": raw.get("other_lg_core_pct"),
            "connect_failures": raw["connect_failures"], "first_failure": raw["first_failure"],
            "errors": raw["errors"], "error_text": raw["error_text"], "closed_early": raw["closed_early"],
            "duration_s": raw["duration_s"], "client": raw["client"], "pinned": raw["pinned"], "raw": raw}
    if scenario == "editor":
        return {
            "conns": raw["editors"], "editors": raw["editors"], "offered": raw["target_ops_per_s"],
            "rate": _num(raw["applied_ops_per_s"]), "applied": raw["applied_ops"], "edits": raw["edits"],
            "us_per_msg": _num(raw["server_cpu_us_per_op"]),
            "p50_ms": _num(raw["ack_p50_ms"]), "p99_ms": _num(raw["ack_p99_ms"]), "max_ms": _num(raw["ack_max_ms"]),
            "srv_cpu_pct": raw["server_cpu_pct"], "lg_cpu_pct": raw["loadgen_cpu_pct"],
            "other_srv_core_pct": raw.get("other_load_on_server_core_pct"),
            "other_lg_core_pct": raw.get("other_load_on_loadgen_core_pct"),
            "converged": raw["converged"], "durable": raw["durable"], "errors": raw["errors"],
            "error_text": str(raw.get("first_error") or "")[:200], "disconnects": raw["disconnects"],
            "final_rev": raw["final_rev"], "final_length": raw["final_length"],
            "duration_s": raw["duration_s"], "client": raw["client"], "raw": raw}
    if scenario == "cluster":
        rows = [r for cfg in raw.get("configs", {}).values() for r in cfg.values() if "error" not in r]
        a = raw.get("configs", {}).get("a", {}).get("fanout", {})
        return {"conns": a.get("conns"), "rate": _num(a.get("rate")), "us_per_msg": _num(a.get("us_per_msg")),
                "other_srv_core_pct": max((r.get("other_srv_core_pct") or 0 for r in rows), default=None),
                "other_lg_core_pct": max((r.get("other_lg_core_pct") or 0 for r in rows), default=None),
                "duration_s": raw.get("duration_s"), "client": raw.get("client", "?"), "raw": raw}
    raise ValueError(f"unknown app scenario {scenario!r}")


# -- machine and output -----------------------------------------------------------


def machine_info() -> dict[str, Any]:
    import psutil
    import tornado
    import websockets
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {"python": platform.python_version(), "tornado": tornado.version,
                "websockets": websockets.__version__}
    for mod in ("picows", "uvloop"):
        try:
            versions[mod] = __import__(mod).__version__
        except (ImportError, AttributeError):
            versions[mod] = "missing"
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            somaxconn = f.read().strip()
    except OSError:
        somaxconn = "?"
    return {"cpu": model, "cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "kernel": platform.release(), "versions": versions, "somaxconn": somaxconn,
            "loadavg_start": os.getloadavg()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run the benchmarks and print a table.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=f"servers: {', '.join(SERVERS)}\nscenarios: {', '.join(SCENARIOS)}")
    parser.add_argument("--quick", action="store_true", help="small counts, about a minute")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset")
    parser.add_argument("--servers", default=",".join(DEFAULT_SERVERS), help="comma-separated subset")
    parser.add_argument("--connections", type=int, help="override the profile's connection count")
    parser.add_argument("--reps", type=int, help="override the profile's repetitions per scenario")
    parser.add_argument("--concurrency", type=int, help="handshakes in flight while connecting")
    parser.add_argument("--workers", type=int, default=1,
                        help="load generator processes (all on the load generator's core)")
    parser.add_argument("--write-cap", type=int, default=None,
                        help="server.py's per-connection unflushed-bytes cap (default: read from its --help)")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra argument for server.py (repeatable), e.g. --server-arg=--max_write_buffer=262144")
    parser.add_argument("--wait-quiet", type=float, default=None,
                        help="seconds the whole run may spend, before starting each server, waiting for "
                             "other processes to leave the cores (default: 0 with --quick, 180 otherwise)")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "BENCHMARKS.md"))
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ and bench/results/ alone")
    parser.add_argument("--merge", action="store_true",
                        help="replace only the selected scenarios' sections of the existing --out page (each marked "
                             "with this run's command and date), keeping the rest as the run that wrote it")
    args = parser.parse_args(argv)
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    args.servers = [s for s in args.servers.split(",") if s]
    for s in args.scenarios:
        if s not in SCENARIOS:
            parser.error("unknown scenario {!r} (choose from {})".format(s, ", ".join(SCENARIOS)))
    for s in args.servers:
        if s not in SERVERS:
            parser.error("unknown server {!r} (choose from {})".format(s, ", ".join(SERVERS)))
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    profile = PROFILES["quick" if args.quick else "full"]
    if args.connections:
        profile.conns = args.connections
    if args.reps:
        profile.reps = args.reps
    args.concurrency = args.concurrency or profile.concurrency
    if args.wait_quiet is None:
        args.wait_quiet = 0.0 if args.quick else 180.0
    procs.install_cleanup()
    global SERVER_CORES, LOADGEN_CORES, ALL_CORES
    if (os.cpu_count() or 1) < 2:
        SERVER_CORES = LOADGEN_CORES = set()  # one core: nothing to pin apart
    else:
        ALL_CORES = os.sched_getaffinity(0)
        os.sched_setaffinity(0, LOADGEN_CORES)  # the runner stays off the server's core
    command = "python bench/run.py" + "".join(" " + shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    meta = {"command": command, "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "mode": "quick" if args.quick else "full", "machine": machine_info(), "profile": asdict(profile),
            "pinning": {"server": sorted(SERVER_CORES), "loadgen": sorted(LOADGEN_CORES)},
            "workers": args.workers, "concurrency": args.concurrency,
            "servers": {n: asdict_spec(SERVERS[n]) for n in args.servers}}
    bench = Bench(args, profile)
    try:
        bench.run()
    except KeyboardInterrupt:
        print("\ninterrupted: every server and load generator was stopped", file=sys.stderr)
        shutil.rmtree(bench.log_dir, ignore_errors=True)
        return 130
    finally:
        procs.stop_all()
        for path in bench.data_dirs:
            shutil.rmtree(path, ignore_errors=True)
    meta["client"] = getattr(bench, "client_kind", "?")
    meta["loadavg_end"] = os.getloadavg()
    meta["elapsed_s"] = round(time.monotonic() - bench.started, 1)
    meta["write_cap"] = bench.write_cap
    meta["write_cap_source"] = bench.write_cap_source
    meta["waited_s"] = round(bench.waited)
    text = report.render(meta, bench.results, args.scenarios, args.servers)
    print(text)
    if not args.no_write:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        old_page = ""
        if os.path.exists(args.out):
            with open(args.out) as f:
                old_page = f.read()
        if args.merge and old_page:
            text = report.merge_sections(old_page, text, args.scenarios, meta)
        with open(args.out, "w") as f:
            f.write(report.keep_sections(old_page, text))
        results_dir = os.path.join(ROOT, "bench", "results")
        os.makedirs(results_dir, exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = os.path.join(results_dir, "{}-{}.json".format(stamp, meta["mode"]))
        with open(path, "w") as f:
            json.dump({"meta": meta, "results": bench.results}, f, indent=1, default=str)
        print(f"wrote {os.path.relpath(args.out, ROOT)} and {os.path.relpath(path, ROOT)}", file=sys.stderr)
    if any("error" in r for by_server in bench.results.values() for r in by_server.values()):
        print(f"server and load generator logs kept in {bench.log_dir}", file=sys.stderr)
    else:
        shutil.rmtree(bench.log_dir, ignore_errors=True)
    return 0


def asdict_spec(spec: ServerSpec) -> dict[str, str]:
    return {"label": spec.label, "note": spec.note}


if __name__ == "__main__":
    sys.exit(main())
