"""The WebSocket base every app's socket stands on.

One choke point per socket: :meth:`BaseSocketHandler.on_message` checks the
frame type and the rate limit, decodes and validates once, and dispatches to a
``msg_<type>`` method.  Nothing escapes it: a client fault becomes an ``error``
message (the connection stays open), a protocol violation a close code, and a
bug in a handler a logged traceback plus close 1011.

Security lives here, not in each app: origin check (exact match against
``--allowed_origins``, same host by default), identity at the handshake (HTTP
401/403 instead of an upgrade), connections per IP (HTTP 429), message size
(1009), messages per second (``rate_limited``, then 1008), and each
connection's unflushed bytes (the slow-consumer bound).

Outgoing messages take a fast path: the frame is built once per message (see
:class:`realtime.protocol.Outgoing`) and the same bytes are written to every
recipient's stream, several messages of one loop iteration in one write
(handlers/writer.py, which counts each connection's unflushed bytes with
public IOStream API only).  With ``--fast_path=false`` or compression, messages
go through ``write_message`` instead.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from types import MappingProxyType
from typing import Any, Awaitable, Callable, Mapping

import tornado
import tornado.httputil
import tornado.iostream
import tornado.web
import tornado.websocket
from tornado.iostream import StreamClosedError

from handlers.websocket import TORNADO_FITS, WireParams, WireProtocol
from handlers.writer import MessageWriter, StreamWriter
from realtime.auth import AuthError, Identity
from realtime.config import Config
from realtime.context import Context
from realtime.limits import FloodGuard
from realtime.protocol import (
    Close,
    Outgoing,
    ProtocolError,
    WireFormat,
    close_reason,
    decode,
    decode_msgpack,
    decode_value,
    error_message,
    get_str,
)
from realtime.wire import OP_BINARY, OP_TEXT, frame

log = logging.getLogger("realtime.socket")

SESSION_COOKIE = "rt_session"
MSGPACK = "msgpack"  # the subprotocol for MessagePack binary frames


_DEFAULT_PORTS = {"http": "80", "https": "443"}


def same_origin(origin: str, scheme: str, host: str) -> bool:
    """Whether a browser's ``Origin`` names ``scheme://host`` (default ports
    may be left out on either side)."""
    o_scheme, sep, o_host = origin.lower().partition("://")
    if not sep:
        return False

    def strip(s: str, h: str) -> str:
        port = _DEFAULT_PORTS.get(s)
        return h[: -len(port) - 1] if port and h.endswith(":" + port) else h

    return o_scheme == scheme.lower() and strip(o_scheme, o_host) == strip(scheme.lower(), host.lower())


class _ShedHeaders(tornado.httputil.HTTPHeaders):
    """No headers, and no way to add any: what a connection's request and
    response headers become once the upgrade is done.  Being immutable, one
    instance can stand in for every connection's."""

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("this connection's HTTP headers were released after the WebSocket upgrade")

    add = __setitem__ = __delitem__ = parse_line = _refuse  # type: ignore[assignment]


_NO_HEADERS = _ShedHeaders()
_NO_ARGS: Mapping[str, list[bytes]] = MappingProxyType({})


class ConnState:
    """Everything the base keeps per connection, in slots."""

    __slots__ = ("ctx", "user", "ip", "conn_id", "flood", "ip_counted", "opened", "closing",
                 "inflight", "inflight_done", "tasks", "outq", "outq_bytes", "writer", "fmt", "cap",
                 "refusal", "expiry", "close_sent")

    def __init__(self, ctx: Context, flood: FloodGuard) -> None:
        self.ctx = ctx
        self.flood = flood
        self.user: Identity | None = None
        self.ip = "?"
        self.conn_id = 0
        self.ip_counted = False
        self.opened = False
        self.closing = False
        self.inflight = 0
        self.inflight_done: asyncio.Event | None = None
        self.tasks: set[asyncio.Task[Any]] | None = None
        self.outq: list[bytes] | None = None  # frames waiting for this iteration's flush
        self.outq_bytes = 0
        self.writer: StreamWriter | MessageWriter | None = None  # set at open (handlers/writer.py)
        self.fmt: WireFormat = ctx.formats.json  # JSON text or MessagePack binary, deflated or not
        self.cap: int = ctx.cfg.max_write_buffer
        self.refusal: tuple[int, str] | None = None  # ?close_codes=1: refused, told by a close after the upgrade
        self.expiry: asyncio.TimerHandle | None = None  # token_expiring, then close 4001 at the token's exp
        self.close_sent: int | None = None  # the code of the close frame we sent first (1005: none)


def _state(name: str) -> Any:
    return property(lambda self: getattr(self.rt, name), lambda self, v: setattr(self.rt, name, v))


class BaseSocketHandler(tornado.websocket.WebSocketHandler):
    """Subclasses define ``msg_<type>(self, msg)`` (plain or ``async``) and
    optionally ``opened()`` / ``closed()``."""

    app_name = "base"
    # Slow consumers: close with 1013 so the client reconnects and resumes.
    # The sensor socket overrides ``on_backlog`` to conflate instead.

    def initialize(self, ctx: Context) -> None:
        cfg = ctx.cfg
        self.rt = ConnState(ctx, FloodGuard(cfg.rate_limit, cfg.rate_burst, cfg.flood_strikes))

    # Our per-connection state lives in one slotted ConnState (``self.rt``);
    # these properties keep the handler API plain.  Tornado already sets 27
    # attributes on a handler; staying under CPython's 30 shared keys keeps the
    # instance dict compact (memory per idle connection is a target).
    ctx = _state("ctx")
    user = _state("user")
    ip = _state("ip")
    conn_id = _state("conn_id")
    flood = _state("flood")
    _ip_counted = _state("ip_counted")
    _opened = _state("opened")
    _closing = _state("closing")
    _inflight = _state("inflight")
    _inflight_done = _state("inflight_done")
    _tasks = _state("tasks")

    @property
    def cfg(self) -> Config:
        return self.rt.ctx.cfg

    # -- handshake -------------------------------------------------------

    def check_origin(self, origin: str) -> bool:
        """Exact match against ``--allowed_origins``; without it, same host only.

        Browsers always send Origin; other clients may not, and are then let
        through to authentication (they can't borrow a browser's cookies).
        """
        allowed = self.cfg.allowed_origins
        if allowed:
            return "*" in allowed or origin in allowed
        # Same origin: scheme, host and port of this request.  The host was
        # checked against --allowed_hosts by the gate (a DNS-rebinding page
        # sends its own name as Host and as Origin, and is refused there).
        return same_origin(origin, self.request.protocol, self.request.host)

    def get_compression_options(self) -> dict[str, Any] | None:
        return {} if self.cfg.websocket_compression else None

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        """``msgpack``: the same messages as MessagePack binary frames."""
        return MSGPACK if MSGPACK in subprotocols else None

    def get_websocket_protocol(self) -> tornado.websocket.WebSocketProtocol | None:
        """Our own frames (handlers/websocket.py) unless ``--fast_path=false``."""
        if not (self.cfg.fast_path and TORNADO_FITS) or self.request.headers.get("Sec-WebSocket-Version") != "13":
            return super().get_websocket_protocol()
        ctx = self.rt.ctx
        if ctx.wire_params is None:
            ctx.wire_params = WireParams(self.max_message_size, self.ping_interval, self.ping_timeout,
                                         compression=bool(self.cfg.websocket_compression), formats=ctx.formats)
        return WireProtocol(self, ctx.wire_params)

    def refuse(self, status: int, message: str) -> None:
        """Answer the handshake with an HTTP error instead of an upgrade.

        A browser cannot read that status (its WebSocket sees only 1006), so a
        client that asks with ``?close_codes=1`` gets an upgrade instead, then at
        once a close: 4001 for a 401 (refresh the token, then reconnect), 4003
        for a 403 (do not reconnect).  Nothing else is sent on such a socket."""
        self.ctx.stats.refused(status)
        code = {401: Close.TOKEN_EXPIRED, 403: Close.FORBIDDEN}.get(status)
        if code is not None and self.get_query_argument("close_codes", "") in ("1", "true") \
                and self.request.headers.get("Upgrade", "").lower() == "websocket":
            self.rt.refusal = (code, message)
            return
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish({"error": message, "status": status})

    @property
    def handshake_refused(self) -> bool:
        """prepare() refused this request (an HTTP answer, or a close to come)."""
        return self._finished or self.rt.refusal is not None

    def prepare(self) -> None:
        """Identity and per-address limits, before the upgrade.

        Done here rather than in an overridden ``get`` so that no extra
        coroutine frame stays alive for the life of every connection."""
        if self.ctx.shutting_down:
            self.refuse(503, "server is shutting down")
            return
        # Checked here as well as by Tornado after prepare(): Tornado lets an
        # Origin whose host:port equals Host through without comparing the
        # scheme (an http:// page opening this wss:// endpoint).
        origin = self.request.headers.get("Origin")
        if origin is not None and not self.check_origin(origin):
            self.refuse(403, "origin %r may not connect here (see --allowed_origins)" % origin[:100])
            return
        token = request_token(self)
        session = self.get_query_argument("session", None) or self.get_cookie(SESSION_COOKIE)
        try:
            self.user = self.ctx.auth.identify(
                name=self.get_query_argument("name", None), session=session, token=token
            )
        except AuthError as e:
            self.refuse(e.status, e.message)
            return
        if self.rt.refusal is not None:
            return
        ip = self.ip = self.request.remote_ip or "?"
        if not self.ctx.conn_limit.acquire(ip):
            self.refuse(429, "too many connections from this address")
            return
        self._ip_counted = True

    def on_finish(self) -> None:
        # The HTTP exchange ended without an upgrade (bad origin, not a
        # WebSocket request): give the address's slot back.
        if self.get_status() != 101 and self._ip_counted:
            self._ip_counted = False
            self.ctx.conn_limit.release(self.ip)

    # -- lifecycle -------------------------------------------------------

    def open(self, *args: str, **kwargs: str) -> Awaitable[None] | None:
        refusal = self.rt.refusal
        if refusal is not None:  # ?close_codes=1: the refusal, as a close code a browser can read
            self.close(*refusal)
            return None
        self.conn_id = self.ctx.next_id()
        self._opened = True
        self.ctx.connections.add(self)
        self.ctx.stats.connections_total += 1
        self._setup_writer()
        self.set_nodelay(True)
        self._shed_handshake_state()
        if self.user is not None and self.user.expires is not None:
            return self._guard(self._open_with_token, *args)
        return self._guard(self.opened, *args)

    # -- token lifetime ----------------------------------------------------

    async def _open_with_token(self, *args: str) -> None:
        result = self.opened(*args)
        if result is not None:
            await result
        self._arm_expiry()  # after the first message (welcome, snapshot): it always comes first

    def _arm_expiry(self) -> None:
        """``token_expiring`` ``--token_refresh_window`` seconds before the
        token's ``exp`` (at once if it is closer), then close 4001 at ``exp``
        unless a ``refresh`` brought a later one (as Centrifugo does)."""
        rt = self.rt
        if rt.expiry is not None:
            rt.expiry.cancel()
            rt.expiry = None
        user = rt.user
        if rt.closing or user is None or user.expires is None:
            return
        warn_in = user.expires - self.cfg.token_refresh_window - time.time()
        loop = asyncio.get_running_loop()
        if warn_in > 0:
            rt.expiry = loop.call_later(warn_in, self._token_expiring)
        else:
            self._token_expiring()

    def _token_expiring(self) -> None:
        rt = self.rt
        user = rt.user
        if rt.closing or user is None or user.expires is None:
            return
        left = max(0.0, user.expires - time.time())
        self.send({"type": "token_expiring", "exp": user.expires, "expires_in": round(left, 3)})
        rt.expiry = asyncio.get_running_loop().call_later(left, self._token_expired)

    def _token_expired(self) -> None:
        self.rt.expiry = None
        self.ctx.stats.error("token_expired")
        self.close(Close.TOKEN_EXPIRED, "token expired: refresh it, then reconnect")

    def msg_refresh(self, msg: dict[str, Any]) -> None:
        """``{"type": "refresh", "token": ...}``: a fresh token for the same
        user (another user's is ``forbidden``); its expiry and roles replace
        the old ones.  Every right that comes from roles is checked at each
        message against the connection's current ones, so from now on the new
        roles decide; ``refreshed`` says what they allow (:meth:`rights`)."""
        token = get_str(msg, "token", max_len=self.cfg.max_header_size)
        assert token is not None and self.user is not None
        try:
            self.user = self.ctx.auth.refreshed(self.user, token)
        except AuthError as e:
            code = {400: "bad_message", 403: "forbidden"}.get(e.status, "unauthorized")
            raise ProtocolError(code, e.message) from None
        self._arm_expiry()
        self.reply(msg, {"type": "refreshed", "exp": self.user.expires, **self.rights()})

    def rights(self) -> dict[str, Any]:
        """What this connection's identity allows, in the fields its first
        message states them (the editor's ``readonly``, the sensor socket's
        ``can_publish``); sent again in ``refreshed``."""
        return {}

    def _setup_writer(self) -> None:
        """Finished frames through our protocol's writer; with Tornado's own
        protocol (``--fast_path=false``), whole messages via ``write_message``."""
        rt = self.rt
        ws = self.ws_connection
        binary = ws is not None and ws.selected_subprotocol == MSGPACK
        if isinstance(ws, WireProtocol) and ws.writer is not None:
            rt.writer = ws.writer
            rt.fmt = rt.ctx.formats.get(binary, ws.deflate_wbits)
        else:
            rt.writer = MessageWriter(self, binary)
            rt.fmt = rt.ctx.formats.get(binary, None)

    def _shed_handshake_state(self) -> None:
        """Drop what only the handshake needed (request and response headers,
        parsed query and cookies); about 2 KiB per connection, kept for hours.
        What replaces them is empty and immutable, so sharing it is safe."""
        req = self.request
        req.headers = _NO_HEADERS
        req.query_arguments = req.arguments = req.body_arguments = _NO_ARGS  # type: ignore[assignment]
        self._headers = _NO_HEADERS

    def opened(self, *args: str) -> Awaitable[None] | None:
        """Called once the connection is up; send the welcome here."""
        return None

    def on_close(self) -> None:
        self._closing = True
        self.rt.outq = None
        self.ctx.connections.discard(self)
        if self._ip_counted:
            self._ip_counted = False
            self.ctx.conn_limit.release(self.ip)
        self.ctx.stats.closed(self.closed_with())
        if self.rt.expiry is not None:
            self.rt.expiry.cancel()
            self.rt.expiry = None
        for task in list(self._tasks or ()):
            task.cancel()
        if self._opened:
            try:
                self.closed()
            except Exception:
                log.exception("closed() failed for %s", self.app_name)

    def closed(self) -> None:
        """Called once when the connection is gone: leave rooms, release state."""

    def closed_with(self) -> int:
        """The connection's close code, as /metrics counts it: the code of our
        close frame if we closed first (whether or not the client echoed it:
        one that goes away may never), else the client's, else 1006 (no close
        frame either way: the TCP connection dropped)."""
        if self.rt.close_sent is not None:
            return self.rt.close_sent
        return self.close_code or 1006

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        if self._closing:
            return
        if self.rt.outq:
            self._flush()  # an error queued just before the close still goes first
        self._closing = True
        self.rt.outq = None
        self.rt.close_sent = code if code is not None else (1000 if reason else 1005)
        super().close(code, close_reason(reason) if reason else None)

    def session_token(self) -> str:
        """A signed session a client can pass back as ``?session=`` to keep its identity."""
        assert self.user is not None
        return self.ctx.auth.session_for(self.user) if self.user.guest else ""

    # -- incoming --------------------------------------------------------

    def on_message(self, message: str | bytes) -> Awaitable[None] | None:
        if self._closing:
            return None
        binary = not isinstance(message, str)
        if binary != self.rt.fmt.binary:
            if binary:
                self.close(Close.UNSUPPORTED, "binary frames are not supported; send JSON text"
                           " (or connect with the msgpack subprotocol)")
            else:
                self.close(Close.UNSUPPORTED, "this connection speaks MessagePack: send binary frames, not text")
            return None
        verdict = self.admit()
        if verdict is None:
            return None
        try:
            msg = decode_msgpack(message) if binary else decode(message)  # type: ignore[arg-type]
        except ProtocolError as e:
            self.reply_error(e.code, e.message)
            return None
        if verdict != "ok":
            # Decoded first (frames are at most max_message_size) so that the
            # error carries the refused message's ref: the client knows which to resend.
            self.reply_error("rate_limited", "too many messages; slow down", msg.get("ref"))
            return None
        handler: Callable[[dict[str, Any]], Any] | None = getattr(self, "msg_" + msg["type"], None)
        if handler is None:
            self.reply_error("unknown_type", "unknown message type %r" % msg["type"][:40], msg.get("ref"))
            return None
        return self._guard(handler, msg)

    def admit(self) -> str | None:
        """Count one incoming message against the rate limit: ``"ok"``, another
        verdict (answer ``rate_limited``), or None when the client kept
        flooding and the connection is closed."""
        self.ctx.stats.messages_in += 1
        verdict = self.flood.check()
        if verdict == "flood":
            self.close(Close.POLICY, "too many messages; slow down")
            return None
        return verdict

    def msg_ping(self, msg: dict[str, Any]) -> None:
        """An application-level ping, on every endpoint, for clients that can't
        see protocol pongs (browsers)."""
        self.reply(msg, {"type": "pong"})

    def _guard(self, fn: Callable[..., Any], *args: Any) -> Awaitable[None] | None:
        """Run a handler; nothing escapes.  Coroutines run as tasks so one
        connection's messages pipeline, with at most ``max_inflight`` pending
        (past that, Tornado stops reading this socket until one finishes)."""
        ref = args[0].get("ref") if args and isinstance(args[0], dict) else None
        try:
            result = fn(*args)
        except Exception as e:
            self._fault(e, ref)
            return None
        if not inspect.isawaitable(result):
            return None
        task = asyncio.ensure_future(self._finish(result, ref))
        if self._tasks is None:
            self._tasks = set()
        self._tasks.add(task)
        self._inflight += 1
        task.add_done_callback(self._task_done)
        if self._inflight >= self.cfg.max_inflight:
            self._inflight_done = asyncio.Event()
            return self._inflight_done.wait()
        return None

    def _task_done(self, task: "asyncio.Task[Any]") -> None:
        if self._tasks is not None:
            self._tasks.discard(task)
        self._inflight -= 1
        if self._inflight_done is not None and self._inflight < self.cfg.max_inflight:
            self._inflight_done.set()
            self._inflight_done = None

    async def _finish(self, awaitable: Awaitable[Any], ref: Any) -> None:
        try:
            await awaitable
        except asyncio.CancelledError:
            pass
        except Exception as e:
            self._fault(e, ref)

    def _fault(self, e: Exception, ref: Any) -> None:
        if isinstance(e, ProtocolError):
            self.reply_error(e.code, e.message, ref)
            if e.close:
                self.close(e.close, e.message)
            return
        if isinstance(e, (tornado.websocket.WebSocketClosedError, StreamClosedError)):
            return
        log.exception("%s handler failed", self.app_name)
        self.reply_error("unavailable", "internal server error", ref)
        self.close(Close.SERVER_ERROR, "internal server error")

    # -- outgoing --------------------------------------------------------

    def send(self, obj: dict[str, Any]) -> None:
        """Encode and queue one message to this connection."""
        self.deliver(Outgoing(obj))

    def reply(self, msg: dict[str, Any], obj: dict[str, Any]) -> None:
        """Send ``obj`` as the answer to ``msg``: it carries ``msg``'s ``ref``, if any."""
        if "ref" in msg:
            obj["ref"] = msg["ref"]
        self.send(obj)

    def reply_error(self, code: str, message: str, ref: Any = None) -> None:
        """Send an ``error`` message (not ``send_error``: that is Tornado's HTTP error page)."""
        self.ctx.stats.error(code)
        self.send(error_message(code, message, ref))

    def buffered_bytes(self) -> int:
        """Bytes queued for this client and not yet taken by the kernel."""
        writer = self.rt.writer
        return self.rt.outq_bytes + (writer.sent - writer.done if writer is not None else 0)

    def deliver(self, out: Outgoing) -> None:
        """Queue an encoded message; never blocks, never raises.

        Past ``max_write_buffer`` unflushed bytes the connection is a slow
        consumer: see :meth:`on_backlog`.
        """
        rt = self.rt
        writer = rt.writer
        if rt.closing or writer is None or self.ws_connection is None:
            return
        # buffered_bytes(), inlined: this runs once per recipient per message.
        if rt.outq_bytes + writer.sent - writer.done > rt.cap:
            self.on_backlog(out)
            return
        self.enqueue(out)

    def enqueue(self, out: Outgoing) -> None:
        """Queue ``out`` for this iteration's flush, with no backlog check."""
        rt = self.rt
        assert rt.writer is not None
        fmt = rt.fmt
        if rt.writer.frames:
            data = out.frame if fmt.key == 0 else out.frame_for(fmt)
        else:
            data = out.packed if fmt.binary else out.data
        self._queue(data)

    def send_raw(self, payload: str | bytes) -> None:
        """Send one message as it is, text or binary (the echo endpoint), behind
        what is queued; the same backlog bound applies."""
        rt = self.rt
        writer = rt.writer
        if rt.closing or writer is None or self.ws_connection is None:
            return
        binary = not isinstance(payload, str)
        data: bytes = payload if binary else payload.encode("utf-8")  # type: ignore[assignment, union-attr]
        if rt.outq_bytes + writer.sent - writer.done > rt.cap:
            self.drop_slow_consumer()
            return
        if isinstance(writer, StreamWriter):
            opcode = OP_BINARY if binary else OP_TEXT
            deflater = rt.fmt.deflater
            self._queue(frame(deflater.compress(data), opcode, rsv1=True) if deflater else frame(data, opcode))
            return
        self._flush()  # what was queued goes first
        try:
            writer.write_one(data, binary)
        except (StreamClosedError, tornado.websocket.WebSocketClosedError):
            pass

    def _queue(self, data: bytes) -> None:
        rt = self.rt
        if rt.outq is None:
            rt.outq = [data]
            rt.ctx.flusher.mark(self)
        else:
            rt.outq.append(data)
        rt.outq_bytes += len(data)

    def on_backlog(self, out: Outgoing) -> None:
        """The client is not reading: close with 1013 (it reconnects and resumes)."""
        self.drop_slow_consumer()

    def drop_slow_consumer(self) -> None:
        """Close with 1013.  The close frame queues behind the backlog, which a stalled client may
        never read, so the TCP connection is dropped a second later instead of
        after Tornado's 5 s close timeout: its buffers are freed promptly."""
        self.ctx.stats.error("slow_consumer")
        stream = getattr(self.ws_connection, "stream", None)
        self.close(Close.TRY_AGAIN, "slow consumer: reconnect and resume")
        if stream is not None:
            asyncio.get_running_loop().call_later(1.0, stream.close)

    def _flush(self) -> None:
        rt = self.rt
        q = rt.outq
        n = rt.outq_bytes
        rt.outq = None
        rt.outq_bytes = 0
        writer = rt.writer
        if not q or rt.closing or writer is None:
            return
        ws = self.ws_connection
        if ws is None or ws.is_closing():
            return
        if writer.busy():
            # The kernel has not taken the previous write: park these frames
            # (they still count toward max_write_buffer) until it has, rather
            # than pay a failing send() per message for a client that stalls.
            rt.outq = q
            rt.outq_bytes = n
            writer.on_drain = self._drained
            return
        stats = rt.ctx.stats
        stats.messages_out += len(q)
        stats.bytes_out += n
        try:
            writer.write_batch(q)
        except (StreamClosedError, tornado.websocket.WebSocketClosedError):
            pass

    def _drained(self) -> None:
        if self.rt.outq and not self.rt.closing:
            self._flush()


def request_token(handler: tornado.web.RequestHandler) -> str | None:
    """The token a request presents: ``?token=`` or ``Authorization: Bearer``."""
    token = handler.get_query_argument("token", None)
    auth_header = handler.request.headers.get("Authorization", "")
    if not token and auth_header[:7].lower() == "bearer ":
        token = auth_header[7:].strip()
    return token or None


@tornado.web.stream_request_body
class JSONHandler(tornado.web.RequestHandler):
    """HTTP API base: JSON in and out, errors as ``{"error": code, "message": ...}``.

    Identity first, body second: :meth:`prepare` runs when the request head
    has arrived, before any body byte is read.  In token mode every route
    needs a valid token, as its WebSocket twin does (401 otherwise);
    ``public`` routes (health, metrics) need none.  A route takes the body
    its ``body_limits`` allow per method (see handlers/gate.py; none unless
    it says so)."""

    public = False
    body_limits: dict[str, int | str] = {}

    def initialize(self, ctx: Context) -> None:
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.user: Identity | None = None
        self._body = bytearray()

    def prepare(self) -> None:
        if self.public:
            return
        if self.ctx.auth.mode != "token":
            # A guest's session (the pages' cookie, or ?session=) says who reads
            # private rooms; without one the reader is anonymous (public data only).
            self.user = self.ctx.auth.from_session(self.get_query_argument("session", None)
                                                   or self.get_cookie(SESSION_COOKIE))
            return
        token = request_token(self)
        if token is None:
            self.unauthorized("a token is required (?token= or Authorization: Bearer)")
            return
        try:
            self.user = self.ctx.auth.verify_token(token)
        except AuthError as e:
            self.unauthorized(e.message)

    def unauthorized(self, message: str, realm: str = "realtime") -> None:
        self.set_header("WWW-Authenticate", 'Bearer realm="%s"' % realm)
        self.fail(401, "unauthorized", message)

    def data_received(self, chunk: bytes) -> None:
        # Bounded: the gate set this request's body limit before the first byte.
        self._body += chunk

    @property
    def body_bytes(self) -> bytes:
        return bytes(self._body)

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Cache-Control", "no-store")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ProtocolError):
            self.finish({"error": exc.code, "message": exc.message})
            return
        message = self._reason
        if isinstance(exc, tornado.web.HTTPError) and exc.log_message:
            message = exc.log_message % exc.args if exc.args else exc.log_message
        self.finish({"error": "http_%d" % status_code, "message": message})

    def fail(self, status: int, code: str, message: str) -> None:
        self.set_status(status)
        self.finish({"error": code, "message": message})

    def send_error(self, status_code: int = 500, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ProtocolError):
            status_code = STATUS_FOR_CODE.get(exc.code, 400)
        super().send_error(status_code, **kwargs)

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, ProtocolError):
            return  # a client fault, answered with its code; not a server error
        super().log_exception(typ, value, tb)

    def json_body(self) -> Any:
        """The request body as checked JSON (no NaN, Infinity, lone surrogates)."""
        return decode_value(self.body_bytes or b"null")


STATUS_FOR_CODE = {
    "bad_json": 400, "bad_msgpack": 400, "bad_message": 400, "unknown_type": 400, "too_large": 413,
    "rate_limited": 429, "forbidden": 403, "not_found": 404, "conflict": 409, "unavailable": 503,
}
