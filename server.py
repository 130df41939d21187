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
import signal
import sys
import time
import urllib.parse
from types import SimpleNamespace
from typing import Any

import tornado.httpserver
import tornado.ioloop
import tornado.log
import tornado.netutil
import tornado.web
from tornado.options import define, options, parse_command_line, parse_config_file

import handlers.api as api
import handlers.chat as chat_handlers
import handlers.echo as echo
import handlers.pages as pages
from handlers.writer import Flusher
from realtime.auth import Authenticator, load_or_create_secret
from realtime.backplane import make_backplane
from realtime.chat import CHAT_SCHEMA, ChatService
from realtime.context import Context
from realtime.hub import Hub
from realtime.limits import ConnectionCounter
from realtime.protocol import Close
from realtime.storage.sqlite import SQLiteStore


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
define("cookie_secret", default="", type=str, help="secret for signed sessions; default: generated once into data_dir/secret")
define("backplane", default="memory", type=str, help="fan-out between processes: 'memory' (one process; the only one in this version)")
define("xheaders", default=False, type=bool, help="trust X-Real-Ip / X-Forwarded-For (only behind a proxy you run)")
define("certfile", default="", type=str, help="TLS certificate (PEM) for https:// and wss://")
define("keyfile", default="", type=str, help="TLS private key (PEM)")
define("backlog", default=2048, type=int, help="listen backlog")
define("shutdown_grace", default=3.0, type=float, help="seconds to let sockets close on SIGTERM/SIGINT before exiting")
# Identity
define("auth", default="open", type=str, help="'open' (guests with names) or 'token' (JWT HS256 from ?token= or Authorization: Bearer)")
define("jwt_secret", default="", type=str, help="HS256 secret for token mode")
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
define("members_max", default=100, type=int, help="members listed in 'joined' and presence 'sync' (member_count is exact)")
define("presence_window", default=0.1, type=float, help="seconds over which presence changes are coalesced")
define("typing_interval", default=1.0, type=float, help="minimum seconds between relayed typing events per user and room")


def config_from_options(**overrides: Any) -> SimpleNamespace:
    """A plain namespace of every option, with ``overrides`` applied (for tests)."""
    values = dict(options.as_dict())
    unknown = set(overrides) - set(values)
    if unknown:
        raise TypeError("unknown options: %s" % ", ".join(sorted(unknown)))
    values.update(overrides)
    origins: list[str] = []
    for item in values["allowed_origins"] or []:
        origins.extend(o.strip() for o in item.split(",") if o.strip())
    values["allowed_origins"] = origins
    return SimpleNamespace(**values)


def _cookie_secret(cfg: SimpleNamespace) -> bytes:
    if cfg.cookie_secret:
        return cfg.cookie_secret.encode("utf-8")
    return load_or_create_secret(os.path.join(cfg.data_dir, "secret")).encode("ascii")


_SENSITIVE = {"token", "session", "key", "ingest_key", "access_token"}


def redact(uri: str) -> str:
    """A request URI with credentials in the query string replaced by ``***``."""
    path, sep, query = uri.partition("?")
    if not sep:
        return uri
    parts = urllib.parse.parse_qsl(query, keep_blank_values=True)
    safe = [(k, "***" if k.lower() in _SENSITIVE else v) for k, v in parts]
    return path + "?" + urllib.parse.urlencode(safe, safe="*")


def log_request(handler: tornado.web.RequestHandler) -> None:
    """Tornado's access log line, with tokens and sessions redacted."""
    status = handler.get_status()
    access = logging.getLogger("tornado.access")
    method = access.info if status < 400 else access.warning if status < 500 else access.error
    req = handler.request
    method("%d %s %s (%s) %.2fms", status, req.method, redact(req.uri or ""), req.remote_ip,
           1000.0 * req.request_time())


class RealtimeApplication(tornado.web.Application):
    ctx: Context

    async def start(self) -> None:
        """Open storage and the backplane; call before serving."""
        ctx = self.ctx
        schemas = [CHAT_SCHEMA] + [s for svc in ctx.services.values() for s in getattr(svc, "schemas", [])]
        await ctx.store.open(schemas)
        await ctx.hub.backplane.start()
        for svc in ctx.services.values():
            start = getattr(svc, "start", None)
            if start is not None:
                await start()

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
        await ctx.store.close()


def make_app(cfg: SimpleNamespace | None = None, **overrides: Any) -> RealtimeApplication:
    """Build the hub, store, services and handlers; nothing global."""
    if cfg is None:
        cfg = config_from_options(**overrides)
    elif overrides:
        cfg = SimpleNamespace(**{**vars(cfg), **overrides})
    os.makedirs(cfg.data_dir, exist_ok=True)
    store = SQLiteStore(os.path.join(cfg.data_dir, "realtime.sqlite3"), synchronous=cfg.sqlite_synchronous,
                        commit_delay=cfg.commit_delay)
    hub = Hub(make_backplane(cfg.backplane))
    auth = Authenticator(_cookie_secret(cfg), mode=cfg.auth, jwt_secret=cfg.jwt_secret)
    ctx = Context(cfg=cfg, hub=hub, store=store, auth=auth,
                  conn_limit=ConnectionCounter(cfg.max_connections_per_ip))
    ctx.flusher = Flusher()
    ctx.services["chat"] = ChatService(
        store, hub, history_size=cfg.history_size, history_keep=cfg.history_keep,
        max_text=cfg.max_text, max_rooms=cfg.max_rooms, members_max=cfg.members_max,
        presence_window=cfg.presence_window, typing_interval=cfg.typing_interval,
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


async def serve() -> None:
    cfg = config_from_options()
    app = make_app(cfg)
    await app.start()
    ssl_options = None
    if cfg.certfile:
        ssl_options = {"certfile": cfg.certfile, "keyfile": cfg.keyfile}
    sockets = tornado.netutil.bind_sockets(cfg.port, cfg.address or None, backlog=cfg.backlog)
    server = tornado.httpserver.HTTPServer(app, xheaders=cfg.xheaders, ssl_options=ssl_options)
    server.add_sockets(sockets)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    scheme = "https" if ssl_options else "http"
    host = cfg.address or "127.0.0.1"
    log.info("listening on %s://%s:%d/ (data in %s, backplane %s)", scheme, host, cfg.port,
                os.path.abspath(cfg.data_dir), cfg.backplane)
    await stop.wait()
    log.info("shutting down")
    server.stop()
    await app.shutdown(cfg.shutdown_grace)
    await server.close_all_connections()


def main(argv: list[str] | None = None) -> None:
    parse_options(argv)
    try:
        asyncio.run(serve())
    except (ValueError, OSError) as e:
        # A bad option value or a port in use: say so in one line, no traceback.
        logging.getLogger("realtime.server").error("cannot start: %s", e)
        sys.exit(2)


if __name__ == "__main__":
    main()
