"""Benchmark scenario: many editors typing into one document at a steady rate.

    python bench/editor_scenario.py            # 50 editors, 1,000 ops/s in total, 10 s
    python bench/editor_scenario.py --quick    # 2 s
    python bench/editor_scenario.py --editors=20 --rate=500 --duration=5 --json

It starts ``server.py`` on a loopback port with a fresh data_dir and the default
durability (SQLite ``synchronous=FULL``: an ack means the op is on disk), pinned to
core 0 when the machine has more than one, and runs the editors in this process on
the other cores: asyncio (uvloop if installed) with picows clients (else
``websockets``).  Each editor keeps the OT client discipline of
:class:`realtime.ot.OTClient`: one op in flight, later edits composed into a buffer
that goes out with the ack, every server op transformed against what is pending.
An editor makes one random edit (insert 1-3 characters, emoji included, or delete
1-3; the text hovers around 2,000 characters) every ``editors / rate`` seconds.

Reported: applied ops/s (the server's revision delta over the measured window),
ack latency p50/p99 (op sent -> its ack; acks come after the commit), server CPU
per applied op, load generator CPU, and whether every editor's text equals the
server's at the end.  PASS needs applied >= 99 % of the target rate (the window's
two HTTP reads add a few ms of jitter), p99 < 50 ms and convergence.

``run(quick) -> dict`` is the entry point for bench/run.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import psutil  # noqa: E402
import ujson  # noqa: E402

from bench.procs import cores, free_port  # noqa: E402
from realtime import ot  # noqa: E402
from realtime.ot import OTClient  # noqa: E402
from tests.redis_server import redis_argv, wait_for_redis  # noqa: E402

try:
    import picows
    from picows import WSListener, WSMsgType

    HAVE_PICOWS = True
except ImportError:  # pragma: no cover - the fallback path
    HAVE_PICOWS = False
    WSListener = object  # type: ignore[misc,assignment]

DOC = "bench"
TARGET_LEN = 2000
ALPHABET = "abcdefghijklmnopqrstuvwxyz     😀é\n"
BOOT = "import server; server.main()"  # python -c, so that the argv below are the server's
monotonic_ns = time.monotonic_ns


# -- processes -----------------------------------------------------------------------


def start_server(port: int, data_dir: str, server_cores: set[int] | None, log_path: str,
                 extra: tuple[str, ...] = ()) -> subprocess.Popen:
    def pin() -> None:
        if server_cores:
            os.sched_setaffinity(0, server_cores)

    argv = [sys.executable, "-c", BOOT, "--port=%d" % port, "--address=127.0.0.1", "--data_dir=%s" % data_dir,
            "--logging=warning", "--max_connections_per_ip=0", "--max_half_open_per_ip=0", "--rate_limit=0",
            "--edit_rate=0", "--max_peers_per_doc=1000", *extra]
    log = open(log_path, "wb")  # noqa: SIM115 - the child keeps its own copy of the fd
    try:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=pin)  # noqa: PLW1509
    finally:
        log.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited with %s: %s" % (proc.returncode, tail(log_path)))
        try:
            with urllib.request.urlopen("http://127.0.0.1:%d/healthz" % port, timeout=1):
                return proc
        except OSError:
            time.sleep(0.05)
    stop_server(proc)
    raise RuntimeError("server did not start: " + tail(log_path))


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(5)


def tail(path: str, n: int = 10) -> str:
    try:
        with open(path, "rb") as f:
            return "\n".join(f.read().decode("utf-8", "replace").strip().splitlines()[-n:])
    except OSError:
        return ""


def get_doc(port: int) -> dict[str, Any]:
    with urllib.request.urlopen("http://127.0.0.1:%d/api/docs/%s" % (port, DOC), timeout=10) as resp:
        return json.loads(resp.read())


def cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def core_busy() -> list[float]:
    """CPU seconds each core spent on anything but idling (all processes)."""
    return [t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)
            for t in psutil.cpu_times(percpu=True)]


def own_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def percentile(values: list[int], pct: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1] / 1e6  # ms


# -- editors ---------------------------------------------------------------------------


class Editor:
    """One editor: an OTClient, its text, a steady stream of random edits."""

    def __init__(self, index: int, run: Run) -> None:
        self.index = index
        self.run = run
        self.rng = random.Random(index)
        self.text = ""
        self.ot: OTClient | None = None
        self.sent_at: dict[int, int] = {}
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed = False
        self.edits = 0

    # transport, provided by a subclass
    def send_text(self, data: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # protocol
    def on_message(self, data: bytes | str) -> None:
        msg = ujson.loads(data)
        kind = msg["type"]
        if kind == "op":
            assert self.ot is not None
            op = self.ot.apply_server(msg["op"])
            self.text = ot.apply(self.text, op)
        elif kind == "ack":
            assert self.ot is not None
            sent = self.sent_at.pop(msg["seq"], None)
            if sent is not None and self.run.measuring:
                self.run.latencies.append(monotonic_ns() - sent)
            if self.ot.server_ack(msg["seq"]) is not None:
                self.send_pending()
        elif kind == "snapshot":
            self.ot = OTClient(msg["rev"], msg["client"])
            self.text = msg["text"]
            if not self.ready.done():
                self.ready.set_result(None)
        elif kind == "error":
            self.run.errors.append(msg)
        # peer_joined, peer_left, cursor: not needed here

    def on_closed(self) -> None:
        if not self.closed:
            self.closed = True
            self.run.disconnects += 1

    def edit(self) -> None:
        """One random local edit, sent now or buffered behind the op in flight."""
        if self.ot is None or self.closed:
            return
        rng, size = self.rng, len(self.text)
        if size and rng.random() < (0.65 if size > TARGET_LEN else 0.3):
            pos = rng.randrange(size)
            k = min(size - pos, rng.randint(1, 3))
            op: list[Any] = [pos, -k, size - pos - k]
        else:
            pos = rng.randint(0, size)
            op = [pos, "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 3))), size - pos]
        op = [c for c in op if c != 0]
        self.text = ot.apply(self.text, op)
        self.edits += 1
        if self.ot.apply_client(op):
            self.send_pending()

    def send_pending(self) -> None:
        assert self.ot is not None
        p = self.ot.pending()
        if p is None:
            return
        self.sent_at[p.seq] = monotonic_ns()
        self.send_text(ujson.dumps({"type": "op", "rev": p.rev, "op": p.op, "seq": p.seq}, ensure_ascii=False))


class PicowsEditor(Editor):
    transport: Any = None

    def send_text(self, data: str) -> None:
        if not self.closed:
            self.transport.send(WSMsgType.TEXT, data.encode("utf-8"))

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.disconnect()


class Listener(WSListener):  # type: ignore[misc]
    def __init__(self, editor: PicowsEditor) -> None:
        self.editor = editor

    def on_ws_connected(self, transport: Any) -> None:
        self.editor.transport = transport

    def on_ws_frame(self, transport: Any, frame: Any) -> None:
        if frame.msg_type == WSMsgType.TEXT:
            self.editor.on_message(frame.get_payload_as_bytes())
        elif frame.msg_type == WSMsgType.CLOSE:
            transport.disconnect()

    def on_ws_disconnected(self, transport: Any) -> None:
        self.editor.on_closed()


class WebsocketsEditor(Editor):
    """The same editor over the ``websockets`` library (slower; used without picows)."""

    ws: Any = None
    reader: Any = None

    async def connect(self, url: str) -> None:
        from websockets.asyncio.client import connect

        self.ws = await connect(url, compression=None, max_size=None, ping_interval=None)
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                self.on_message(message)
        except Exception:
            pass
        self.on_closed()

    def send_text(self, data: str) -> None:
        if not self.closed:
            asyncio.ensure_future(self.ws.send(data))

    def close(self) -> None:
        if self.ws is not None and not self.closed:
            self.closed = True
            asyncio.ensure_future(self.ws.close())


class Run:
    def __init__(self) -> None:
        self.measuring = False
        self.latencies: list[int] = []
        self.errors: list[dict[str, Any]] = []
        self.disconnects = 0


class Typing:
    """Every editor makes one edit every ``len(editors) / rate`` seconds, staggered: a
    steady stream, not bursts, until :meth:`stop`."""

    def __init__(self, eds: Sequence[Editor], rate: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.interval = len(eds) / rate
        self.stopping = False
        t0 = self.loop.time() + 0.05
        for i, ed in enumerate(eds):
            self.schedule(ed, t0 + self.interval * i / len(eds))

    def schedule(self, ed: Editor, when: float) -> None:
        def tick() -> None:
            if self.stopping:
                return
            ed.edit()
            self.schedule(ed, when + self.interval)

        self.loop.call_at(when, tick)

    def stop(self) -> None:
        self.stopping = True


async def drive(port: int, editors: int, rate: float, duration: float, warmup: float,
                server: psutil.Process) -> dict[str, Any]:
    run = Run()
    url = "ws://127.0.0.1:%d/ws/edit/%s" % (port, DOC)
    eds: list[Editor] = []
    for i in range(editors):
        if HAVE_PICOWS:
            ed: Editor = PicowsEditor(i, run)
            await asyncio.wait_for(picows.ws_connect(lambda ed=ed: Listener(ed), "%s?name=e%d" % (url, i)), 10)
        else:
            ed = WebsocketsEditor(i, run)
            await asyncio.wait_for(ed.connect("%s?name=e%d" % (url, i)), 10)  # type: ignore[attr-defined]
        eds.append(ed)
    await asyncio.wait_for(asyncio.gather(*(ed.ready for ed in eds)), 20)

    loop = asyncio.get_running_loop()
    typing = Typing(eds, rate)
    await asyncio.sleep(warmup)

    rev0 = (await asyncio.to_thread(get_doc, port))["rev"]
    cpu_server0, cpu_own0, wall0 = cpu_seconds(server), own_cpu_seconds(), time.perf_counter()
    busy0 = core_busy()
    run.measuring = True
    await asyncio.sleep(duration)
    rev1 = (await asyncio.to_thread(get_doc, port))["rev"]
    cpu_server1, cpu_own1, wall1 = cpu_seconds(server), own_cpu_seconds(), time.perf_counter()
    busy1 = core_busy()
    run.measuring = False
    typing.stop()

    # Let everything in flight land, then compare every copy with the server's.
    deadline = loop.time() + 15
    server_doc = await asyncio.to_thread(get_doc, port)
    while loop.time() < deadline:
        server_doc = await asyncio.to_thread(get_doc, port)
        if all(ed.ot is not None and ed.ot.state == "synchronized" and ed.ot.rev == server_doc["rev"]
               for ed in eds if not ed.closed):
            break
        await asyncio.sleep(0.05)
    converged = all(ed.text == server_doc["text"] for ed in eds) and not run.disconnects
    for ed in eds:
        ed.close()
    await asyncio.sleep(0.1)

    elapsed = wall1 - wall0
    applied = rev1 - rev0
    try:
        server_cores = sorted(os.sched_getaffinity(server.pid))
    except (AttributeError, OSError):
        server_cores = []
    # What else ran on the server's core(s) meanwhile: other processes take its CPU.
    others = None
    if server_cores and len(server_cores) < len(busy0):
        core_time = sum(busy1[c] - busy0[c] for c in server_cores)
        others = max(0.0, core_time - (cpu_server1 - cpu_server0)) / elapsed / len(server_cores) * 100
    # ... and on the load generator's (this process's) core(s).
    others_lg = None
    gen_cores = sorted(c for c in os.sched_getaffinity(0) if c < len(busy0)) if server_cores else []
    if gen_cores and len(gen_cores) < len(busy0) and not set(gen_cores) & set(server_cores):
        core_time = sum(busy1[c] - busy0[c] for c in gen_cores)
        others_lg = max(0.0, core_time - (cpu_own1 - cpu_own0)) / elapsed / len(gen_cores) * 100
    return {
        "editors": editors,
        "target_ops_per_s": rate,
        "duration_s": round(elapsed, 2),
        "applied_ops": applied,
        "applied_ops_per_s": round(applied / elapsed, 1),
        "edits": sum(ed.edits for ed in eds),
        "ack_samples": len(run.latencies),
        "ack_p50_ms": percentile(run.latencies, 50),
        "ack_p99_ms": percentile(run.latencies, 99),
        "ack_max_ms": percentile(run.latencies, 100),
        "server_cpu_us_per_op": round((cpu_server1 - cpu_server0) / applied * 1e6, 1) if applied else None,
        "server_cpu_pct": round((cpu_server1 - cpu_server0) / elapsed * 100, 1),
        "loadgen_cpu_pct": round((cpu_own1 - cpu_own0) / elapsed * 100, 1),
        "other_load_on_server_core_pct": None if others is None else round(others, 1),
        "other_load_on_loadgen_core_pct": None if others_lg is None else round(others_lg, 1),
        "converged": converged,
        "final_rev": server_doc["rev"],
        "final_length": server_doc["length"],
        "errors": len(run.errors),
        "first_error": run.errors[0] if run.errors else None,
        "disconnects": run.disconnects,
        "client": "picows" if HAVE_PICOWS else "websockets",
    }


def run(quick: bool = False, *, editors: int = 50, rate: float = 1000.0, duration: float | None = None,
        p99_target_ms: float = 50.0) -> dict[str, Any]:
    """Run the scenario once; return the measurements and ``passed``."""
    duration = duration if duration is not None else (2.0 if quick else 10.0)
    warmup = 0.5 if quick else 1.0
    server_cores, gen_cores = cores()
    data_dir = tempfile.mkdtemp(prefix="editor-bench-")
    port = free_port()
    proc = start_server(port, os.path.join(data_dir, "data"), server_cores, os.path.join(data_dir, "server.log"))
    try:
        result = run_pinned(drive(port, editors, rate, duration, warmup, psutil.Process(proc.pid)), gen_cores)
    finally:
        stop_server(proc)
        log = tail(os.path.join(data_dir, "server.log"))
        shutil.rmtree(data_dir, ignore_errors=True)
    result.update(
        durable="synchronous=FULL",
        server_pinned=sorted(server_cores) if server_cores else "no",
        loadgen_pinned=sorted(gen_cores) if gen_cores else "no",
        p99_target_ms=p99_target_ms,
        server_log_tail=log if result["errors"] or not result["converged"] else "",
    )
    p99 = result["ack_p99_ms"]
    result["passed"] = bool(
        result["applied_ops_per_s"] >= 0.99 * rate
        and p99 is not None and p99 < p99_target_ms
        and result["converged"]
        and not result["errors"]
    )
    return result


# -- through two nodes (cluster mode) ------------------------------------------------------


def get_doc_settled(port: int, tries: int = 50) -> dict[str, Any]:
    """``GET /api/docs/<doc>``, again after a 503 (a node reloading the document)."""
    for _ in range(tries - 1):
        try:
            return get_doc(port)
        except urllib.error.HTTPError as e:
            if e.code != 503:
                raise
            time.sleep(0.05)
    return get_doc(port)


def node_counters(port: int, names: tuple[str, ...]) -> dict[str, float]:
    """Counters from a node's ``/metrics`` (Prometheus text), 0 for those it lacks."""
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=10) as resp:
        text = resp.read().decode()
    out = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name.removesuffix("_total") in names:
            out[name.removesuffix("_total")] = float(value)
    return out


REBASE_COUNTERS = ("realtime_doc_rebases", "realtime_doc_remote_ops")


class ClusterEditor(PicowsEditor):
    """An editor that, when its node closes it, reconnects with ``?rev=&client=`` after
    a short jittered pause and resumes as docs/PROTOCOL.md says: apply the ``ops`` it
    missed (its own op among them is the ack it missed), then resend what is still
    unacknowledged; a ``snapshot`` instead (a reload) replaces its text, and the edits it
    had not had acknowledged are lost (counted)."""

    def __init__(self, index: int, run: Run, port: int, stats: dict[str, Any]) -> None:
        super().__init__(index, run)
        self.port = port
        self.stats = stats
        self.stopping = False

    def url(self) -> str:
        query = "name=e%d" % self.index
        if self.ot is not None:
            query += "&rev=%d" % self.ot.rev
            if self.ot.client_id:
                query += "&client=%s" % self.ot.client_id
        return "ws://127.0.0.1:%d/ws/edit/%s?%s" % (self.port, DOC, query)

    async def open(self) -> None:
        self.closed = False
        await asyncio.wait_for(picows.ws_connect(lambda: CurrentListener(self), self.url()), 10)

    def on_message(self, data: bytes | str) -> None:
        try:
            self._on_message(data)
        except ot.OTError:
            # What the node sent does not fit this copy (its copy and this one drifted
            # apart): reload, i.e. reconnect without ``rev`` for a fresh snapshot.
            self.stats["drifts"] += 1
            self.ot = None
            self.close()
            self.closed = False
            self.on_closed()

    def _on_message(self, data: bytes | str) -> None:
        msg = ujson.loads(data)
        kind = msg["type"]
        if self.ot is None and kind != "snapshot":
            return  # reloading: nothing counts before the new snapshot
        if kind == "ops":
            assert self.ot is not None
            for entry in msg["ops"]:
                if self.ot.is_own(entry.get("client"), entry.get("seq")):
                    self.ot.server_ack(entry["seq"])
                else:
                    self.text = ot.apply(self.text, self.ot.apply_server(entry["op"]))
            self.ot.client_id = msg["client"]
            self.send_pending()  # the resend: same seq, the revision we are at now
            return
        if kind == "snapshot" and self.ot is not None:
            self.stats["reloads"] += 1
            if self.ot.outstanding is not None:
                self.stats["edits_lost"] += 1
            self.sent_at.clear()
        if kind == "error":
            code = msg.get("code", "?")
            self.stats["error_codes"][code] = self.stats["error_codes"].get(code, 0) + 1
            if code == "unavailable" and self.ot is not None:
                asyncio.get_running_loop().call_later(0.05, self.send_pending)
            elif code in ("conflict", "bad_message"):  # the protocol's answer to both: reload
                self.run.errors.append(msg)
                raise ot.OTError("reload: " + code)
        super().on_message(data)

    def on_closed(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.stopping:
            return
        self.stats["reconnects"] += 1
        loop = asyncio.get_running_loop()
        loop.call_later(0.02 + self.rng.random() * 0.1, lambda: asyncio.ensure_future(self._reconnect()))

    async def _reconnect(self) -> None:
        for _ in range(20):
            if self.stopping:
                return
            try:
                await self.open()
                return
            except (OSError, asyncio.TimeoutError):
                await asyncio.sleep(0.1)


class CurrentListener(Listener):
    """Hears only the editor's current connection: a reconnected editor ignores the old one."""

    def on_ws_frame(self, transport: Any, frame: Any) -> None:
        if transport is self.editor.transport:
            super().on_ws_frame(transport, frame)

    def on_ws_disconnected(self, transport: Any) -> None:
        if transport is self.editor.transport:
            self.editor.on_closed()


async def drive_cluster(ports: list[int], editors: int, rate: float, duration: float, warmup: float,
                        servers: list[psutil.Process]) -> dict[str, Any]:
    run = Run()
    stats: dict[str, Any] = {"reconnects": 0, "reloads": 0, "edits_lost": 0, "drifts": 0, "error_codes": {}}
    eds = [ClusterEditor(i, run, ports[i % len(ports)], stats) for i in range(editors)]
    for ed in eds:
        await ed.open()
    await asyncio.wait_for(asyncio.gather(*(ed.ready for ed in eds)), 20)
    loop = asyncio.get_running_loop()
    typing = Typing(eds, rate)
    await asyncio.sleep(warmup)
    rev0 = (await asyncio.to_thread(get_doc_settled, ports[0]))["rev"]
    counters0 = [await asyncio.to_thread(node_counters, p, REBASE_COUNTERS) for p in ports]
    cpu0 = [cpu_seconds(p) for p in servers]
    own0, wall0 = own_cpu_seconds(), time.perf_counter()
    run.measuring = True
    await asyncio.sleep(duration)
    rev1 = (await asyncio.to_thread(get_doc_settled, ports[0]))["rev"]
    cpu1 = [cpu_seconds(p) for p in servers]
    counters1 = [await asyncio.to_thread(node_counters, p, REBASE_COUNTERS) for p in ports]
    own1, wall1 = own_cpu_seconds(), time.perf_counter()
    run.measuring = False
    typing.stop()
    # Let what is in flight land; converged: every editor and every node has one text.
    deadline = loop.time() + 15
    docs: list[dict[str, Any]] = []
    while loop.time() < deadline:
        docs = [await asyncio.to_thread(get_doc_settled, p) for p in ports]
        settled = all(not ed.closed and ed.ot is not None and ed.ot.state == "synchronized" for ed in eds)
        if settled and len({d["rev"] for d in docs}) == 1 and all(ed.ot.rev == docs[0]["rev"] for ed in eds
                                                                   if ed.ot is not None):
            break
        await asyncio.sleep(0.1)
    converged = bool(docs) and len({d["text"] for d in docs}) == 1 and all(ed.text == docs[0]["text"] for ed in eds)
    for ed in eds:
        ed.stopping = True
        ed.close()
    await asyncio.sleep(0.1)
    elapsed = wall1 - wall0
    applied = rev1 - rev0
    return {
        "editors": editors, "nodes": len(ports), "per_node": [sum(1 for e in eds if e.port == p) for p in ports],
        "target_ops_per_s": rate, "duration_s": round(elapsed, 2), "applied_ops": applied,
        "applied_ops_per_s": round(applied / elapsed, 1), "edits": sum(ed.edits for ed in eds),
        "ack_samples": len(run.latencies), "ack_p50_ms": percentile(run.latencies, 50),
        "ack_p99_ms": percentile(run.latencies, 99), "ack_max_ms": percentile(run.latencies, 100),
        "server_cpu_pct": round(sum(b - a for a, b in zip(cpu0, cpu1)) / elapsed * 100, 1),
        "loadgen_cpu_pct": round((own1 - own0) / elapsed * 100, 1),
        "converged": converged, "final_rev": docs[0]["rev"] if docs else None,
        "node_revs": [d["rev"] for d in docs], "errors": len(run.errors),
        "first_error": run.errors[0] if run.errors else None, "error_codes": stats["error_codes"],
        "reconnects": stats["reconnects"], "reloads": stats["reloads"], "edits_lost": stats["edits_lost"],
        "drifts": stats["drifts"],
        "rebases": sum(b["realtime_doc_rebases"] - a["realtime_doc_rebases"] for a, b in zip(counters0, counters1)),
        "remote_ops": sum(b["realtime_doc_remote_ops"] - a["realtime_doc_remote_ops"]
                          for a, b in zip(counters0, counters1)),
        "client": "picows",
    }


def run_pinned(coro: Any, gen_cores: set[int] | None) -> Any:
    """Run the editors' event loop (uvloop when installed) on the load generator's cores."""
    old_affinity = None
    try:
        if gen_cores:
            old_affinity = os.sched_getaffinity(0)
            os.sched_setaffinity(0, gen_cores)
        try:
            import uvloop

            return uvloop.run(coro)
        except ImportError:
            return asyncio.run(coro)
    finally:
        if old_affinity:
            os.sched_setaffinity(0, old_affinity)


def run_cluster(*, editors: int = 50, rate: float = 1000.0, duration: float = 2.0, warmup: float = 0.5,
                nodes: int = 2) -> dict[str, Any]:
    """The editors split over ``nodes`` server.py processes on one redis-server (AOF,
    ``appendfsync always``), all on core 0, the editors on the other cores."""
    if not HAVE_PICOWS:
        raise RuntimeError("the editors through several nodes need picows")
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed")
    server_cores, gen_cores = cores()
    work = tempfile.mkdtemp(prefix="editor-cluster-")
    rport = free_port()

    def pin() -> None:
        if server_cores:
            os.sched_setaffinity(0, server_cores)

    rdir = os.path.join(work, "redis")
    os.makedirs(rdir)
    redis_proc = subprocess.Popen(redis_argv(binary, rport, rdir), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True, preexec_fn=pin)  # noqa: PLW1509
    procs: list[subprocess.Popen] = []
    try:
        why = wait_for_redis(rport, lambda: redis_proc.poll() is None)
        if why is not None:
            raise RuntimeError(f"redis-server did not start: it {why}")
        ports = [free_port() for _ in range(nodes)]
        for i, port in enumerate(ports):
            procs.append(start_server(port, os.path.join(work, "node%d" % i), server_cores,
                                      os.path.join(work, "node%d.log" % i),
                                      ("--backplane=redis://127.0.0.1:%d/0" % rport, "--simulated_sensors=",
                                       "--host_metrics=false")))
        result = run_pinned(drive_cluster(ports, editors, rate, duration, warmup,
                                          [psutil.Process(p.pid) for p in procs] + [psutil.Process(redis_proc.pid)]),
                            gen_cores)
    finally:
        for proc in procs:
            stop_server(proc)
        stop_server(redis_proc)
        shutil.rmtree(work, ignore_errors=True)
    p99 = result["ack_p99_ms"]
    result["passed"] = bool(result["applied_ops_per_s"] >= 0.99 * rate and p99 is not None and p99 < 50.0
                            and result["converged"] and not result["errors"])
    return result


def table(r: dict[str, Any]) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else "%.1f ms" % v

    rows = [
        ("editors on one document", str(r["editors"])),
        ("target ops/s (total)", "{:,.0f}".format(r["target_ops_per_s"])),
        ("applied ops/s (server rev delta / time)", "{:,.1f}".format(r["applied_ops_per_s"])),
        ("ack latency p50 / p99 / max", "%s / %s / %s" % (ms(r["ack_p50_ms"]), ms(r["ack_p99_ms"]),
                                                          ms(r["ack_max_ms"]))),
        ("server CPU per applied op", "-" if r["server_cpu_us_per_op"] is None
         else "%.0f µs" % r["server_cpu_us_per_op"]),
        ("server CPU (one core = 100 %)", "%.0f %%" % r["server_cpu_pct"]),
        ("load generator CPU", "%.0f %% (%s)" % (r["loadgen_cpu_pct"], r["client"])),
        ("other processes on the server's core", "-" if r["other_load_on_server_core_pct"] is None
         else "%.0f %%" % r["other_load_on_server_core_pct"]),
        ("converged (every copy == server text)", "yes (rev %d, %d chars)" % (r["final_rev"], r["final_length"])
         if r["converged"] else "NO"),
        ("durable", r["durable"] + " (ack after commit)"),
        ("errors / disconnects", "%d / %d" % (r["errors"], r["disconnects"])),
        ("server / load generator cores", "%s / %s" % (r["server_pinned"], r["loadgen_pinned"])),
        ("result", "**PASS**" if r["passed"] else "**FAIL**"),
    ]
    out = ["| editor scenario (%.0f s window) | |" % r["duration_s"], "|---|---|"]
    out += ["| %s | %s |" % row for row in rows]
    out.append("")
    out.append("Target: applied >= %.0f ops/s (99 %% of the offered rate), p99 ack < %.0f ms, every copy "
               "identical, acks only after an fsync'd commit." % (0.99 * r["target_ops_per_s"], r["p99_target_ms"]))
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 s instead of 10 s")
    parser.add_argument("--editors", type=int, default=50)
    parser.add_argument("--rate", type=float, default=1000.0, help="edits per second, all editors together")
    parser.add_argument("--duration", type=float, default=None, help="seconds measured")
    parser.add_argument("--json", action="store_true", help="print the result as JSON too")
    args = parser.parse_args()
    result = run(args.quick, editors=args.editors, rate=args.rate, duration=args.duration)
    print(table(result))
    if result.get("first_error"):
        print("\nfirst error: %s" % result["first_error"])
    if result.get("server_log_tail"):
        print("\nserver log:\n" + result["server_log_tail"])
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
