"""The real-time server: chat, sensor streaming and collaborative editing.

    python server.py --port=8888                 # SQLite in ./data, in-process fan-out
    python server.py --config=conf/default.conf  # options from a file (command line wins)

This module parses options, builds the Application in :func:`make_app`, and
runs it; everything else lives in ``handlers/`` (thin Tornado adapters) and
``realtime/`` (the core).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import secrets
import signal
import sqlite3
import ssl
import sys
import time
from typing import Any

import tornado.httputil
import tornado.ioloop
import tornado.log
import tornado.netutil
import tornado.web
from tornado.options import options, parse_command_line, parse_config_file

import handlers.api as api
import handlers.chat as chat_handlers
import handlers.echo as echo
import handlers.editing as editing_handlers
import handlers.pages as pages
import handlers.sensors as sensor_handlers
import realtime.redact
from handlers.gate import HostPolicy, RequestGate, local_host_names
from handlers.listener import RealtimeHTTPServer, raise_open_file_limit
from handlers.pages import StaticFiles
from handlers.writer import Flusher
from realtime.auth import Authenticator, load_or_create_secret, load_public_keys
from realtime.backplane import make_backplane
from realtime.chat import ChatService
from realtime.config import Config, define_options
from realtime.context import Context
from realtime.hub import Hub
from realtime.limits import ConnectionCounter, PerAddressBudget
from realtime.protocol import Close
from realtime.redact import redact_uri
from realtime.storage.sqlite import SQLiteStore
from realtime.storage.sqlite_repos import SQLiteStorage

# The apps besides chat: ``register(ctx) -> routes`` builds each one's service.
PLUGINS = [sensor_handlers.register, editing_handlers.register]
VERSION = "0.1.0"
ROOT = os.path.dirname(os.path.abspath(__file__))
log = logging.getLogger("realtime.server")

define_options()  # every option, typed, in realtime/config.py


def config_from_options(**overrides: Any) -> Config:
    """The parsed options as a :class:`~realtime.config.Config`, with ``overrides`` applied (for tests)."""
    return Config.from_options(options.as_dict(), **overrides)


def _secrets(cfg: Config) -> Any:
    """``secret(name)``: a generated secret, the same for every node of a
    cluster (kept in Redis) or for every restart of one process (a file in
    data_dir)."""
    if cfg.backplane.startswith(("redis://", "rediss://", "unix://")):
        from realtime.storage.redis_repos import shared_secret

        return lambda name: shared_secret(cfg.backplane, name, lambda: secrets.token_urlsafe(32))
    files = {"cookie": "secret"}

    def from_file(name: str) -> str:
        return load_or_create_secret(os.path.join(cfg.data_dir, files.get(name) or name))

    return from_file


def log_request(handler: tornado.web.RequestHandler) -> None:
    """Tornado's access log line, with tokens and sessions redacted."""
    status = handler.get_status()
    access = logging.getLogger("tornado.access")
    method = access.info if status < 400 else access.warning if status < 500 else access.error
    req = handler.request
    method("%d %s %s (%s) %.2fms", status, req.method, redact_uri(req.uri or ""), req.remote_ip,
           1000.0 * req.request_time())


class StartupError(Exception):
    """The server cannot start; the message says why, in one line."""


class RealtimeApplication(tornado.web.Application):
    ctx: Context
    hosts: HostPolicy

    def get_handler_delegate(self, request: tornado.httputil.HTTPServerRequest, target_class: type[Any],
                             target_kwargs: dict[str, Any] | None = None, path_args: list[bytes] | None = None,
                             path_kwargs: dict[str, bytes] | None = None) -> Any:
        """Every request passes the gate (head size, Host, body size) first."""
        inner = super().get_handler_delegate(request, target_class, target_kwargs, path_args, path_kwargs)
        return RequestGate(inner, request, target_class, self.ctx.cfg, self.hosts, self.ctx.stats.request_refused)

    async def start(self) -> None:
        """Open storage and the backplane; call before serving.  A database
        that cannot be opened or written is a :class:`StartupError`."""
        ctx = self.ctx
        try:
            await ctx.storage.open()
            await ctx.hub.backplane.start()
            for svc in ctx.services.values():
                start = getattr(svc, "start", None)
                if start is not None:
                    await start()
        except sqlite3.Error as e:
            raise StartupError("database %s: %s (is it a SQLite file this user may write?)"
                               % (ctx.store.path, e)) from None

    async def shutdown(self, grace: float = 3.0) -> None:
        """Close every socket with 1001, stop the services, flush storage."""
        ctx = self.ctx
        if ctx.shutting_down:
            return
        ctx.shutting_down = True
        for conn in list(ctx.connections):
            conn.close(Close.GOING_AWAY, "server shutting down; reconnect")
        deadline = time.monotonic() + grace
        while ctx.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for svc in ctx.services.values():
            stop = getattr(svc, "stop", None)
            if stop is not None:
                await stop()
        await ctx.hub.backplane.close()
        await ctx.storage.close()


def make_app(cfg: Config | None = None, **overrides: Any) -> RealtimeApplication:
    """Build the hub, store, services and handlers; nothing global."""
    if cfg is None:
        cfg = config_from_options(**overrides)
    elif overrides:
        cfg = cfg.replace(**overrides)
    os.makedirs(cfg.data_dir, exist_ok=True)
    store = SQLiteStore(os.path.join(cfg.data_dir, "realtime.sqlite3"), synchronous=cfg.sqlite_synchronous,
                        commit_delay=cfg.commit_delay)
    backplane = make_backplane(cfg.backplane)
    hub = Hub(backplane)
    realtime.redact.install()
    secret = _secrets(cfg)
    cookie_secret = cfg.cookie_secret or secret("cookie")
    auth = Authenticator(cookie_secret.encode("utf-8"), mode=cfg.auth, jwt_secret=cfg.jwt_secret,
                         max_token_lifetime=cfg.max_token_lifetime,
                         jwt_public_keys=load_public_keys(cfg.jwt_public_key) if cfg.jwt_public_key else None,
                         audience=cfg.jwt_audience, issuer=cfg.jwt_issuer)
    storage: Any = SQLiteStorage(store)
    if backplane.name == "redis":
        from realtime.storage.redis_repos import RedisStorage

        storage = RedisStorage(backplane)
    ctx = Context(cfg=cfg, hub=hub, store=store, storage=storage, secret=secret, auth=auth,
                  conn_limit=ConnectionCounter(cfg.max_connections_per_ip),
                  room_creations=PerAddressBudget(cfg.room_creates_per_minute, cfg.room_create_burst),
                  doc_creations=PerAddressBudget(cfg.doc_creates_per_minute, cfg.doc_create_burst))
    ctx.flusher = Flusher()
    ctx.services["chat"] = ChatService(
        ctx.storage.chat_log(keep=max(cfg.history_keep, cfg.history_size), topic=ChatService.topic), hub, history_size=cfg.history_size, history_keep=cfg.history_keep,
        max_text=cfg.max_text, max_rooms=cfg.max_rooms, members_max=cfg.members_max,
        presence_window=cfg.presence_window, typing_interval=cfg.typing_interval,
        presence_store=storage.presence_store(), node_id=getattr(backplane, "node_id", ""),
        presence_ttl=cfg.presence_ttl,
        max_rooms_total=cfg.max_rooms_total, max_private_members=cfg.max_private_members,
    )
    extra_routes: list[Any] = []
    # Apps added by later modules register themselves here (sensors, editing).
    for register in PLUGINS:
        extra_routes.extend(register(ctx))
    kw = {"ctx": ctx}
    routes: list[Any] = [
        (r"/", pages.IndexPage, kw),
        (r"/chat", pages.ChatPage, kw),
        (r"/ws/chat", chat_handlers.ChatSocketHandler, kw),
        (r"/ws/echo", echo.EchoSocketHandler, kw),
        (r"/api/rooms", api.RoomsAPI, kw),
        (r"/api/rooms/([^/]+)/messages", api.RoomMessagesAPI, kw),
        (r"/healthz", api.HealthHandler, kw),
        (r"/metrics", api.MetricsHandler, kw),
        *extra_routes,
    ]
    app = RealtimeApplication(
        routes,
        template_path=os.path.join(ROOT, "templates"),
        static_path=os.path.join(ROOT, "static"),
        static_handler_class=StaticFiles,
        cookie_secret=auth.signer._secret.decode("utf-8", "replace"),
        xsrf_cookies=False,
        debug=cfg.debug,
        websocket_ping_interval=cfg.ping_interval or None,
        websocket_ping_timeout=cfg.ping_timeout or None,
        websocket_max_message_size=cfg.max_message_size,
        log_function=log_request,
        default_handler_class=pages.NotFoundPage,
        default_handler_args=kw,
    )
    app.ctx = ctx
    app.hosts = HostPolicy(cfg.allowed_hosts, local_host_names(cfg.address, cfg.allowed_origins))
    return app


def parse_options(argv: list[str] | None = None) -> None:
    """Command line first (to find --config), then the file, then the command
    line again so it wins over the file."""
    argv = list(sys.argv if argv is None else argv)
    parse_command_line(argv, final=False)
    if options.config:
        parse_config_file(options.config, final=False)
        parse_command_line(argv, final=False)
    options.run_parse_callbacks()


def bind(cfg: Config) -> list[Any]:
    """The listening sockets; with ``--processes`` other than 1, fork the workers
    here (before any event loop exists), each serving the same sockets."""
    is_redis = cfg.backplane.startswith(("redis://", "rediss://", "unix://"))
    if cfg.processes != 1 and not is_redis:
        raise ValueError("--processes=%d needs a shared backplane: add --backplane=redis://host:6379/0 "
                         "(with the memory backplane each process would be a separate server)" % cfg.processes)
    sockets = tornado.netutil.bind_sockets(cfg.port, cfg.address or None, backlog=cfg.backlog)
    if cfg.processes != 1:
        fork_workers(cfg.processes or os.cpu_count() or 1)
    return sockets


def die_with_parent(parent: int) -> None:
    """A worker whose parent is gone (``kill -9`` of it, which no handler
    sees) gets SIGTERM and stops as on a rolling restart, instead of serving
    on unsupervised: Linux's PR_SET_PDEATHSIG; elsewhere nothing changes."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(signal.SIGTERM), 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def fork_workers(n: int) -> None:
    """Fork ``n`` workers and return in each of them.  The parent never
    returns: it restarts a worker that dies (a crash, ``kill -9``), forwards
    SIGTERM/SIGINT to every worker (each closes its sockets with 1001 and
    flushes), and exits 0 once they all have.  A parent killed with -9 takes
    its workers with it (each gets SIGTERM)."""
    children: dict[int, int] = {}
    parent = os.getpid()

    def spawn(i: int) -> bool:
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            die_with_parent(parent)
            return True
        children[pid] = i
        return False

    for i in range(n):
        if spawn(i):
            return
    stopping = False

    def forward(sig: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    log.info("started %d workers: %s", n, " ".join(map(str, children)))
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        i = children.pop(pid, -1)
        if i < 0:
            continue
        code = os.waitstatus_to_exitcode(status)
        if not stopping and code != 0:
            log.warning("worker %d (pid %d) exited with %d; starting another", i, pid, code)
            time.sleep(0.5)
            if spawn(i):
                return
    sys.exit(0)


def tls_context(cfg: Config) -> ssl.SSLContext | None:
    """The TLS context for ``--certfile``/``--keyfile``, checked now: a
    mismatched or swapped pair would otherwise fail every handshake later."""
    if not cfg.certfile:
        if cfg.keyfile:
            raise StartupError("--keyfile is set but --certfile is not")
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cfg.certfile, cfg.keyfile or None)
    except (ssl.SSLError, OSError) as e:
        raise StartupError("cannot load --certfile=%s --keyfile=%s: %s (the certificate first, then its own "
                           "private key)" % (cfg.certfile, cfg.keyfile, e)) from None
    return context


def tune_gc(young: int) -> None:
    """Python's cycle collector, for a server that holds many connections.

    A full collection scans every tracked object (a few hundred per open
    connection): with a few thousand connections that is a pause of 100-200 ms
    on a small machine, and Python starts one whenever enough objects have
    survived into the old generation.  With a young threshold of ``young``
    instead of 700 the objects of a message in flight (its futures, its frames
    across an await) die young and are not promoted, so full collections come
    seldom; what startup made (modules, the application) is frozen, never
    scanned again.  ``young`` <= 0 leaves Python's defaults."""
    if young <= 0:
        return
    gc.collect()
    gc.freeze()
    gc.set_threshold(young, 20, 20)


def make_server(app: RealtimeApplication, ssl_options: ssl.SSLContext | None = None) -> RealtimeHTTPServer:
    """The HTTP server for ``app``, with the handshake deadline and connection limits."""
    return RealtimeHTTPServer.for_app(app, app.ctx.cfg, ssl_options)


async def serve(cfg: Config, sockets: list[Any], ssl_options: ssl.SSLContext | None = None) -> None:
    soft, _hard = raise_open_file_limit()
    app = make_app(cfg)
    await app.start()
    server = make_server(app, ssl_options)
    server.add_sockets(sockets)
    tune_gc(cfg.gc_young)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    scheme = "https" if ssl_options else "http"
    host = cfg.address or "127.0.0.1"
    log.info("listening on %s://%s:%d/ (data in %s, backplane %s, open file limit %d)", scheme, host, cfg.port,
             os.path.abspath(cfg.data_dir), cfg.backplane, soft)
    await stop.wait()
    log.info("shutting down")
    server.stop()
    await app.shutdown(cfg.shutdown_grace)
    await server.close_all_connections()


def main(argv: list[str] | None = None) -> None:
    parse_options(argv)
    try:
        cfg = config_from_options()
        ssl_options = tls_context(cfg)
        sockets = bind(cfg)
        asyncio.run(serve(cfg, sockets, ssl_options))
    except (ValueError, OSError, StartupError) as e:
        # A bad option value, a port in use, Redis unreachable, an unusable
        # database or TLS pair: say so in one line, no traceback.
        logging.getLogger("realtime.server").error("cannot start: %s", e)
        sys.exit(2)


if __name__ == "__main__":
    main()
