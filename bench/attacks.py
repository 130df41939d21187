"""Issue 14's attacks against a real server process, with figures.

    python3 bench/attacks.py                      # this checkout
    python3 bench/attacks.py --root=/tmp/old      # another checkout (e.g. before the fix)
    python3 bench/attacks.py --only=10            # one attack (10: rooms and documents from one address)

Everything runs on 127.0.0.1 with bounded counts and times (about a minute
in all); each server gets its own data_dir.  Prints one line per attack:
what the server did, with RSS, file descriptors and times to close.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import psutil

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from bench.procs import free_port  # noqa: E402


class Server:
    def __init__(self, root: str, *args: str, wrap: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="attack-")
        self.log_path = os.path.join(self.dir, "server.log")
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*wrap, sys.executable, "server.py", "--port=%d" % self.port, "--address=127.0.0.1",
             "--data_dir=%s" % os.path.join(self.dir, "data"), "--host_metrics=False", *args],
            cwd=root, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 20
        while self.health() != 200:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("server did not start: " + open(self.log_path, errors="replace").read()[-500:])
            time.sleep(0.05)
        self.ps = psutil.Process(self.proc.pid)

    def url(self, path: str) -> str:
        return "http://127.0.0.1:%d%s" % (self.port, path)

    def health(self, timeout: float = 1.0, source: str = "") -> int | None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout, source_address=(source, 0))
        try:
            conn.request("GET", "/healthz")
            return conn.getresponse().status
        except OSError:
            return None
        finally:
            conn.close()

    def rss_mb(self) -> float:
        return self.ps.memory_info().rss / 2**20

    def stop(self) -> str:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        return open(self.log_path, errors="replace").read()


def fetch(url: str, method: str = "GET", headers: dict | None = None, data: bytes | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, method=method, headers=headers or {}, data=data)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError as e:
        return -1, str(e).encode()


def raw(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(timeout)
    got = b""
    try:
        s.sendall(data)
        while chunk := s.recv(65536):
            got += chunk
    except OSError:
        pass
    finally:
        s.close()
    return got


def status_of(reply: bytes) -> str:
    return reply.split(b"\r\n", 1)[0].decode(errors="replace") if reply else "connection dropped, no answer"


def silent(port: int, n: int) -> list[socket.socket]:
    """``n`` connections that send nothing (what a slowloris client holds)."""
    out = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        out.append(s)
    return out


def still_open(socks: list[socket.socket]) -> int:
    """How many of ``socks`` the server has not closed."""
    n = 0
    for s in socks:
        try:
            if s.recv(1) != b"":
                n += 1
        except BlockingIOError:
            n += 1
        except OSError:
            pass
    return n


def report(name: str, text: str) -> None:
    print("%-34s %s" % (name, text), flush=True)


# -- the attacks ----------------------------------------------------------------


def big_bodies(root: str, n: int = 8, size: int = 95 * 2**20) -> None:
    srv = Server(root)
    try:
        base = srv.rss_mb()
        peak = [base]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], srv.rss_mb())
                time.sleep(0.05)

        def send() -> None:
            s = socket.create_connection(("127.0.0.1", srv.port))
            s.settimeout(10)
            try:
                s.sendall(b"POST /api/rooms HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % size)
                block = b"x" * 2**20
                for _ in range(size // 2**20):
                    s.sendall(block)
                s.recv(100)
            except OSError:
                pass
            finally:
                s.close()

        threading.Thread(target=sample, daemon=True).start()
        start = time.monotonic()
        threads = [threading.Thread(target=send) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        took = time.monotonic() - start
        time.sleep(0.3)
        done.set()
        report("1 bodies %dx%d MB to /api/rooms" % (n, size // 2**20),
               "RSS %.0f MB -> peak %.0f MB; clients done in %.1f s" % (base, peak[0], took))
    finally:
        srv.stop()


def slowloris(root: str, n: int = 2000) -> None:
    srv = Server(root)
    try:
        fds = srv.ps.num_fds()
        socks = silent(srv.port, n)
        time.sleep(1.0)
        held, held_fds = still_open(socks), srv.ps.num_fds() - fds
        t0 = time.monotonic()
        code = srv.health(timeout=3, source="127.0.0.2")  # another address than the attacker's
        health_ms = (time.monotonic() - t0) * 1000
        start = time.monotonic()
        while still_open(socks) and time.monotonic() - start < 15:
            time.sleep(0.2)
        left = still_open(socks)
        closed = "all closed %.1f s after the first second" % (time.monotonic() - start) if not left else \
            "%d still open after 16 s" % left
        report("2 slowloris %d silent sockets" % n,
               "held %d (+%d fds) after 1 s; /healthz %s in %.0f ms; %s" % (held, held_fds, code, health_ms, closed))
        for s in socks:
            s.close()
    finally:
        srv.stop()


def out_of_files(root: str, extra: tuple[str, ...]) -> None:
    srv = Server(root, *extra, wrap=("prlimit", "--nofile=300:300"))
    try:
        socks = silent(srv.port, 400)
        cpu = srv.ps.cpu_percent(interval=3.0)
        grown = os.path.getsize(srv.log_path)
        for s in socks:
            s.close()
        start = time.monotonic()
        while srv.health(timeout=0.5) != 200 and time.monotonic() - start < 10:
            time.sleep(0.1)
        back = time.monotonic() - start
        log = srv.stop()
        report("2 out of files (nofile 300, 400 socks)",
               "CPU %.0f%% over 3 s; log %d KB in those 3 s (%d tracebacks, %d 'cannot accept' lines); "
               "/healthz back %.1f s after release"
               % (cpu, grown // 1024, log.count("Traceback"), log.count("cannot accept"), back))
    finally:
        if srv.proc.poll() is None:
            srv.stop()


def token_mode(root: str) -> None:
    secret = "s" * 32
    srv = Server(root, "--auth=token", "--jwt_secret=" + secret)
    try:
        codes = [fetch(srv.url(p))[0] for p in
                 ("/api/rooms", "/api/rooms/lobby/messages", "/api/docs/notes", "/api/sensors")]
        report("3 token mode, reads with no token", "statuses %s" % codes)
    finally:
        srv.stop()


def log_leaks(root: str) -> None:
    srv = Server(root, "--logging=info", "--ingest_key=LEAKKEY0123456789")
    try:
        status, _ = fetch(srv.url("/static/js/chat.js%00.png?token=LEAKTOKEN"))
        fetch(srv.url("/api/sensors/x/readings?key=LEAKKEY0123456789"), "POST", data=b"[[1,")
        fetch(srv.url("/api/sensors/x"), "PUT", {"Authorization": "Bearer LEAKBEARER"}, b"{}")
    finally:
        log = srv.stop()
    report("4 credentials in the log", "%d log lines show a credential; /static/..%%00 -> %s"
           % (sum(1 for line in log.splitlines() if "LEAK" in line), status))


def ws_handshake(host: str, path: str = "/ws/chat", origin: str | None = None) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    head = ("GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n" % (path, host, key))
    return (head + ("Origin: %s\r\n" % origin if origin else "") + "\r\n").encode()


def close_codes(root: str, n: int = 300) -> None:
    srv = Server(root, "--max_connections_per_ip=0")
    try:
        before = len(fetch(srv.url("/metrics"))[1])
        for i in range(n):
            s = socket.create_connection(("127.0.0.1", srv.port))
            s.sendall(ws_handshake("127.0.0.1:%d" % srv.port))
            buf = b""
            while b"\r\n\r\n" not in buf:
                buf += s.recv(4096)
            mask = os.urandom(4)
            payload = struct.pack("!H", 3000 + i)
            s.sendall(bytes([0x88, 0x80 | len(payload)]) + mask + bytes(b ^ mask[j % 4] for j, b in enumerate(payload)))
            s.settimeout(2)
            try:
                while s.recv(4096):
                    pass
            except OSError:
                pass
            s.close()
        time.sleep(0.3)
        text = fetch(srv.url("/metrics"))[1]
        series = sum(1 for line in text.splitlines() if line.startswith(b"realtime_closes_total{"))
        report("7 %d distinct client close codes" % n,
               "/metrics %.1f KB -> %.1f KB, %d realtime_closes_total series" % (before / 1024, len(text) / 1024,
                                                                                  series))
    finally:
        srv.stop()


def hosts(root: str) -> None:
    srv = Server(root)
    try:
        evil = "evil.example:%d" % srv.port
        rebind = status_of(raw(srv.port, ws_handshake(evil, origin="http://" + evil), timeout=1))
        page = raw(srv.port, b"GET /chat HTTP/1.1\r\nHost: a;img-src\r\nConnection: close\r\n\r\n")
        injected = b"a;img-src" in page.split(b"\r\n\r\n")[0]
        scheme = status_of(raw(srv.port, ws_handshake("127.0.0.1:%d" % srv.port,
                                                      origin="https://127.0.0.1:%d" % srv.port), timeout=1))
        report("8 DNS rebinding handshake", "%s; 'Host: a;img-src' in the CSP: %s; https origin on http: %s"
               % (rebind, injected, scheme))
    finally:
        srv.stop()


def smaller(root: str) -> None:
    secret = "s" * 32
    srv = Server(root, "--auth=token", "--jwt_secret=" + secret)
    try:
        import jwt

        forever = jwt.encode({"sub": "u", "exp": 2**40}, secret, algorithm="HS256")
        long_lived = status_of(raw(srv.port, ws_handshake("127.0.0.1", "/ws/chat?token=" + forever), timeout=1))
        huge = status_of(raw(srv.port, b"GET /ws/chat?token=%s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % (b"t" * 100_000)))
        heads = [fetch(srv.url(p), "HEAD")[0] for p in ("/healthz", "/metrics")]
        with urllib.request.urlopen(srv.url("/static/js/chat.js"), timeout=5) as r:
            nosniff = r.headers.get("X-Content-Type-Options")
        report("9 token exp 2^40", long_lived)
        report("9 100 KB token", huge)
        report("9 HEAD /healthz, /metrics", "%s; /static nosniff: %s" % (heads, nosniff))
    finally:
        srv.stop()
    srv = Server(root, "--auth=token", "--jwt_secret=sixsix", "--logging=warning")
    report("9 6-byte jwt_secret at start", "warned" if "jwt_secret" in srv.stop() else "no warning")
    d = tempfile.mkdtemp(prefix="attack-")
    with open(os.path.join(d, "realtime.sqlite3"), "wb") as f:
        f.write(b"not a database" * 100)
    done = subprocess.run([sys.executable, "server.py", "--port=%d" % free_port(), "--address=127.0.0.1",
                           "--data_dir=" + d], cwd=root, capture_output=True, text=True, timeout=30)
    errors = [line for line in done.stderr.splitlines() if not line.startswith("[I ")]
    report("9 corrupt database at start", "exit %d, %d lines besides info, traceback: %s"
           % (done.returncode, len(errors), "Traceback" in done.stderr))


def creations(root: str, conns: int = 100, each: int = 20) -> None:
    """100 connections from one address create 20 rooms each (2,000), then 100 editor
    sockets open 100 new documents; meanwhile another address creates one of each."""
    import asyncio
    import json

    import websockets

    srv = Server(root)
    base = "ws://127.0.0.1:%d" % srv.port

    async def first(ws: "websockets.ClientConnection", types: tuple[str, ...]) -> dict:
        while True:
            msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if msg["type"] in types:
                return msg

    async def spam_rooms(i: int, ws: "websockets.ClientConnection") -> int:
        for j in range(each):
            await ws.send(json.dumps({"type": "join", "room": "spam-%d-%d" % (i, j)}))
        return sum([(await first(ws, ("joined", "error")))["type"] == "joined" for _ in range(each)])

    async def open_doc(doc: str, source: str = "127.0.0.1") -> str:
        try:
            async with websockets.connect(base + "/ws/edit/" + doc, local_addr=(source, 0)) as ws:
                msg = await first(ws, ("snapshot", "error"))
                return msg["type"] if msg["type"] == "snapshot" else msg["code"]
        except websockets.ConnectionClosed as e:
            return "closed %s" % e.rcvd.code if e.rcvd else "closed"

    async def main() -> None:
        sockets = []
        for i in range(conns):  # one at a time: --max_half_open_per_ip is not what this is about
            sockets.append(await websockets.connect(base + "/ws/chat?name=s%d" % i))
            await first(sockets[-1], ("welcome",))
        start = time.monotonic()
        created = sum(await asyncio.gather(*(spam_rooms(i, ws) for i, ws in enumerate(sockets))))
        took = time.monotonic() - start
        async with websockets.connect(base + "/ws/chat?name=elsewhere", local_addr=("127.0.0.2", 0)) as ws:
            await first(ws, ("welcome",))
            await ws.send(json.dumps({"type": "join", "room": "spam-0-0"}))  # an existing room
            existing = (await first(ws, ("joined", "error")))["type"]
            await ws.send(json.dumps({"type": "join", "room": "a-new-one"}))
            fresh = (await first(ws, ("joined", "error")))["type"]
        report("10 %d rooms from one address" % (conns * each),
               "%d created in %.1f s; from 127.0.0.2 an existing room: %s, a new one: %s"
               % (created, took, existing, fresh))
        for ws in sockets:
            await ws.close()
        outcomes = [await open_doc("spam-%d" % i) for i in range(conns)]
        counts = {k: outcomes.count(k) for k in sorted(set(outcomes))}
        report("10 %d documents from one address" % conns, "%s; from 127.0.0.2 a new one: %s, an existing one: %s"
               % (counts, await open_doc("a-new-doc", "127.0.0.2"), await open_doc("spam-0", "127.0.0.2")))

    try:
        asyncio.run(main())
    finally:
        srv.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=HERE, help="checkout whose server.py to attack")
    ap.add_argument("--only", default="", help="comma-separated attack numbers (1,2,3,4,7,8,9,10)")
    args = ap.parse_args()
    has_cap = "max_half_open_per_ip" in open(os.path.join(args.root, "server.py")).read()
    attacks = {
        "1": [lambda: big_bodies(args.root)],
        "2": [lambda: slowloris(args.root),
              lambda: out_of_files(args.root, ("--max_half_open_per_ip=0",) if has_cap else ())],
        "3": [lambda: token_mode(args.root)],
        "4": [lambda: log_leaks(args.root)],
        "7": [lambda: close_codes(args.root)],
        "8": [lambda: hosts(args.root)],
        "9": [lambda: smaller(args.root)],
        "10": [lambda: creations(args.root)],
    }
    for key, runs in attacks.items():
        if args.only and key not in args.only.split(","):
            continue
        for run in runs:
            try:
                run()
            except Exception as e:  # one attack's failure should not hide the others
                report("%s (failed)" % key, repr(e)[:200])


if __name__ == "__main__":
    main()
