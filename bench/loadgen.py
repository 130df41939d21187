"""Load generator worker: thousands of WebSocket chat clients in one process.

picows on uvloop: frames arrive in a callback with no coroutine per message, so one core
reads well over 100,000 small messages a second. If picows cannot be imported, the
worker falls back to the ``websockets`` asyncio client (much slower; the runner notes it).

The worker is driven by bench/run.py over stdin/stdout, one JSON object per line:
a request ``{"id": n, "cmd": ..., ...}`` gets exactly one reply ``{"id": n, "ok": ...}``,
and long commands emit ``{"event": "progress", "text": ...}`` lines meanwhile. Every
command is bounded by a deadline; connections only ever go to the URL the runner
gives (127.0.0.1).

Clients are numbered globally: worker w of W owns the indices ``i`` with
``i % W == w``; client ``i`` connects as ``u<i>``. Rooms: ``one`` puts everyone in
``r0`` with client 0 publishing; ``groups`` puts client ``i`` in ``r<i // size>``, and
the first member of each room publishes to it. A published text is
``t=<monotonic_ns, 19 digits>.<run tag, 4 digits> <padding>``; each receiver takes
``monotonic_ns() - t`` as the end-to-end latency (CLOCK_MONOTONIC is shared by every
process on the machine).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import websockets.exceptions

from bench.latency import Histogram

try:
    import picows
    from picows import WSCloseCode, WSListener, WSMsgType
    HAVE_PICOWS = True
except ImportError:  # pragma: no cover - the fallback path
    HAVE_PICOWS = False
    WSListener = object  # type: ignore[misc,assignment]

monotonic_ns = time.monotonic_ns
TEXT_PREFIX = b'"t='
TAG_LEN = 4
DIGITS = 19
LINGER_ABORT = struct.pack("ii", 1, 0)


def frame_type(payload: bytes) -> bytes:
    """The value of the first ``"type"`` key: servers put it first, with or without spaces."""
    i = payload.find(b'"type"')
    if i < 0:
        return b""
    j = payload.find(b'"', i + 6)
    if j < 0:
        return b""
    return payload[j + 1:payload.find(b'"', j + 1)]


def parse_stamp(payload: bytes) -> tuple[int, bytes] | None:
    """(publisher's monotonic_ns, run tag) from a chat message's text, if it carries one."""
    i = payload.find(TEXT_PREFIX)
    if i < 0:
        return None
    start = i + 3
    try:
        return int(payload[start:start + DIGITS]), payload[start + DIGITS + 1:start + DIGITS + 1 + TAG_LEN]
    except ValueError:
        return None


STAMP_LEN = 2 + DIGITS + 1 + TAG_LEN + 1  # "t=" digits "." tag " "


def text_pad(text_len: int) -> bytes:
    """Padding that makes a stamped text ``text_len`` characters long."""
    return b"x" * max(0, text_len - STAMP_LEN)


def say_frame(room: bytes, cid: bytes, tag: bytes, pad: bytes) -> bytes:
    return b'{"type":"say","room":"%s","cid":"%s","text":"t=%019d.%s %s"}' % (
        room, cid, monotonic_ns(), tag, pad)


def ack_cid(payload: bytes) -> bytes:
    """The ``cid`` of an ack frame (b"" when it has none)."""
    i = payload.find(b'"cid"')
    if i < 0:
        return b""
    j = payload.find(b'"', i + 5)
    return payload[j + 1:payload.find(b'"', j + 1)] if j >= 0 else b""


def raise_nofile_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def client_socket(_url: Any = None) -> socket.socket:
    """A socket that resets when closed before its closing handshake finished (the
    teardown of a run that went wrong), instead of lingering in TIME_WAIT."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ABORT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    return sock


class LabelStats:
    """Deliveries to the clients of one label (e.g. the node they are connected to)."""

    __slots__ = ("recv", "hist")

    def __init__(self) -> None:
        self.recv = 0
        self.hist = Histogram()


class Stats:
    """Counters for the current run; the hot path touches only these."""

    def __init__(self) -> None:
        self.reset(b"0000")

    def reset(self, tag: bytes) -> None:
        self.tag = tag
        self.recv_fast = 0
        self.recv_stalled = 0
        self.stale = 0
        self.acks = 0
        self.errors = 0
        self.error_text = ""
        self.disconnects = 0
        self.close_codes: dict[str, int] = {}
        self.first_recv = 0
        self.last_recv = 0
        self.hist = Histogram()
        self.ack_hist = Histogram()  # say -> ack, for the says sent in this run
        self.labels: dict[str, LabelStats] = {}

    def label(self, name: str) -> LabelStats:
        found = self.labels.get(name)
        if found is None:
            found = self.labels[name] = LabelStats()
        return found


class Client(WSListener):  # type: ignore[misc]
    """One chat client. ``on_ws_frame`` is the hot path: byte searches, no JSON parse."""

    def __init__(self, worker: Worker, index: int) -> None:
        self.worker = worker
        self.index = index
        self.room = b""
        self.transport: Any = None
        self.welcomed: asyncio.Future[None] = worker.loop.create_future()
        self.is_joined = False
        self.stalled = False
        self.closing = False
        self.received = 0
        self.label = ""  # which group of clients this one is counted in (connect's ``label``)
        self.lstats: LabelStats | None = None

    # picows callbacks
    def on_ws_connected(self, transport: Any) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: Any, frame: Any) -> None:
        if frame.msg_type != WSMsgType.TEXT:
            if frame.msg_type == WSMsgType.CLOSE:
                self.worker.note_close(frame.get_close_code().value)
                if not self.closing:
                    transport.send_close(frame.get_close_code())
                transport.disconnect()
            return
        self.on_text(frame.get_payload_as_bytes())

    def on_ws_disconnected(self, transport: Any) -> None:
        self.worker.on_disconnect(self)

    # shared by both client implementations
    def on_text(self, payload: bytes) -> None:
        stats = self.worker.stats
        kind = frame_type(payload)
        if kind == b"message":
            stamp = parse_stamp(payload)
            if stamp is None or stamp[1] != stats.tag:
                stats.stale += 1
                return
            now = monotonic_ns()
            self.received += 1
            if self.stalled:
                stats.recv_stalled += 1
            else:
                stats.recv_fast += 1
                stats.hist.add_ns(now - stamp[0])
                lstats = self.lstats
                if lstats is not None:
                    lstats.recv += 1
                    lstats.hist.add_ns(now - stamp[0])
            if not stats.first_recv:
                stats.first_recv = now
            stats.last_recv = now
        elif kind == b"ack":
            if b'"%s-' % stats.tag in payload:  # our cids start with the run's tag
                stats.acks += 1
                sent = self.worker.ack_due.pop(ack_cid(payload), 0)
                if sent:
                    stats.ack_hist.add_ns(monotonic_ns() - sent)
            else:
                stats.stale += 1
        elif kind == b"welcome":
            if not self.welcomed.done():
                self.welcomed.set_result(None)
        elif kind == b"joined":
            if not self.is_joined:
                self.is_joined = True
                self.worker.joined += 1
        elif kind == b"error":
            stats.errors += 1
            if not stats.error_text:
                stats.error_text = payload[:300].decode("utf-8", "replace")
        # presence, typing and anything else: ignored

    def send_text(self, data: bytes) -> None:
        self.transport.send(WSMsgType.TEXT, data)

    def pause(self) -> None:
        self.stalled = True
        self.transport.underlying_transport.pause_reading()

    def resume(self) -> None:
        self.transport.underlying_transport.resume_reading()

    def close(self) -> None:
        """Start the closing handshake; the server answers and closes the connection."""
        self.closing = True
        if self.stalled:
            self.resume()  # a paused reader would never see the server's close frame
        self.transport.send_close(WSCloseCode.OK)

    def gone(self) -> bool:
        return self.transport is None or self.transport.is_disconnected

    def abort(self) -> None:
        self.closing = True
        if self.transport is not None and not self.transport.is_disconnected:
            self.transport.disconnect(graceful=False)


class FallbackClient(Client):
    """The same client over the ``websockets`` asyncio client, for when picows is missing."""

    async def run(self, url: str, timeout: float) -> None:
        from websockets.asyncio.client import connect
        self.ws = await connect(url, open_timeout=timeout, compression=None,
                                max_size=None, ping_interval=None)
        self.transport = self.ws
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                self.on_text(message.encode() if isinstance(message, str) else message)
        except (OSError, websockets.exceptions.ConnectionClosed):
            pass  # a dropped connection is counted just below
        self.worker.on_disconnect(self)

    def send_text(self, data: bytes) -> None:
        asyncio.ensure_future(self.ws.send(data.decode()))

    def pause(self) -> None:
        self.stalled = True
        self.ws.transport.pause_reading()

    def resume(self) -> None:
        self.ws.transport.resume_reading()

    def close(self) -> None:
        self.closing = True
        if self.stalled:
            self.resume()
        asyncio.ensure_future(self.ws.close())

    def gone(self) -> bool:
        return self.reader.done()

    def abort(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.ws.transport.abort()


class Worker:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.clients: list[Client] = []
        self.joined = 0
        self.stats = Stats()
        self.pub_rooms: dict[bytes, Client] = {}
        self.ack_due: dict[bytes, int] = {}  # cid -> when its say went out
        self.use_picows = HAVE_PICOWS and os.environ.get("BENCH_CLIENT") != "websockets"

    # -- bookkeeping ---------------------------------------------------------

    def note_close(self, code: int) -> None:
        key = str(code)
        self.stats.close_codes[key] = self.stats.close_codes.get(key, 0) + 1

    def on_disconnect(self, client: Client) -> None:
        if not client.closing:
            self.stats.disconnects += 1
            client.closing = True

    def progress(self, text: str) -> None:
        emit({"event": "progress", "text": text})

    # -- commands ------------------------------------------------------------

    async def cmd_connect(self, req: dict[str, Any]) -> dict[str, Any]:
        """Open clients ``range(start, stop, step)`` (or the given ``indices``), ``concurrency``
        handshakes at a time.
        Their deliveries are also counted under ``label`` (the drain's ``labels``), so one
        run can tell apart clients of different servers."""
        url = req["url"]
        label = req.get("label", "")
        indices = list(req["indices"]) if "indices" in req else list(range(req["start"], req["stop"], req["step"]))
        deadline = time.monotonic() + req["timeout"]
        timeout = req.get("handshake_timeout", 15.0)
        hist = Histogram()
        failures: list[str] = []
        pending = iter(indices)
        done = 0
        first = time.monotonic()

        async def one(index: int) -> None:
            nonlocal done
            client: Client | None = None
            t0 = monotonic_ns()
            try:
                target = f"{url}?name=u{index}"
                if self.use_picows:
                    client = Client(self, index)
                    await asyncio.wait_for(picows.ws_connect(
                        lambda c=client: c, target, socket_factory=client_socket,
                        websocket_handshake_timeout=timeout, read_buffer_init_size=4096,
                        max_frame_size=1 << 20), timeout)
                else:
                    client = FallbackClient(self, index)
                    await client.run(target, timeout)
                await asyncio.wait_for(asyncio.shield(client.welcomed), timeout)
                hist.add_ns(monotonic_ns() - t0)
                client.label = label
                self.clients.append(client)
            except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
                if len(failures) < 5:
                    failures.append(f"{type(exc).__name__}: {exc}")
                if client is not None:
                    client.abort()
            done += 1

        async def lane() -> None:
            for index in pending:
                if time.monotonic() > deadline:
                    return
                await one(index)

        async def report() -> None:
            while True:
                await asyncio.sleep(0.5)
                self.progress(f"connected {len(self.clients)}/{len(indices)}")

        reporter = asyncio.ensure_future(report())
        try:
            lanes = [asyncio.ensure_future(lane()) for _ in range(max(1, req["concurrency"]))]
            await asyncio.wait(lanes, timeout=max(0.1, deadline - time.monotonic() + timeout + 1))
            for task in lanes:
                task.cancel()
        finally:
            reporter.cancel()
        elapsed = time.monotonic() - first
        self.clients.sort(key=lambda c: c.index)
        return {"connected": len(self.clients), "wanted": len(indices),
                "failed": len(indices) - len(self.clients), "failures": failures,
                "seconds": elapsed, "hist": hist.to_sparse()}

    async def cmd_join(self, req: dict[str, Any]) -> dict[str, Any]:
        """Join every client to its room; wait for the ``joined`` replies."""
        mode, size = req["mode"], max(1, req.get("size", 1))
        self.pub_rooms = {}
        self.joined = 0
        for client in self.clients:
            room = 0 if mode == "one" else client.index // size
            client.room = b"r%d" % room
            if client.index == (0 if mode == "one" else room * size):
                self.pub_rooms[client.room] = client
        deadline = time.monotonic() + req["timeout"]
        batch = max(1, req.get("batch", 500))
        for i in range(0, len(self.clients), batch):
            for client in self.clients[i:i + batch]:
                if not client.closing:
                    client.send_text(b'{"type":"join","room":"%s"}' % client.room)
            await asyncio.sleep(0)  # let replies in between batches
        last_report = time.monotonic()
        while self.joined < len(self.clients) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            if time.monotonic() - last_report > 0.5:
                last_report = time.monotonic()
                self.progress(f"joined {self.joined}/{len(self.clients)}")
        timed_out = self.joined < len(self.clients)
        if timed_out:  # measure only clients that are in their room
            for client in self.clients:
                if not client.is_joined:
                    client.abort()
            self.clients = [c for c in self.clients if c.is_joined]
            self.pub_rooms = {r: c for r, c in self.pub_rooms.items() if c.is_joined}
        return {"joined": self.joined, "clients": len(self.clients),
                "publishers": len(self.pub_rooms), "timed_out": timed_out}

    async def cmd_stall(self, req: dict[str, Any]) -> dict[str, Any]:
        """Stop reading on every ``every``-th client (never a publisher)."""
        every = req["every"]
        publishers = set(map(id, self.pub_rooms.values()))
        count = 0
        for client in self.clients:
            if client.index % every == every - 1 and id(client) not in publishers and not client.closing:
                client.pause()
                count += 1
        return {"stalled": count}

    async def cmd_resume(self, req: dict[str, Any]) -> dict[str, Any]:
        """Read again on the stalled clients, to learn whether the server closed them
        (and with which code) or kept their backlog; stops when nothing happens for
        ``quiet`` seconds, or at ``timeout``."""
        stalled = [c for c in self.clients if c.stalled]
        for client in stalled:
            if not client.closing:
                client.resume()
        stats = self.stats
        deadline = time.monotonic() + req["timeout"]
        last, last_change = None, time.monotonic()
        while time.monotonic() < deadline:
            state = (stats.recv_stalled, stats.stale, stats.disconnects)
            if state != last:
                last, last_change = state, time.monotonic()
            elif time.monotonic() - last_change > req["quiet"]:
                break
            await asyncio.sleep(0.02)
        return {"stalled": len(stalled), "disconnected_stalled": sum(1 for c in stalled if c.closing),
                "recv_stalled": stats.recv_stalled, "close_codes": stats.close_codes}

    async def cmd_reset(self, req: dict[str, Any]) -> dict[str, Any]:
        self.stats.reset(req["tag"].encode())
        self.ack_due = {}
        for client in self.clients:
            client.received = 0
            client.lstats = self.stats.label(client.label)
        return {}

    async def cmd_publish(self, req: dict[str, Any]) -> dict[str, Any]:
        """Publish for ``duration`` seconds: at ``rate`` messages/s in total across all
        publishers of all workers, or (``window``) keeping that many messages in flight."""
        duration = req["duration"]
        pad = text_pad(req["text_len"])
        tag = self.stats.tag
        pubs = [c for c in self.pub_rooms.values() if not c.closing]
        counts: dict[str, int] = {}
        if not pubs:
            await asyncio.sleep(duration)
            return {"published": counts, "seconds": duration, "window": None}
        cid_prefix = [b"%s-%d" % (tag, c.index) for c in pubs]
        sent = [0] * len(pubs)
        total = 0
        windows: list[float] = []
        start = time.monotonic()
        end = start + duration

        ack_due = self.ack_due

        def send(k: int) -> None:
            nonlocal total
            client = pubs[k]
            sent[k] += 1
            total += 1
            cid = b"%s-%d" % (cid_prefix[k], sent[k])
            ack_due[cid] = monotonic_ns()
            client.send_text(say_frame(client.room, cid, tag, pad))

        if req["mode"] == "rate":
            rate = req["rate"] * len(pubs) / max(1, req["total_publishers"])
            limit = max(1, round(duration * rate))  # message k goes out at start + k / rate
            turn = 0
            while total < limit:
                now = time.monotonic()
                if now >= end:
                    break
                due = min(int((now - start) * rate) + 1, limit) - total
                due = min(due, 1000)
                for _ in range(due):
                    send(turn)
                    turn = (turn + 1) % len(pubs)
                wait = (total / rate) - (time.monotonic() - start)
                await asyncio.sleep(min(max(wait, 0.0005), 0.01))
        else:
            # Keep about ``window_secs`` of deliveries in flight (messages said but not yet
            # received by every member), re-estimated every 0.1 s from the delivery rate,
            # within [window_min, window_max] messages: enough to keep a fast server busy,
            # little enough that a slow one drains quickly.
            members = max(1, sum(1 for c in self.clients if not c.stalled and not c.closing))
            stats = self.stats
            low, high, secs = req["window_min"], req["window_max"], req["window_secs"]
            window = low
            mark_t, mark_recv = start, 0
            while time.monotonic() < end:
                now = time.monotonic()
                if now - mark_t >= 0.1:
                    per_second = (stats.recv_fast - mark_recv) / members / (now - mark_t)
                    window = min(high, max(low, per_second * secs))
                    windows.append(window)
                    mark_t, mark_recv = now, stats.recv_fast
                in_flight = total - stats.recv_fast / members
                for _ in range(int(window - in_flight)):
                    send(0)
                await asyncio.sleep(0.0005)
        for k, client in enumerate(pubs):
            key = client.room.decode()
            counts[key] = counts.get(key, 0) + sent[k]
        return {"published": counts, "seconds": time.monotonic() - start,
                "window": sum(windows) / len(windows) if windows else None}

    async def cmd_drain(self, req: dict[str, Any]) -> dict[str, Any]:
        """Wait until every reading client has every message published to its room; stop
        early when nothing has arrived for ``quiet`` seconds -- or for ``quiet_unacked``
        seconds while some of this worker's messages are not acknowledged yet (a durable
        server may hold a whole batch behind one slow commit) -- or at ``timeout``."""
        published = {k.encode(): v for k, v in req["published"].items()}
        readers = [c for c in self.clients if not c.stalled]
        expected = sum(published.get(c.room, 0) for c in readers)
        stats = self.stats
        deadline = time.monotonic() + req["timeout"]
        last_seen, last_change = (-1, -1), time.monotonic()
        while stats.recv_fast < expected:
            now = time.monotonic()
            seen = (stats.recv_fast, stats.acks)
            if seen != last_seen:
                last_seen, last_change = seen, now
            elif now - last_change > (req["quiet"] if stats.acks >= req["acks_expected"] else req["quiet_unacked"]):
                break
            if now > deadline:
                break
            await asyncio.sleep(0.01)
        lost = dup = 0
        labels: dict[str, dict[str, Any]] = {}
        for client in readers:
            want = published.get(client.room, 0)
            per = labels.get(client.label)
            if per is None:
                got = stats.labels.get(client.label) or LabelStats()
                per = labels[client.label] = {"clients": 0, "expected": 0, "recv": got.recv, "lost": 0, "dup": 0,
                                              "hist": got.hist.to_sparse()}
            per["clients"] += 1
            per["expected"] += want
            if client.received < want:
                lost += want - client.received
                per["lost"] += want - client.received
            else:
                dup += client.received - want
                per["dup"] += client.received - want
        return {"expected_fast": expected, "recv_fast": stats.recv_fast,
                "recv_stalled": stats.recv_stalled, "lost_fast": lost, "dup_fast": dup,
                "stale": stats.stale, "acks": stats.acks, "errors": stats.errors,
                "error_text": stats.error_text, "disconnects": stats.disconnects,
                "disconnected_readers": sum(1 for c in readers if c.closing),
                "disconnected_stalled": sum(1 for c in self.clients if c.stalled and c.closing),
                "close_codes": stats.close_codes,
                "first_recv_ns": stats.first_recv, "last_recv_ns": stats.last_recv,
                "hist": stats.hist.to_sparse(), "ack_hist": stats.ack_hist.to_sparse(), "labels": labels}

    async def cmd_close(self, req: dict[str, Any]) -> dict[str, Any]:
        """Close every client with a close frame (1000), let the server finish the
        handshake and drop the TCP connection, then reset whatever is left."""
        clients, self.clients, self.pub_rooms = self.clients, [], {}
        for i, client in enumerate(clients):
            if not client.closing:
                client.close()
            if i % 500 == 499:
                await asyncio.sleep(0)
        deadline = time.monotonic() + req.get("timeout", 5.0)
        while time.monotonic() < deadline and any(not c.gone() for c in clients):
            await asyncio.sleep(0.05)
        left = sum(1 for c in clients if not c.gone())
        for client in clients:
            client.abort()
        return {"closed": len(clients), "reset": left}


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def serve_commands() -> None:
    loop = asyncio.get_running_loop()
    worker = Worker(loop)
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    emit({"event": "ready", "picows": worker.use_picows, "pid": os.getpid()})
    handlers: dict[str, Callable[[dict[str, Any]], Any]] = {
        name[4:]: getattr(worker, name) for name in dir(worker) if name.startswith("cmd_")}
    while True:
        line = await reader.readline()
        if not line:
            break  # the runner went away: stop
        req = json.loads(line)
        if req["cmd"] == "exit":
            emit({"id": req["id"], "ok": True})
            break
        try:
            reply = await handlers[req["cmd"]](req)
            reply.update(id=req["id"], ok=True)
        except Exception as exc:  # noqa: BLE001 - reported to the runner, which decides
            reply = {"id": req["id"], "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        emit(reply)
    for client in worker.clients:
        client.abort()


def main() -> None:
    raise_nofile_limit()
    if HAVE_PICOWS and os.environ.get("BENCH_CLIENT") != "websockets":
        try:
            import uvloop
            uvloop.run(serve_commands())
            return
        except ImportError:
            pass
    asyncio.run(serve_commands())


if __name__ == "__main__":
    main()
