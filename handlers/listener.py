"""The listening side: what a client can hold before it has sent a request.

:class:`RealtimeHTTPServer` is Tornado's ``HTTPServer`` with

* a deadline on every request head (``--handshake_timeout``): a client that
  dribbles its headers, sends nothing, or never finishes a TLS handshake is
  disconnected when it passes, instead of after Tornado's default hour; the
  same deadline bounds each request body and an idle keep-alive connection;
* a cap on *half-open* connections per address (``--max_half_open_per_ip``):
  connections still waiting for a complete request head.  One more from
  that address is closed as soon as it is accepted.  (The cap on WebSocket
  connections, ``--max_connections_per_ip``, applies once a handshake
  arrives.);
* an accept loop that backs off when the process is out of file descriptors
  (EMFILE/ENFILE) instead of spinning on a listening socket that stays
  readable, and says so once per :data:`LOG_INTERVAL` rather than once per
  attempt;
* on a TLS port, Tornado's warning about each failed TLS handshake (a plain
  http:// client, a scanner) once per :data:`LOG_INTERVAL` and kind of failure,
  with the count of those left out (:class:`TLSHandshakeLog`).

:func:`raise_open_file_limit` lifts the soft ``RLIMIT_NOFILE`` to the hard
limit at start: every connection is a file descriptor.
"""

from __future__ import annotations

import errno
import logging
import resource
import socket
import time
from typing import Any, Awaitable, Callable, Iterable

import tornado.httpserver
import tornado.httputil
import tornado.iostream
from tornado.ioloop import IOLoop

from realtime.config import Config
from realtime.limits import ConnectionCounter

log = logging.getLogger("realtime.server")

LOG_INTERVAL = 10.0  # seconds between two warnings about the same condition
BACKOFF_MIN = 0.05
BACKOFF_MAX = 1.0
_OUT_OF_FILES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
# How many connections one readable event accepts at most (as Tornado's own loop).
_ACCEPT_BATCH = 128


class RateLimitedWarning:
    """A warning logged at most once per ``interval``; the rest are counted
    and reported with the next one."""

    def __init__(self, interval: float = LOG_INTERVAL, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self._last = -1e18
        self.suppressed = 0

    def __call__(self, fmt: str, *args: Any) -> bool:
        extra = self.due()
        if extra is None:
            return False
        log.warning(fmt + extra, *args)
        return True

    def due(self) -> str | None:
        """None when a line was reported less than ``interval`` ago (this one is
        counted as suppressed); else what to append to the line reported now:
        how many were suppressed since the last one ("" for none)."""
        now = self.clock()
        if now - self._last < self.interval:
            self.suppressed += 1
            return None
        self._last = now
        extra = " (%d more like this since the last report)" % self.suppressed if self.suppressed else ""
        self.suppressed = 0
        return extra


class TLSHandshakeLog(logging.Filter):
    """Throttles Tornado's ``SSL Error on <fd> <peer>: <error>`` warning.

    Tornado logs it for every TLS handshake that fails with an SSL error: each
    attempt of a plain-HTTP client on the TLS port, of a scanner, of a client
    with an old protocol version.  One client retrying in a loop is a log flood.
    This filter, on the ``tornado.general`` logger, lets one such line per kind
    of failure (the OpenSSL reason: ``HTTP_REQUEST``, ``WRONG_VERSION_NUMBER``
    ...) through per ``interval``, with the count of those it dropped since;
    kinds are told apart so that a flood of one does not hide another.  Every
    other record passes untouched.  ``failures`` counts them all (/metrics)."""

    PREFIX = "SSL Error on "
    MAX_KINDS = 32  # OpenSSL's reasons are a fixed set; past this, one throttle for the rest
    HINTS = {"HTTP_REQUEST": " (a plain http:// or ws:// client on the TLS port: it should use https:// or wss://)"}

    def __init__(self, interval: float = LOG_INTERVAL, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval = interval
        self.clock = clock
        self.kinds: dict[str, RateLimitedWarning] = {}
        self.failures = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not (isinstance(record.msg, str) and record.msg.startswith(self.PREFIX)):
            return True
        self.failures += 1
        args = record.args
        error = args[-1] if isinstance(args, tuple) and args else None
        kind = str(getattr(error, "reason", None) or type(error).__name__)
        if kind not in self.kinds and len(self.kinds) >= self.MAX_KINDS:
            kind = "other"
        throttle = self.kinds.get(kind)
        if throttle is None:
            throttle = self.kinds[kind] = RateLimitedWarning(self.interval, lambda: self.clock())
        extra = throttle.due()
        if extra is None:
            return False
        record.msg += self.HINTS.get(kind, "") + extra.replace("%", "%%")
        return True


#: The one filter for this process (the logger is process-wide too); see :func:`throttle_tls_handshake_log`.
TLS_HANDSHAKE_LOG = TLSHandshakeLog()


def throttle_tls_handshake_log() -> None:
    """Put :data:`TLS_HANDSHAKE_LOG` on Tornado's ``tornado.general`` logger (idempotent)."""
    logger = logging.getLogger("tornado.general")
    if TLS_HANDSHAKE_LOG not in logger.filters:
        logger.addFilter(TLS_HANDSHAKE_LOG)


def raise_open_file_limit() -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; returns (soft, hard) after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.warning("could not raise the open file limit from %d to %d: %s", soft, target, e)
    return soft, hard


class BackoffAcceptor:
    """Accepts connections on one listening socket, like
    ``tornado.netutil.add_accept_handler``, but pauses when accept() fails for
    lack of file descriptors (the socket stays readable, so retrying at once
    would spin), retrying after a delay that doubles up to
    :data:`BACKOFF_MAX`."""

    def __init__(self, sock: socket.socket, callback: Callable[[socket.socket, Any], None],
                 warn: RateLimitedWarning) -> None:
        self.sock = sock
        self.callback = callback
        self.warn = warn
        self.io_loop = IOLoop.current()
        self.delay = BACKOFF_MIN
        self.paused: Any = None  # the timeout handle while paused
        self.removed = False
        self.refused = 0  # accept() calls that failed for lack of files
        self.io_loop.add_handler(sock, self._on_readable, IOLoop.READ)

    def _on_readable(self, fd: Any, events: int) -> None:
        for _ in range(_ACCEPT_BATCH):
            if self.removed or self.paused is not None:
                return
            try:
                conn, address = self.sock.accept()
            except BlockingIOError:
                self.delay = BACKOFF_MIN
                return
            except ConnectionAbortedError:
                continue
            except OSError as e:
                if e.errno not in _OUT_OF_FILES:
                    raise
                self.refused += 1
                self._pause(e)
                return
            self.delay = BACKOFF_MIN
            self.callback(conn, address)

    def _pause(self, e: OSError) -> None:
        self.warn("cannot accept connections: %s (open file limit %d); retrying every %.2fs up to %.0fs",
                  e.strerror, resource.getrlimit(resource.RLIMIT_NOFILE)[0], self.delay, BACKOFF_MAX)
        self.io_loop.remove_handler(self.sock)
        self.paused = self.io_loop.call_later(self.delay, self._resume)
        self.delay = min(self.delay * 2, BACKOFF_MAX)

    def _resume(self) -> None:
        self.paused = None
        if not self.removed:
            self.io_loop.add_handler(self.sock, self._on_readable, IOLoop.READ)

    def remove(self) -> None:
        if self.removed:
            return
        self.removed = True
        if self.paused is not None:
            self.io_loop.remove_timeout(self.paused)
            self.paused = None
        else:
            self.io_loop.remove_handler(self.sock)


class _HeadWatch(tornado.httputil.HTTPMessageDelegate):
    """Forwards one request to the app; tells the server when its head arrived."""

    def __init__(self, inner: tornado.httputil.HTTPMessageDelegate, server: "RealtimeHTTPServer",
                 server_conn: Any) -> None:
        self.inner = inner
        self.server = server
        self.server_conn = server_conn

    def headers_received(self, start_line: Any, headers: tornado.httputil.HTTPHeaders) -> Awaitable[None] | None:
        self.server._head_arrived(self.server_conn)
        return self.inner.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        return self.inner.data_received(chunk)

    def finish(self) -> None:
        self.inner.finish()

    def on_connection_close(self) -> None:
        self.inner.on_connection_close()


class RealtimeHTTPServer(tornado.httpserver.HTTPServer):
    """``HTTPServer`` with a head deadline, half-open connections per address
    and an accept loop that survives running out of file descriptors.

    Built with :meth:`for_app`; otherwise takes HTTPServer's arguments plus
    ``max_half_open_per_ip``."""

    def initialize(self, request_callback: Any, *, max_half_open_per_ip: int = 0,  # type: ignore[override]
                   **kwargs: Any) -> None:
        super().initialize(request_callback, **kwargs)
        self.half_open = ConnectionCounter(max_half_open_per_ip)
        self._waiting: dict[Any, str] = {}  # server connection -> address, while its head is awaited
        self._accepted: dict[Any, str] = {}  # stream -> address, until its first request starts
        self._acceptors: list[BackoffAcceptor] = []
        self.refused_half_open = 0
        self._warn_half_open = RateLimitedWarning()
        self._warn_files = RateLimitedWarning()
        if self.ssl_options is not None:
            throttle_tls_handshake_log()

    @classmethod
    def for_app(cls, app: Any, cfg: Config, ssl_options: Any = None) -> "RealtimeHTTPServer":
        """The server for ``app`` with the limits from ``cfg``."""
        return cls(
            app,
            xheaders=cfg.xheaders,
            ssl_options=ssl_options,
            idle_connection_timeout=cfg.handshake_timeout,
            body_timeout=cfg.handshake_timeout,
            # Tornado drops a connection whose head passes this without an
            # answer; the app answers 431 from max_header_size up to it.
            max_header_size=8 * cfg.max_header_size,
            max_body_size=max(cfg.max_body_size, 4096),
            max_half_open_per_ip=cfg.max_half_open_per_ip,
        )

    # -- accepting -------------------------------------------------------

    def add_sockets(self, sockets: Iterable[socket.socket]) -> None:
        for sock in sockets:
            acceptor = BackoffAcceptor(sock, self._handle_connection, self._warn_files)
            self._acceptors.append(acceptor)
            self._sockets[sock.fileno()] = sock
            self._handlers[sock.fileno()] = acceptor.remove

    @property
    def accept_failures(self) -> int:
        """accept() calls that failed for lack of file descriptors."""
        return sum(a.refused for a in self._acceptors)

    def handle_stream(self, stream: tornado.iostream.IOStream, address: Any) -> None:
        ip = address[0] if isinstance(address, tuple) and address else str(address or "?")
        if not self.half_open.acquire(ip):
            self.refused_half_open += 1
            self._warn_half_open("closing a new connection from %s: %d connections from there have not "
                                 "sent a request yet (--max_half_open_per_ip)", ip, self.half_open.count(ip))
            stream.close()
            return
        self._accepted[stream] = ip
        super().handle_stream(stream, address)

    # -- half-open bookkeeping -------------------------------------------

    def start_request(self, server_conn: Any, request_conn: tornado.httputil.HTTPConnection,
                      ) -> tornado.httputil.HTTPMessageDelegate:
        stream = getattr(server_conn, "stream", None)
        ip = self._accepted.pop(stream, None)
        if ip is None:  # the next request of a keep-alive connection: waiting again
            context = getattr(server_conn, "context", None)
            address = getattr(context, "address", None)
            ip = address[0] if isinstance(address, tuple) and address else "?"
            self.half_open.add(ip)
        self._waiting[server_conn] = ip
        return _HeadWatch(super().start_request(server_conn, request_conn), self, server_conn)

    def _head_arrived(self, server_conn: Any) -> None:
        ip = self._waiting.pop(server_conn, None)
        if ip is not None:
            self.half_open.release(ip)

    def on_close(self, server_conn: Any) -> None:
        self._head_arrived(server_conn)
        super().on_close(server_conn)
