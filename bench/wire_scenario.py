"""Benchmark scenario: the same traffic in four wire formats, on one machine, in one run.

    python bench/wire_scenario.py --quick      # 200 chat members, 100 dashboards, ~1 minute
    python bench/wire_scenario.py              # 1,000 members, 300 dashboards
    python bench/wire_scenario.py --quick --json

Formats (each a fresh ``server.py`` pinned to core 0; the clients run here, on core 1):

* ``json``            JSON text frames (the default)
* ``msgpack``         the ``msgpack`` subprotocol: MessagePack binary frames
* ``deflate-tornado`` ``--fast_path=false --websocket_compression``: Tornado's own
                      protocol, which compresses every message once per connection
                      with that connection's context (its default)
* ``deflate-once``    ``--websocket_compression``: permessage-deflate with no context
                      takeover, each message compressed once for every recipient

Scenarios, in each server:

* chat fan-out: ``members`` clients in one room; one of them says ~150-byte chat
  lines at a steady rate; every member receives each one;
* sensors: ``viewers`` dashboards subscribed to 20 simulated sensors at 10 Hz;
* idle: server RSS growth per connected client (welcome read, nothing else), with
  deflate negotiated in the two compressed formats.

Measured: wire bytes per delivered message (frame headers included, counted from the
bytes the clients read off their sockets), and server CPU per delivered message (the
server's threads' run time over the window, /proc/PID/task/*/schedstat, divided by
deliveries).
Targets: deflate-once <= 1.5x the CPU of ``json``, and < 0.3x of ``deflate-tornado``.

The clients are minimal asyncio WebSocket clients (masked frames, a persistent
inflater per connection, so either server's compression decodes).  Every connection
goes to 127.0.0.1; every loop is bounded in count and time; servers are always stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import shutil
import struct
import sys
import tempfile
import time
import zlib
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import msgpack  # noqa: E402

from bench import procs, report  # noqa: E402
from bench.sensors_scenario import sensor_spec  # noqa: E402
from realtime.wire import unmask  # noqa: E402

FORMATS = {
    "json": ([], False, False),
    "msgpack": ([], False, True),
    "deflate-tornado": (["--fast_path=false", "--websocket_compression=true"], True, False),
    "deflate-once": (["--websocket_compression=true"], True, False),
}
LABELS = {
    "json": "JSON",
    "msgpack": "MessagePack",
    "deflate-tornado": "JSON + deflate, per connection (Tornado)",
    "deflate-once": "JSON + deflate once per message (ours)",
}
SERVER_CORES = {0}
CLIENT_CORES = {1}
def _vocabulary(n: int = 3000, seed: int = 7) -> list[str]:
    """Made-up words of 2-10 letters: chat lines that share JSON keys and common
    words but not whole sentences (a real room's vocabulary is wide)."""
    rng = random.Random(seed)
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    return ["".join(rng.choice(letters[:8 + rng.randrange(18)]) for _ in range(2 + rng.randrange(9)))
            for _ in range(n)]


WORDS = _vocabulary()


class Client:
    """One WebSocket connection: masked frames out; frames in, counted and decoded."""

    def __init__(self, packed: bool) -> None:
        self.packed = packed
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.inflater: Any = None
        self.counts: dict[str, int] = {}
        self.wire: dict[str, int] = {}
        self.waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.task: asyncio.Task[None] | None = None

    async def open(self, port: int, path: str, deflate: bool) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        extra = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n" if deflate else ""
        if self.packed:
            extra += "Sec-WebSocket-Protocol: msgpack\r\n"
        self.writer.write(("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                           "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n%s\r\n"
                           % (path, port, key, extra)).encode())
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        if not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError("handshake refused: %r" % head[:80])
        if deflate:
            if b"permessage-deflate" not in head:
                raise RuntimeError("deflate was not negotiated")
            self.inflater = zlib.decompressobj(-15)
        self.task = asyncio.ensure_future(self._read())

    def send(self, obj: dict[str, Any]) -> None:
        payload = msgpack.packb(obj) if self.packed else json.dumps(obj).encode()
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x82 if self.packed else 0x81])
        head += bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n)
        assert self.writer is not None
        self.writer.write(head + mask + unmask(mask, payload))

    def wait_for(self, mtype: str) -> asyncio.Future[dict[str, Any]]:
        fut = self.waiters[mtype] = asyncio.get_running_loop().create_future()
        return fut

    async def _read(self) -> None:
        assert self.reader is not None
        buf = b""
        try:
            while True:
                data = await self.reader.read(262144)
                if not data:
                    return
                buf = self._frames(buf + data if buf else data)
        except (ConnectionError, asyncio.CancelledError):
            return

    def _frames(self, buf: bytes) -> bytes:
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            n, hl = b1 & 0x7F, 2
            if n == 126:
                if end - pos < 4:
                    break
                n, hl = (buf[pos + 2] << 8) | buf[pos + 3], 4
            elif n == 127:
                if end - pos < 10:
                    break
                n, hl = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
            if end - pos < hl + n:
                break
            payload = buf[pos + hl:pos + hl + n]
            size = hl + n
            pos += size
            if b0 & 0x0F not in (1, 2):
                continue
            if b0 & 0x40:
                payload = self.inflater.decompress(payload + b"\x00\x00\xff\xff")
            msg = msgpack.unpackb(payload) if self.packed else json.loads(payload)
            mtype = msg.get("type", "")
            self.counts[mtype] = self.counts.get(mtype, 0) + 1
            self.wire[mtype] = self.wire.get(mtype, 0) + size
            waiter = self.waiters.pop(mtype, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(msg)
        return buf[pos:]

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.writer is not None:
            self.writer.close()


class Server:
    def __init__(self, fmt: str, data_dir: str, sensors: int, hz: float) -> None:
        self.port = procs.free_port()
        extra, _, _ = FORMATS[fmt]
        argv = [sys.executable, "server.py", "--port=%d" % self.port, "--address=127.0.0.1",
                "--data_dir=%s" % data_dir, "--logging=warning", "--max_connections_per_ip=0",
                "--rate_limit=0", "--host_metrics=false", "--ping_interval=0", "--sqlite_synchronous=NORMAL",
                "--simulated_sensors=%s" % sensor_spec(sensors, hz), "--presence_window=0.5", *extra]
        self.child = procs.Child(argv, cores=SERVER_CORES, cwd=ROOT, log_path=os.path.join(data_dir, "server.log"))
        if not procs.wait_for_port(self.port, self.child, 20):
            raise RuntimeError("server.py did not start: " + self.child.log_tail())

    def cpu(self) -> float:
        """CPU seconds of every thread, to the nanosecond (/proc/PID/task/*/schedstat);
        rusage's 10 ms ticks would be a fifth of a short window's sensor CPU."""
        total = 0
        try:
            task_dir = "/proc/%d/task" % self.child.pid
            for tid in os.listdir(task_dir):
                with open(os.path.join(task_dir, tid, "schedstat")) as f:
                    total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return self.child.cpu_seconds()
        return total / 1e9


async def open_many(n: int, port: int, path: str, deflate: bool, packed: bool, first: dict[str, Any] | None,
                    expect: str | None, concurrency: int = 50) -> list[Client]:
    clients: list[Client] = []
    sem = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with sem:
            c = Client(packed)
            welcome = c.wait_for("welcome") if path != "/ws/echo" else None
            await c.open(port, path, deflate)
            clients.append(c)
            if welcome is not None:
                await asyncio.wait_for(welcome, 10)
            if first is not None:
                reply = c.wait_for(expect) if expect else None
                c.send(first)
                if reply is not None:
                    await asyncio.wait_for(reply, 10)

    await asyncio.gather(*(one() for _ in range(n)))
    return clients


def chat_line(i: int) -> str:
    """About 150 characters; common words more often (Zipf-like)."""
    rng = random.Random(i)
    words = [WORDS[int(len(WORDS) ** rng.random()) - 1] for _ in range(30)]  # log-uniform rank
    return " ".join(words)[:150]


async def chat(server: Server, fmt: str, members: int, rate: float, secs: float) -> dict[str, Any]:
    _, deflate, packed = FORMATS[fmt]
    join = {"type": "join", "room": "bench"}
    clients = await open_many(members, server.port, "/ws/chat?name=m", deflate, packed, join, "joined")
    await asyncio.sleep(1.0)  # presence settles
    for c in clients:
        c.counts.pop("message", None)
        c.wire.pop("message", None)
    says = max(1, int(rate * secs))
    expected = says * members
    cpu0 = server.cpu()
    t0 = time.monotonic()
    publisher = clients[0]
    for i in range(says):
        publisher.send({"type": "say", "room": "bench", "text": chat_line(i), "cid": "b%d" % i})
        await asyncio.sleep(max(0.0, t0 + (i + 1) / rate - time.monotonic()))
    deadline = time.monotonic() + 10
    while sum(c.counts.get("message", 0) for c in clients) < expected and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    cpu = server.cpu() - cpu0
    elapsed = time.monotonic() - t0
    delivered = sum(c.counts.get("message", 0) for c in clients)
    wire = sum(c.wire.get("message", 0) for c in clients)
    for c in clients:
        c.close()
    return {"delivered": delivered, "expected": expected, "elapsed_s": round(elapsed, 2),
            "cpu_us_per_msg": 1e6 * cpu / max(1, delivered), "wire_bytes_per_msg": wire / max(1, delivered)}


async def sensors(server: Server, fmt: str, viewers: int, n: int, secs: float) -> dict[str, Any]:
    _, deflate, packed = FORMATS[fmt]
    sub = {"type": "subscribe", "sensors": ["bench.%02d" % i for i in range(n)], "max_hz": 10}
    clients = await open_many(viewers, server.port, "/ws/sensors", deflate, packed, sub, "subscribed")
    await asyncio.sleep(1.0)
    for c in clients:
        c.counts.pop("readings", None)
        c.wire.pop("readings", None)
    cpu0 = server.cpu()
    await asyncio.sleep(secs)
    cpu = server.cpu() - cpu0
    delivered = sum(c.counts.get("readings", 0) for c in clients)
    wire = sum(c.wire.get("readings", 0) for c in clients)
    for c in clients:
        c.close()
    return {"delivered": delivered, "per_s": delivered / secs,
            "cpu_us_per_msg": 1e6 * cpu / max(1, delivered), "wire_bytes_per_msg": wire / max(1, delivered)}


async def idle(server: Server, fmt: str, conns: int) -> dict[str, Any]:
    _, deflate, packed = FORMATS[fmt]
    await asyncio.sleep(0.5)
    rss0 = server.child.rss()
    clients = await open_many(conns, server.port, "/ws/chat?name=i", deflate, packed, None, None)
    await asyncio.sleep(1.0)
    rss1 = server.child.rss()
    for c in clients:
        c.close()
    return {"conns": conns, "kib_per_conn": (rss1 - rss0) / 1024 / conns}


async def run_format(fmt: str, p: dict[str, Any]) -> dict[str, Any]:
    data_dir = tempfile.mkdtemp(prefix="wire-bench-")
    server = Server(fmt, data_dir, p["sensors"], 10.0)
    try:
        out: dict[str, Any] = {"idle": await idle(server, fmt, p["idle"])}
        out["chat"] = await chat(server, fmt, p["members"], p["rate"], p["secs"])
        out["sensors"] = await sensors(server, fmt, p["viewers"], p["sensors"], p["secs"])
        return out
    finally:
        server.child.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


PROFILES = {
    "quick": {"members": 250, "rate": 25.0, "secs": 3.0, "viewers": 150, "sensors": 20, "idle": 1000},
    "full": {"members": 1000, "rate": 20.0, "secs": 4.0, "viewers": 300, "sensors": 20, "idle": 3000},
}


def run(quick: bool = False) -> dict[str, Any]:
    """Every format, one after the other, same profile; the clients pinned to core 1."""
    try:
        os.sched_setaffinity(0, CLIENT_CORES)
    except (AttributeError, OSError):
        pass
    profile = PROFILES["quick" if quick else "full"]
    busy0 = procs.core_busy()
    t0 = time.monotonic()
    results = {fmt: asyncio.run(run_format(fmt, profile)) for fmt in FORMATS}
    elapsed = time.monotonic() - t0
    busy1 = procs.core_busy()
    return {"profile": profile, "results": results, "elapsed_s": round(elapsed, 1),
            "machine_busy_pct": [round(100 * (b1 - b0) / elapsed) for b0, b1 in zip(busy0, busy1)]}


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def targets(r: dict[str, Any]) -> list[tuple[str, float, str, bool]]:
    res = r["results"]
    lines = []
    for scen in ("chat", "sensors"):
        once = res["deflate-once"][scen]["cpu_us_per_msg"]
        to_plain = ratio(once, res["json"][scen]["cpu_us_per_msg"])
        to_tornado = ratio(once, res["deflate-tornado"][scen]["cpu_us_per_msg"])
        lines.append(("%s: deflate-once CPU/msg vs uncompressed JSON" % scen, to_plain, "<= 1.5x", to_plain <= 1.5))
        lines.append(("%s: deflate-once CPU/msg vs Tornado's per-connection deflate" % scen, to_tornado, "< 0.3x",
                      to_tornado < 0.3))
    return lines


def table(r: dict[str, Any]) -> str:
    p = r["profile"]
    res = r["results"]
    out = ["## Wire formats: JSON, MessagePack, deflate per connection, deflate once (`bench/wire_scenario.py`)", "",
           "Each format on a fresh server.py (core 0), clients on core 1; chat: %d members in one room, %g says/s of "
           "~150-byte lines for %g s; sensors: %d dashboards x %d sensors at 10 Hz for %g s. *wire B/msg* is what "
           "the clients read off their sockets per delivered message, frame header included; *CPU µs/msg* the "
           "server's CPU over the window per delivered message. Run took %.0f s; the machine's cores were %s %% busy."
           % (p["members"], p["rate"], p["secs"], p["viewers"], p["sensors"], p["secs"], r["elapsed_s"],
              "/".join(str(b) for b in r["machine_busy_pct"])), "",
           "| format | chat wire B/msg | chat CPU µs/msg | chat delivered | sensors wire B/msg | sensors CPU µs/msg "
           "| sensors batches/s | idle KiB/conn |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for fmt in FORMATS:
        c, s = res[fmt]["chat"], res[fmt]["sensors"]
        idle_kib = "%.1f" % res[fmt]["idle"]["kib_per_conn"]
        out.append("| %s (`%s`) | %.0f | %.2f | %d/%d | %.0f | %.1f | %.0f | %s |" % (
            LABELS[fmt], fmt, c["wire_bytes_per_msg"], c["cpu_us_per_msg"], c["delivered"], c["expected"],
            s["wire_bytes_per_msg"], s["cpu_us_per_msg"], s["per_s"], idle_kib))
    out += ["", "Targets (same run):", ""]
    for name, value, goal, met in targets(r):
        out.append("- %s: %.2fx  target %s  %s" % (name, value, goal, "MET" if met else "NOT MET"))
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true", help="print the raw numbers as JSON too")
    ap.add_argument("--write", action="store_true", help="put the table into docs/BENCHMARKS.md (its own section)")
    args = ap.parse_args(argv)
    procs.install_cleanup()
    r = run(args.quick)
    text = table(r)
    print(text)
    if args.json:
        print(json.dumps(r, indent=1))
    if args.write:
        path = os.path.join(ROOT, "docs", "BENCHMARKS.md")
        with open(path) as f:
            page = f.read()
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        command = "python bench/wire_scenario.py" + (" --quick" if args.quick else "")
        with open(path, "w") as f:
            f.write(report.with_section(page, "wire", text + "\nCommand: `%s`, %s.\n" % (command, stamp)))
        print("wrote docs/BENCHMARKS.md (section 'wire')", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
