"""The real-time server: chat, sensor streaming and collaborative editing.

    python server.py --port=8888                 # SQLite in ./data, in-process fan-out
    python server.py --config=conf/default.conf  # options from a file (command line wins)

This module parses options, builds the Application in :func:`make_app`, and
runs it; everything else lives in ``handlers/`` (thin Tornado adapters) and
``realtime/`` (the core).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import secrets
import signal
import sqlite3
import ssl
import sys
import time
from types import SimpleNamespace
from typing import Any

import tornado.httputil
import tornado.ioloop
import tornado.log
import tornado.netutil
import tornado.web
from tornado.options import define, options, parse_command_line, parse_config_file

import handlers.api as api
import handlers.chat as chat_handlers
import handlers.echo as echo
import handlers.pages as pages
import realtime.redact
from handlers.gate import HostPolicy, RequestGate, local_host_names
from handlers.listener import RealtimeHTTPServer, raise_open_file_limit
from handlers.pages import StaticFiles
from handlers.writer import Flusher
from realtime.auth import Authenticator, load_or_create_secret, load_public_keys
from realtime.backplane import make_backplane
from realtime.chat import ChatService
from realtime.context import Context
from realtime.hub import Hub
from realtime.limits import ConnectionCounter
from realtime.protocol import Close
from realtime.redact import redact_uri
from realtime.storage.sqlite import SQLiteStore
from realtime.storage.sqlite_repos import SQLiteStorage


def _load_plugins() -> list[Any]:
    """``register(ctx) -> routes`` of the apps present in handlers/ besides chat.

    Imported here, at import time, so their ``define()``d options exist before
    the command line and config file are parsed."""
    found = []
    for name in ("handlers.sensors", "handlers.editor"):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        found.append(module.register)
    return found


PLUGINS = _load_plugins()
VERSION = "0.1.0"
ROOT = os.path.dirname(os.path.abspath(__file__))
log = logging.getLogger("realtime.server")

# -- options -------------------------------------------------------------
# Server
define("port", default=8888, type=int, help="TCP port to listen on")
define("address", default="", type=str, help="address to bind ('' = all interfaces, 127.0.0.1 = this machine only)")
define("config", default="", type=str, help="path to a config file (tornado.options syntax); the command line wins")
define("data_dir", default="./data", type=str, help="where the SQLite database and the cookie secret live")
define("debug", default=False, type=bool, help="Tornado debug mode (autoreload, tracebacks in pages); never in production")
define("cookie_secret", default="", type=str, help="secret for signed sessions; default: generated once into data_dir/secret (or into Redis in cluster mode)")
define("backplane", default="memory", type=str, help="'memory' (one process, SQLite) or redis://host:port/db (cluster mode: fan-out, history and secrets in Redis)")
define("processes", default=1, type=int, help="worker processes sharing the port (0 = one per core); more than 1 needs a Redis backplane")
define("xheaders", default=False, type=bool, help="trust X-Real-Ip / X-Forwarded-For (only behind a proxy you run)")
define("certfile", default="", type=str, help="TLS certificate (PEM) for https:// and wss://")
define("keyfile", default="", type=str, help="TLS private key (PEM)")
define("backlog", default=2048, type=int, help="listen backlog")
define("shutdown_grace", default=3.0, type=float, help="seconds to let sockets close on SIGTERM/SIGINT before exiting")
# What a client can hold before it is authenticated
define("handshake_timeout", default=10.0, type=float, help="seconds a client has to send a whole request head (a WebSocket handshake; a TLS handshake first), and again its body; an idle keep-alive connection closes after as long")
define("max_half_open_per_ip", default=64, type=int, help="connections from one address that have not sent a whole request head yet; past this, new ones from there are closed at once (0 = no limit)")
define("max_header_size", default=16 * 1024, type=int, help="largest request head (request line and headers, tokens included) in bytes; bigger gets HTTP 431")
define("max_body_size", default=64 * 1024, type=int, help="largest request body in bytes, on the route that takes the biggest (POST /api/sensors/<id>/readings); bigger is refused with 413 before it is read")
define("allowed_hosts", default=[], type=str, multiple=True, help="Host names this server answers to, comma separated ('.example.com' = it and its subdomains, '*' = any); always: localhost, this machine's addresses and name, the hosts of allowed_origins")
# Identity
define("auth", default="open", type=str, help="'open' (guests with names) or 'token' (a JWT from ?token= or Authorization: Bearer, HS256 or RS256/ES256)")
define("jwt_secret", default="", type=str, help="HS256 secret(s) for token mode, comma separated: tokens under any are accepted (rotation; at least 32 random bytes each, shorter is warned about at start)")
define("jwt_public_key", default="", type=str, help="PEM file(s), comma separated, with the public keys or certificates of an identity provider: RS256 (RSA) or ES256 (EC P-256) tokens they sign are accepted")
define("jwt_audience", default="", type=str, help="if set, a token's 'aud' must name it (tokens an identity provider issued for other services are refused)")
define("jwt_issuer", default="", type=str, help="if set, a token's 'iss' must be exactly this")
define("token_refresh_window", default=60.0, type=float, help="seconds before a connection's token expires that it is sent token_expiring; one that does not send a refresh is closed with 4001 at exp")
define("max_token_lifetime", default=86400.0, type=float, help="seconds a token may still be valid when presented (exp - now); a token valid for longer is refused (0 = no limit)")
# Every socket
define("allowed_origins", default=[], type=str, multiple=True, help="browser origins allowed to connect, exact match, comma separated ('*' = any); default: same host only")
define("max_message_size", default=64 * 1024, type=int, help="largest client frame in bytes (bigger: close 1009)")
define("rate_limit", default=20.0, type=float, help="messages per second per connection (token bucket); 0 = no limit")
define("rate_burst", default=40.0, type=float, help="token bucket size: messages a client may send at once")
define("flood_strikes", default=20, type=int, help="rate_limited errors within one bucket period before close 1008")
define("max_connections_per_ip", default=200, type=int, help="open WebSocket connections per client address; 0 = no limit")
define("max_write_buffer", default=1024 * 1024, type=int, help="unflushed bytes per connection before it is a slow consumer")
define("max_inflight", default=32, type=int, help="messages per connection being processed at once before reading pauses")
define("ping_interval", default=20.0, type=float, help="seconds between WebSocket pings (0 = off)")
define("ping_timeout", default=20.0, type=float, help="close a connection whose pong is this late (seconds)")
define("websocket_compression", default=False, type=bool,
       help="accept permessage-deflate, without context takeover: each message is compressed once for all its recipients")
define("fast_path", default=True, type=bool,
       help="serve WebSockets with our own frames, built once per message (off: Tornado's protocol and write_message,"
            " which compresses per connection)")
# Storage
define("sqlite_synchronous", default="FULL", type=str, help="SQLite synchronous pragma: FULL (fsync every commit) or NORMAL")
define("commit_delay", default=0.0, type=float, help="seconds the writer waits after a write so that more share its commit (0 = commit at once)")
# Chat
define("history_size", default=50, type=int, help="messages a joining client gets without 'since'")
define("history_keep", default=1000, type=int, help="messages kept per room for resume and the HTTP API")
define("max_text", default=2000, type=int, help="longest chat message, in characters")
define("max_rooms", default=20, type=int, help="rooms one connection may be in at once")
define("max_rooms_total", default=10000, type=int, help="rooms the server stores; joining a new one past this is refused (too_large); rooms nothing was said in are removed when their last member leaves (0 = no limit)")
define("max_private_members", default=1000, type=int, help="members a private room may have (its member list is stored)")
define("members_max", default=100, type=int, help="members listed in 'joined' and presence 'sync' (member_count is exact)")
define("presence_window", default=0.1, type=float, help="seconds over which presence changes are coalesced")
define("presence_ttl", default=15.0, type=float, help="cluster mode: seconds after which the members of a node that stopped answering leave everyone's presence")
define("typing_interval", default=1.0, type=float, help="minimum seconds between relayed typing events per user and room")


def config_from_options(**overrides: Any) -> SimpleNamespace:
    """A plain namespace of every option, with ``overrides`` applied (for tests)."""
    values = dict(options.as_dict())
    unknown = set(overrides) - set(values)
    if unknown:
        raise TypeError("unknown options: %s" % ", ".join(sorted(unknown)))
    values.update(overrides)
    for name in ("allowed_origins", "allowed_hosts"):
        items: list[str] = []
        for item in values[name] or []:
            items.extend(o.strip() for o in item.split(",") if o.strip())
        values[name] = items
    return SimpleNamespace(**values)


def _secrets(cfg: SimpleNamespace) -> Any:
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


def make_app(cfg: SimpleNamespace | None = None, **overrides: Any) -> RealtimeApplication:
    """Build the hub, store, services and handlers; nothing global."""
    if cfg is None:
        cfg = config_from_options(**overrides)
    elif overrides:
        cfg = SimpleNamespace(**{**vars(cfg), **overrides})
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
                  conn_limit=ConnectionCounter(cfg.max_connections_per_ip))
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
    # Apps added by later modules register themselves here (sensors, editor).
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


def bind(cfg: SimpleNamespace) -> list[Any]:
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


def fork_workers(n: int) -> None:
    """Fork ``n`` workers and return in each of them.  The parent never
    returns: it restarts a worker that dies (a crash, ``kill -9``), forwards
    SIGTERM/SIGINT to every worker (each closes its sockets with 1001 and
    flushes), and exits 0 once they all have."""
    children: dict[int, int] = {}

    def spawn(i: int) -> bool:
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
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


def tls_context(cfg: SimpleNamespace) -> ssl.SSLContext | None:
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


def make_server(app: RealtimeApplication, ssl_options: ssl.SSLContext | None = None) -> RealtimeHTTPServer:
    """The HTTP server for ``app``, with the handshake deadline and connection limits."""
    return RealtimeHTTPServer.for_app(app, app.ctx.cfg, ssl_options)


async def serve(cfg: SimpleNamespace, sockets: list[Any], ssl_options: ssl.SSLContext | None = None) -> None:
    soft, _hard = raise_open_file_limit()
    app = make_app(cfg)
    await app.start()
    server = make_server(app, ssl_options)
    server.add_sockets(sockets)
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
