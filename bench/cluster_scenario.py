"""Benchmark scenario: the same chat load on one node and across nodes (cluster mode).

    python bench/cluster_scenario.py --quick     # about 40 s
    python bench/cluster_scenario.py             # about 2 minutes (runs of 4-5 s, two of each)
    python bench/cluster_scenario.py --json

or from Python: ``bench.cluster_scenario.run(quick: bool) -> dict`` (bench/run.py's
``cluster`` scenario).

Three set-ups, one after the other, each fresh (new data_dir, new redis-server):

* ``a``: one ``server.py``, memory backplane: history in SQLite (``synchronous=FULL``);
* ``b``: one ``server.py`` on Redis (``--backplane=redis://...``; redis-server with
  ``appendonly yes``, ``appendfsync always``, as docs/DEPLOY.md asks);
* ``c``: two ``server.py`` on that Redis, the members split between them.

Each gets two loads, from bench/loadgen.py's clients: ``fanout`` (one room, every client a
member, one member says ~100-byte texts at a steady rate) and ``rooms`` (rooms of 10, the
first member of each says, a steady total rate).  In ``c`` client ``i`` of room ``r``
connects to node ``(i + r) % 2``: half of every room is on each node, and the rooms'
speakers alternate between the nodes.  Every client is counted as *local* (on its room
speaker's node) or *remote* (on the other node, reached through Redis pub/sub).

Measured per run, over the same wall time: every node's and redis-server's own CPU
(user+system, all threads, from /proc through psutil, by pid), the deliveries each node
made, say -> ack latency at the speaker (the ack comes after Redis -- or SQLite -- stored
the message: with ``appendfsync always``, after the fsync), delivery latency (the
speaker's clock in the text, subtracted on arrival) for all and for the remote members,
and messages lost.  In ``full`` mode also the idle cost: the CPU of the nodes and Redis
over a window with the members joined and nothing said (presence heartbeats).

Placement: two cores, so every node *and* redis-server share core 0, and the load
generator (and this process) has core 1.  There is no idle core left on which a second
node could show more throughput; what carries over to a cluster of machines is CPU per
delivery (a node of its own machine gets a core to itself), which needs no idle core.

Every connection goes to 127.0.0.1; every process is pinned, bounded in time and stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import procs  # noqa: E402
from bench.latency import merged  # noqa: E402
from tests.redis_server import redis_argv, wait_for_redis  # noqa: E402

CONFIGS = [
    ("a", "one node, memory backplane (SQLite)", 1, False),
    ("b", "one node, Redis", 1, True),
    ("c", "two nodes, Redis", 2, True),
]
NODE_NAMES = "AB"


@dataclass
class ClusterProfile:
    fanout_members: int
    fanout_rate: float     # says per second into the one room
    fanout_secs: float
    rooms_conns: int
    rooms_size: int
    rooms_rate: float      # says per second, all rooms together
    rooms_secs: float
    reps: int
    idle_secs: float       # 0: no idle measurement
    text_len: int = 100
    settle: float = 0.5
    quiet: float = 1.0
    quiet_unacked: float = 4.0
    concurrency: int = 100
    editors: int = 50
    edit_rate: float = 1000.0
    edit_secs: float = 2.0


PROFILES = {
    "quick": ClusterProfile(fanout_members=1000, fanout_rate=8, fanout_secs=1.5, rooms_conns=500, rooms_size=10,
                            rooms_rate=200, rooms_secs=1.5, reps=1, idle_secs=0),
    "full": ClusterProfile(fanout_members=2000, fanout_rate=8, fanout_secs=5, rooms_conns=2000, rooms_size=10,
                           rooms_rate=400, rooms_secs=4, reps=2, idle_secs=5.5, quiet=1.5, quiet_unacked=6.0,
                           edit_secs=6.0),
}


class ScenarioError(RuntimeError):
    pass


def node_of(index: int, room_size: int, nodes: int) -> int:
    """Which node client ``index`` connects to: half of every room on each node, and the
    rooms' first members (their speakers) alternate between the nodes."""
    return (index + index // room_size) % nodes


class Setup:
    """One configuration's processes: redis-server (or none) and its nodes."""

    def __init__(self, name: str, nodes: int, redis: bool, server_cores: set[int] | None, workdir: str) -> None:
        self.name = name
        self.dir = tempfile.mkdtemp(prefix=f"cluster-{name}-", dir=workdir)
        self.server_cores = server_cores
        self.redis: procs.Child | None = None
        self.backplane = "memory"
        self.nodes: list[procs.Child] = []
        self.ports: list[int] = []
        if redis:
            binary = shutil.which("redis-server")
            if binary is None:
                raise ScenarioError("not available: redis-server is not installed (apt-get install redis-server)")
            port = procs.free_port()
            rdir = os.path.join(self.dir, "redis")
            os.makedirs(rdir)
            self.redis = procs.Child(redis_argv(binary, port, rdir), cores=server_cores, cwd=rdir,
                                     log_path=os.path.join(self.dir, "redis.out"))
            why = wait_for_redis(port, self.redis.alive)
            if why is not None:
                raise ScenarioError(f"redis-server {why}: " + self.redis.log_tail(2))
            self.backplane = f"redis://127.0.0.1:{port}/0"
        for i in range(nodes):
            port = procs.free_port()
            argv = [sys.executable, os.path.join(ROOT, "server.py"), f"--port={port}", "--address=127.0.0.1",
                    f"--data_dir={os.path.join(self.dir, 'node%d' % i)}", f"--backplane={self.backplane}",
                    "--max_connections_per_ip=0", "--max_half_open_per_ip=0", "--rate_limit=0", "--logging=warning",
                    "--room_creates_per_minute=0",
                    "--simulated_sensors=", "--host_metrics=false"]
            child = procs.Child(argv, cores=server_cores, cwd=ROOT, log_path=os.path.join(self.dir, f"node{i}.log"))
            self.nodes.append(child)
            self.ports.append(port)
            if not procs.wait_for_port(port, child, 30):
                raise ScenarioError(f"node {i} did not start: {child.log_tail(3)}")

    def _redis_client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.backplane, socket_timeout=5)

    def reset_redis_stats(self) -> None:
        if self.redis is None:
            return
        client = self._redis_client()
        try:
            client.config_resetstat()
        finally:
            client.close()
        times = self.redis.ps.cpu_times()
        self._redis_times = (times.user, times.system)

    def redis_profile(self, cpu_s: float, says: int) -> dict[str, Any] | None:
        """Where redis-server's time went since :meth:`reset_redis_stats`: its own
        accounting of command execution (INFO commandstats: the say script with the
        commands it runs, the rest), and the kernel's share of its CPU (system time:
        the fsync of every write with ``appendfsync always``, and the sockets)."""
        if self.redis is None or not says:
            return None
        client = self._redis_client()
        try:
            stats = client.info("commandstats")
        finally:
            client.close()
        usec = {name.removeprefix("cmdstat_"): v["usec"] for name, v in stats.items()}
        script = usec.get("evalsha", 0) + usec.get("eval", 0)
        times = self.redis.ps.cpu_times()
        user, system = times.user - self._redis_times[0], times.system - self._redis_times[1]
        return {"script_us_per_say": script / says,
                "other_commands_us_per_say": (sum(usec.values()) - script) / says,
                "outside_commands_us_per_say": max(0.0, cpu_s * 1e6 - sum(usec.values())) / says,
                "system_share": system / (user + system) if user + system > 0 else None,
                "commands": dict(sorted(usec.items(), key=lambda kv: -kv[1])[:8])}

    def url(self, node: int) -> str:
        return f"ws://127.0.0.1:{self.ports[node]}/ws/chat"

    def cpu(self) -> tuple[list[float], float]:
        return [n.cpu_seconds_fine() for n in self.nodes], (self.redis.cpu_seconds_fine() if self.redis else 0.0)

    def check_alive(self) -> None:
        for i, node in enumerate(self.nodes):
            if not node.alive():
                raise ScenarioError(f"node {NODE_NAMES[i]} exited during the run: {node.log_tail(2)}")
        if self.redis is not None and not self.redis.alive():
            raise ScenarioError("redis-server exited during the run")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop(grace=5)
        if self.redis is not None:
            self.redis.stop(grace=5)
        shutil.rmtree(self.dir, ignore_errors=True)


class Meter:
    """CPU of every node, Redis, the load generator and the cores, over one interval."""

    def __init__(self, setup: Setup, pool: procs.WorkerPool, server_cores: set[int] | None,
                 gen_cores: set[int] | None) -> None:
        self.setup, self.pool = setup, pool
        self.server_cores, self.gen_cores = server_cores, gen_cores
        self.t0 = time.monotonic()
        self.nodes0, self.redis0 = setup.cpu()
        self.lg0, self.me0 = pool.cpu_seconds(), procs.own_cpu_seconds()
        self.busy0 = procs.core_busy()

    def stop(self) -> dict[str, Any]:
        wall = time.monotonic() - self.t0
        nodes1, redis1 = self.setup.cpu()
        nodes = [b - a for a, b in zip(self.nodes0, nodes1)]
        redis = redis1 - self.redis0
        lg = self.pool.cpu_seconds() - self.lg0
        me = procs.own_cpu_seconds() - self.me0
        busy = [b - a for a, b in zip(self.busy0, procs.core_busy())]
        ours = sum(nodes) + redis
        out: dict[str, Any] = {"wall_s": wall, "node_cpu_s": nodes, "redis_cpu_s": redis, "srv_cpu_s": ours,
                               "lg_cpu_s": lg, "srv_cpu_pct": ours / wall * 100, "lg_cpu_pct": lg / wall * 100,
                               "node_cpu_pct": [n / wall * 100 for n in nodes], "redis_cpu_pct": redis / wall * 100}
        if self.server_cores and self.gen_cores:
            srv_core = sum(busy[c] for c in self.server_cores if c < len(busy))
            lg_core = sum(busy[c] for c in self.gen_cores if c < len(busy))
            out["other_srv_core_pct"] = max(0.0, srv_core - ours) / wall / len(self.server_cores) * 100
            out["other_lg_core_pct"] = max(0.0, lg_core - lg - me) / wall / len(self.gen_cores) * 100
        return out


def _ms(us: float | None) -> float | None:
    return us / 1000 if us is not None else None


def _median(values: list[Any]) -> Any:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


class Scenario:
    def __init__(self, profile: ClusterProfile, server_cores: set[int] | None, gen_cores: set[int] | None) -> None:
        self.p = profile
        self.server_cores, self.gen_cores = server_cores, gen_cores
        self.workdir = tempfile.mkdtemp(prefix="bench-cluster-")
        self.pool: procs.WorkerPool | None = None
        self.tag = 0

    # -- load generator ----------------------------------------------------------

    def start_pool(self) -> None:
        child = procs.Child([sys.executable, os.path.join(ROOT, "bench", "loadgen.py")], cores=self.gen_cores,
                            cwd=ROOT, pipes=True, log_path=os.path.join(self.workdir, "loadgen.log"))
        self.pool = procs.WorkerPool([procs.Worker(child)])
        ready = self.pool.wait_ready(30)
        self.client_kind = "picows + uvloop" if all(r.get("picows") for r in ready) else "websockets (fallback)"

    def call(self, cmd: str, wait: float, **kw: Any) -> dict[str, Any]:
        assert self.pool is not None
        return self.pool.call(cmd, wait, **kw)[0]

    def restart_pool(self) -> None:
        if self.pool is not None:
            self.pool.close()
        self.start_pool()

    # -- one configuration -----------------------------------------------------------

    def connect(self, setup: Setup, conns: int, room_size: int) -> int:
        """Connect clients 0..conns-1 to their nodes, labelled ``<node>:local|remote``."""
        n = len(setup.nodes)
        groups: dict[tuple[int, str], list[int]] = {}
        for i in range(conns):
            node = node_of(i, room_size, n)
            speaker = node_of((i // room_size) * room_size, room_size, n)
            groups.setdefault((node, "local" if node == speaker else "remote"), []).append(i)
        connected = 0
        failures: list[str] = []
        for (node, where), indices in sorted(groups.items()):
            reply = self.call("connect", max(30.0, len(indices) / 100) + 30, url=setup.url(node),
                              indices=indices, label=f"{NODE_NAMES[node]}:{where}",
                              concurrency=self.p.concurrency, timeout=max(30.0, len(indices) / 100))
            connected = reply["connected"]  # the worker's clients so far, every group included
            failures += reply["failures"]
        if connected < conns:
            raise ScenarioError(f"{conns - connected} of {conns} clients could not connect: "
                                + "; ".join(failures[:2]))
        return connected

    def join(self, mode: str, size: int) -> dict[str, Any]:
        reply = self.call("join", 90, mode=mode, size=size, timeout=60)
        if reply["timed_out"]:
            raise ScenarioError(f"only {reply['joined']} clients could join")
        return reply

    def measured_run(self, setup: Setup, publish: dict[str, Any]) -> dict[str, Any]:
        self.tag = (self.tag + 1) % 10000
        self.call("reset", 10, tag=f"{self.tag:04d}")
        setup.reset_redis_stats()
        meter = Meter(setup, self.pool, self.server_cores, self.gen_cores)  # type: ignore[arg-type]
        t0_ns = time.monotonic_ns()
        pub = self.call("publish", publish["duration"] + 30, **publish)
        published = pub["published"]
        drain = self.call("drain", 45, published=published, acks_expected=sum(published.values()),
                          quiet=self.p.quiet, quiet_unacked=self.p.quiet_unacked, timeout=30)
        cpu = meter.stop()
        setup.check_alive()
        labels = drain["labels"]
        delivered = drain["recv_fast"]
        per_node = []
        for i in range(len(setup.nodes)):
            mine = [v for k, v in labels.items() if k.startswith(NODE_NAMES[i] + ":")]
            got = sum(v["recv"] for v in mine)
            per_node.append({"node": NODE_NAMES[i], "clients": sum(v["clients"] for v in mine), "delivered": got,
                             "cpu_s": cpu["node_cpu_s"][i], "cpu_pct": cpu["node_cpu_pct"][i],
                             "us_per_msg": cpu["node_cpu_s"][i] / got * 1e6 if got else None})
        remote = merged(v["hist"] for k, v in labels.items() if k.endswith(":remote"))
        hist = merged([drain["hist"]])
        acks = merged([drain["ack_hist"]])
        says = sum(published.values())
        redis_profile = setup.redis_profile(cpu["redis_cpu_s"], says)
        span = max((drain["last_recv_ns"] - t0_ns) / 1e9, publish["duration"]) if drain["last_recv_ns"] else None
        return dict(
            cpu, published=says, acks=drain["acks"], expected=drain["expected_fast"], delivered=delivered,
            rate=delivered / span if span else None,
            us_per_msg=cpu["srv_cpu_s"] / delivered * 1e6 if delivered else None,
            redis_us_per_say=cpu["redis_cpu_s"] / says * 1e6 if says and setup.redis else None,
            srv_us_per_say=cpu["srv_cpu_s"] / says * 1e6 if says else None,
            nodes=per_node, p50_ms=_ms(hist.percentile_us(50)), p99_ms=_ms(hist.percentile_us(99)),
            remote_p50_ms=_ms(remote.percentile_us(50)), remote_p99_ms=_ms(remote.percentile_us(99)),
            remote_samples=remote.n, ack_p50_ms=_ms(acks.percentile_us(50)),
            ack_p99_ms=_ms(acks.percentile_us(99)), ack_samples=acks.n,
            redis_profile=redis_profile, lost=drain["lost_fast"], dup=drain["dup_fast"], errors=drain["errors"],
            error_text=drain["error_text"],
            disconnects=drain["disconnects"], close_codes=drain["close_codes"], stale=drain["stale"])

    def idle(self, setup: Setup) -> dict[str, Any]:
        meter = Meter(setup, self.pool, self.server_cores, self.gen_cores)  # type: ignore[arg-type]
        time.sleep(self.p.idle_secs)
        cpu = meter.stop()
        return {"secs": cpu["wall_s"], "srv_cpu_pct": cpu["srv_cpu_pct"], "redis_cpu_pct": cpu["redis_cpu_pct"],
                "node_cpu_pct": cpu["node_cpu_pct"]}

    def workload(self, setup: Setup, kind: str) -> dict[str, Any]:
        p = self.p
        if kind == "fanout":
            conns, size, rate, secs = p.fanout_members, p.fanout_members, p.fanout_rate, p.fanout_secs
        else:
            conns, size, rate, secs = p.rooms_conns, p.rooms_size, p.rooms_rate, p.rooms_secs
        self.connect(setup, conns, size)
        joined = self.join("one" if kind == "fanout" else "groups", size)
        time.sleep(p.settle)
        idle = self.idle(setup) if p.idle_secs and kind == "fanout" else None
        runs = [self.measured_run(setup, {"mode": "rate", "rate": rate, "total_publishers": joined["publishers"],
                                          "duration": secs, "text_len": p.text_len})
                for _ in range(p.reps)]
        self.call("close", 20, timeout=5)
        return summarize(runs, conns=joined["clients"], rooms=joined["publishers"], offered=rate * size,
                         says_per_s=rate, idle=idle)

    def configuration(self, name: str, nodes: int, redis: bool) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        setup = None
        try:
            setup = Setup(name, nodes, redis, self.server_cores, self.workdir)
            for kind in ("fanout", "rooms"):
                try:
                    out[kind] = self.workload(setup, kind)
                except (ScenarioError, procs.WorkerError) as e:
                    out[kind] = {"error": str(e)[:300]}
                    self.restart_pool()
                    setup.check_alive()
        except ScenarioError as e:
            for kind in ("fanout", "rooms"):
                out.setdefault(kind, {"error": str(e)[:300]})
        finally:
            if setup is not None:
                setup.stop()
        return out

    def run(self, editing: bool = True) -> dict[str, Any]:
        t0 = time.monotonic()
        results: dict[str, Any] = {"configs": {}, "labels": {c[0]: c[1] for c in CONFIGS}}
        self.start_pool()
        try:
            for name, _label, nodes, redis in CONFIGS:
                results["configs"][name] = self.configuration(name, nodes, redis)
        finally:
            if self.pool is not None:
                self.pool.close()
                self.pool = None
        if editing:
            results["editing"] = editing_through_two_nodes(self.p)
        results.update(profile=asdict(self.p), client=getattr(self, "client_kind", "?"),
                       pinned=bool(self.server_cores), server_cores=sorted(self.server_cores or []),
                       loadgen_cores=sorted(self.gen_cores or []), duration_s=round(time.monotonic() - t0, 1))
        shutil.rmtree(self.workdir, ignore_errors=True)
        return results


def summarize(runs: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """Medians of the costs and percentiles over repeated runs; totals of the counts."""
    out: dict[str, Any] = {"reps": len(runs), "runs": runs}
    for key in ("rate", "us_per_msg", "redis_us_per_say", "srv_us_per_say", "p50_ms", "p99_ms", "remote_p50_ms",
                "remote_p99_ms", "ack_p50_ms", "ack_p99_ms", "srv_cpu_pct", "redis_cpu_pct", "lg_cpu_pct",
                "other_srv_core_pct", "other_lg_core_pct"):
        out[key] = _median([r.get(key) for r in runs])
    for key in ("published", "acks", "expected", "delivered", "lost", "dup", "errors", "disconnects", "stale",
                "remote_samples", "ack_samples"):
        out[key] = sum(r[key] for r in runs)
    out["error_text"] = next((r["error_text"] for r in runs if r["error_text"]), "")
    out["nodes"] = [{"node": n["node"], "clients": n["clients"],
                     "us_per_msg": _median([r["nodes"][i]["us_per_msg"] for r in runs]),
                     "cpu_pct": _median([r["nodes"][i]["cpu_pct"] for r in runs])}
                    for i, n in enumerate(runs[0]["nodes"])] if runs else []
    codes: dict[str, int] = {}
    for r in runs:
        for code, count in r["close_codes"].items():
            codes[code] = codes.get(code, 0) + count
    out["close_codes"] = codes
    profiles = [r["redis_profile"] for r in runs if r.get("redis_profile")]
    out["redis_profile"] = profiles[-1] if profiles else None
    out.update(extra)
    return out


def editing_through_two_nodes(p: ClusterProfile) -> dict[str, Any]:
    """50 editors on one document, half through each of two nodes on one Redis
    (bench/editor_scenario.py's editors, reconnecting and resending as the protocol
    says when a node closes them)."""
    from bench import editor_scenario

    try:
        return editor_scenario.run_cluster(editors=p.editors, rate=p.edit_rate, duration=p.edit_secs)
    except Exception as e:  # a failed run is a row with its error, not a failed benchmark
        return {"error": f"{type(e).__name__}: {e}"[:300]}


def run(quick: bool = False, *, editing: bool = True) -> dict[str, Any]:
    """Every configuration and load once; the measurements (see the module docstring)."""
    profile = PROFILES["quick" if quick else "full"]
    server_cores, gen_cores = procs.cores()
    pinned = os.sched_getaffinity(0) if gen_cores else None
    try:
        if gen_cores:
            os.sched_setaffinity(0, gen_cores)  # the runner stays off the servers' core
        result = Scenario(profile, server_cores, gen_cores).run(editing=False)
    finally:
        if pinned:
            os.sched_setaffinity(0, pinned)
    if editing:
        # Only once the runner may use every core again: the editing scenario places its
        # nodes (core 0) and editors (the others) itself, from this process's cores; run
        # from the pinned runner it saw one core and put nodes, Redis and editors all on it.
        result["editing"] = editing_through_two_nodes(profile)
    result["mode"] = "quick" if quick else "full"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts, short runs")
    parser.add_argument("--no-editing", action="store_true", help="skip the editors through two nodes")
    parser.add_argument("--json", action="store_true", help="print the whole result as JSON")
    args = parser.parse_args()
    procs.install_cleanup()
    result = run(args.quick, editing=not args.no_editing)
    from bench import report

    print(report.cluster_section(result))
    if args.json:
        print(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
