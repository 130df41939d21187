"""Every server option, in one typed place.

:class:`Config` is what ``make_app`` builds the server from: one field per
option, with its type, default, help and section.  ``tornado.options`` stays
the parser (command line, then ``--config`` file, then the command line
again): :func:`define_options` defines one tornado option per field, and
:meth:`Config.from_options` reads the parsed values back into a ``Config``.
Tests build one directly: ``Config.from_options(options.as_dict(),
max_text=10)`` or ``make_app(max_text=10)``.

A new option is a field here (``name: type = option(SECTION, default, help)``), a
line in conf/default.conf or the matching conf/*.example, and a row in the
README table (``python scripts/update_readme.py``); tests/unit/test_conf.py
checks all three.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from realtime.feeds import DEFAULT_SIMULATED

# Sections: the README's options table and ``--help`` list the options by these.
SERVER = "server"
UNAUTHENTICATED = "before a client is authenticated"
IDENTITY = "identity"
SOCKETS = "every socket"
STORAGE = "storage"
CHAT = "chat"
SENSORS = "sensor streaming"
EDITING = "collaborative editing"

# The field annotations (strings: ``from __future__ import annotations``) as tornado.options types.
_TYPES: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool, "list[str]": str}


def option(section: str, default: Any, help: str) -> Any:
    """A :class:`Config` field: its section, default and help text (a list
    default: an option given several times, or comma separated)."""
    meta = {"help": help, "section": section}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True, slots=True)
class Config:
    """The server's options, typed (see the module docstring)."""

    # -- server
    port: int = option(SERVER, 8888, "TCP port to listen on")
    address: str = option(SERVER, "", "address to bind ('' = all interfaces, 127.0.0.1 = this machine only)")
    config: str = option(SERVER, "", "path to a config file (tornado.options syntax); the command line wins")
    data_dir: str = option(SERVER, "./data", "where the SQLite database and the cookie secret live")
    debug: bool = option(SERVER, False, "Tornado debug mode (autoreload, tracebacks in pages); never in production")
    cookie_secret: str = option(SERVER, "", "secret for signed sessions; default: generated once into data_dir/secret (or into Redis in cluster mode)")
    backplane: str = option(SERVER, "memory", "'memory' (one process, SQLite) or redis://host:port/db (cluster mode: fan-out, history and secrets in Redis)")
    processes: int = option(SERVER, 1, "worker processes sharing the port (0 = one per core); more than 1 needs a Redis backplane")
    xheaders: bool = option(SERVER, False, "trust X-Real-Ip / X-Forwarded-For (only behind a proxy you run)")
    certfile: str = option(SERVER, "", "TLS certificate (PEM) for https:// and wss://")
    keyfile: str = option(SERVER, "", "TLS private key (PEM)")
    backlog: int = option(SERVER, 2048, "listen backlog")
    shutdown_grace: float = option(SERVER, 3.0, "seconds to let sockets close on SIGTERM/SIGINT before exiting")
    gc_young: int = option(SERVER, 50000, "Python's cycle collector: net allocations between young collections (Python's own default is 700; 0 leaves it, and what startup made unfrozen); fewer objects promoted to the old generation, whose full collections pause the server for as long as it takes to scan every connection's objects")

    # -- before a client is authenticated
    handshake_timeout: float = option(UNAUTHENTICATED, 10.0, "seconds a client has to send a whole request head (a WebSocket handshake; a TLS handshake first), and again its body; an idle keep-alive connection closes after as long")
    max_half_open_per_ip: int = option(UNAUTHENTICATED, 64, "connections from one address that have not sent a whole request head yet; past this, new ones from there are closed at once (0 = no limit)")
    max_header_size: int = option(UNAUTHENTICATED, 16 * 1024, "largest request head (request line and headers, tokens included) in bytes; bigger gets HTTP 431")
    max_body_size: int = option(UNAUTHENTICATED, 64 * 1024, "largest request body in bytes, on the route that takes the biggest (POST /api/sensors/<id>/readings); bigger is refused with 413 before it is read")
    allowed_hosts: list[str] = option(UNAUTHENTICATED, [], "Host names this server answers to, comma separated ('.example.com' = it and its subdomains, '*' = any); always: localhost, this machine's addresses and name, the hosts of allowed_origins")

    # -- identity
    auth: str = option(IDENTITY, "open", "'open' (guests with names) or 'token' (a JWT from ?token= or Authorization: Bearer, HS256 or RS256/ES256)")
    jwt_secret: str = option(IDENTITY, "", "HS256 secret(s) for token mode, comma separated: tokens under any are accepted (rotation; at least 32 random bytes each, shorter is warned about at start)")
    jwt_public_key: str = option(IDENTITY, "", "PEM file(s), comma separated, with the public keys or certificates of an identity provider: RS256 (RSA) or ES256 (EC P-256) tokens they sign are accepted")
    jwt_audience: str = option(IDENTITY, "", "if set, a token's 'aud' must name it (tokens an identity provider issued for other services are refused)")
    jwt_issuer: str = option(IDENTITY, "", "if set, a token's 'iss' must be exactly this")
    token_refresh_window: float = option(IDENTITY, 60.0, "seconds before a connection's token expires that it is sent token_expiring; one that does not send a refresh is closed with 4001 at exp")
    max_token_lifetime: float = option(IDENTITY, 86400.0, "seconds a token may still be valid when presented (exp - now); a token valid for longer is refused (0 = no limit)")

    # -- every socket
    allowed_origins: list[str] = option(SOCKETS, [], "browser origins allowed to connect, exact match, comma separated ('*' = any); default: same host only")
    max_message_size: int = option(SOCKETS, 64 * 1024, "largest client frame in bytes (bigger: close 1009)")
    rate_limit: float = option(SOCKETS, 20.0, "messages per second per connection (token bucket); 0 = no limit")
    rate_burst: float = option(SOCKETS, 40.0, "token bucket size: messages a client may send at once")
    flood_strikes: int = option(SOCKETS, 20, "rate_limited errors within one bucket period before close 1008")
    max_connections_per_ip: int = option(SOCKETS, 200, "open WebSocket connections per client address; 0 = no limit")
    max_write_buffer: int = option(SOCKETS, 1024 * 1024, "unflushed bytes per connection before it is a slow consumer")
    max_inflight: int = option(SOCKETS, 32, "messages per connection being processed at once before reading pauses")
    ping_interval: float = option(SOCKETS, 20.0, "seconds between WebSocket pings (0 = off)")
    ping_timeout: float = option(SOCKETS, 20.0, "close a connection whose pong is this late (seconds)")
    websocket_compression: bool = option(SOCKETS, False, "accept permessage-deflate, without context takeover: each message is compressed once for all its recipients")
    fast_path: bool = option(SOCKETS, True, "serve WebSockets with our own frames, built once per message (off: Tornado's protocol and write_message, which compresses per connection)")

    # -- storage
    sqlite_synchronous: str = option(STORAGE, "FULL", "SQLite synchronous pragma: FULL (fsync every commit) or NORMAL")
    commit_delay: float = option(STORAGE, 0.0, "seconds the writer waits after a write so that more share its commit (0 = commit at once)")

    # -- chat
    history_size: int = option(CHAT, 50, "messages a joining client gets without 'since'")
    history_keep: int = option(CHAT, 1000, "messages kept per room for resume and the HTTP API")
    max_text: int = option(CHAT, 2000, "longest chat message, in characters")
    max_rooms: int = option(CHAT, 20, "rooms one connection may be in at once")
    max_rooms_total: int = option(CHAT, 10000, "rooms the server stores; joining a new one past this is refused (too_large); rooms nothing was said in are removed when their last member leaves (0 = no limit)")
    room_creates_per_minute: float = option(CHAT, 30.0, "rooms one client address (an IPv6 /64) may create per minute: joining a room that does not exist yet, create, a first direct message; joining an existing room is never counted; past it: rate_limited (0 = no limit; per node in cluster mode)")
    room_create_burst: float = option(CHAT, 60.0, "rooms one client address may create at once before room_creates_per_minute applies")
    max_private_members: int = option(CHAT, 1000, "members a private room may have (its member list is stored)")
    members_max: int = option(CHAT, 100, "members listed in 'joined' and presence 'sync' (member_count is exact)")
    presence_window: float = option(CHAT, 0.1, "seconds over which presence changes are coalesced")
    presence_ttl: float = option(CHAT, 15.0, "cluster mode: seconds after which the members of a node that stopped answering leave everyone's presence")
    typing_interval: float = option(CHAT, 1.0, "minimum seconds between relayed typing events per user and room")

    # -- sensor streaming
    sensor_window: float = option(SENSORS, 600.0, "seconds of readings kept per sensor (ring buffer and SQLite); also the longest backfill")
    sensor_max_points: int = option(SENSORS, 10000, "points kept per sensor at most, whatever its rate")
    simulated_sensors: str = option(SENSORS, DEFAULT_SIMULATED, "simulated sensors, one per line or ';'-separated: id= label= unit= hz= model=sine|walk|sawtooth|square plus the model's parameters; '' = none")
    host_metrics: bool = option(SENSORS, True, "publish this host's CPU %, memory %, load average and network bytes/s as sensors host.*")
    node_name: str = option(SENSORS, "", "cluster mode: this machine's name, for its host metrics (host.<name>.cpu ...); default: the hostname")
    host_metrics_hz: float = option(SENSORS, 1.0, "samples per second of the host metrics")
    ingest_key: str = option(SENSORS, "", "key devices present to publish readings (Authorization: Bearer, X-Ingest-Key or ?key=); '' = generated once into data_dir/ingest_key (or into Redis in cluster mode)")
    max_points_per_publish: int = option(SENSORS, 1000, "points one publish (WebSocket message or POST) may carry; more is refused with too_large")
    max_sensors: int = option(SENSORS, 1000, "device sensors this server holds at most")
    viewer_min_hz: float = option(SENSORS, 0.1, "slowest readings rate (messages/s) a viewer may ask for")
    viewer_max_hz: float = option(SENSORS, 20.0, "fastest readings rate (messages/s) a viewer may ask for; also the delivery tick rate")
    viewer_default_hz: float = option(SENSORS, 10.0, "readings rate of a viewer that does not ask for one")
    conflate_points: int = option(SENSORS, 100, "points per sensor in one readings message at most; beyond, evenly thinned, newest kept")
    max_subscriptions: int = option(SENSORS, 100, 'sensors one connection may name ("*" = all counts as one)')
    max_backfill_points: int = option(SENSORS, 2000, "points per sensor in one backfill message at most (evenly thinned over the span)")
    sensor_backlog_bytes: int = option(SENSORS, 256 * 1024, "unflushed bytes past which a viewer gets no new readings message; its readings conflate until it drains")
    ingest_max_future: float = option(SENSORS, 60.0, "seconds a reading's timestamp may be ahead of the server clock")
    sensor_expiry: float = option(SENSORS, 0.0, "remove a device sensor after this many seconds without readings (0 = keep until deleted)")

    # -- collaborative editing
    max_doc_size: int = option(EDITING, 200_000, "largest document, in code points (UTF-16 code units for a ?units=utf16 connection); an edit that would make it bigger is refused (too_large)")
    max_op_size: int = option(EDITING, 10_000, "most code points (UTF-16 code units for a ?units=utf16 connection) one edit may insert (too_large)")
    edit_rate: float = option(EDITING, 15.0, "edits per second per editor connection (token bucket; 0 = no limit); rate_limit applies as well")
    edit_burst: float = option(EDITING, 30.0, "edits an editor connection may send at once")
    doc_log_keep: int = option(EDITING, 1000, "ops kept per document, in memory and in the store, to merge late edits and catch up reconnecting clients")
    snapshot_every: int = option(EDITING, 200, "ops between stored snapshots of a document (bounds the replay when it is loaded)")
    max_docs: int = option(EDITING, 10_000, "documents the server stores; opening a new one past this is refused (0 = no limit)")
    doc_creates_per_minute: float = option(EDITING, 30.0, "documents one client address (an IPv6 /64) may create per minute; opening an existing one is never counted; past it: rate_limited, then close 1008 (0 = no limit; per node in cluster mode)")
    doc_create_burst: float = option(EDITING, 60.0, "documents one client address may create at once before doc_creates_per_minute applies")
    max_peers_per_doc: int = option(EDITING, 100, "connections one document takes at once; more are closed with 1013")
    doc_idle_seconds: float = option(EDITING, 30.0, "a document leaves memory this long after its last editor left (a snapshot is written)")
    doc_commit_delay: float = option(EDITING, 0.002, "seconds between a document's writes: edits arriving meanwhile share one commit and one broadcast burst (0 = write at once)")
    doc_leader_ttl: float = option(EDITING, 3.0, "cluster mode: one node (the holder of a lease in Redis) orders each document's edits and the others forward theirs to it; another node takes over this many seconds after the leader stopped renewing (0 = no leader: every node appends, racing for each revision)")
    cursor_interval: float = option(EDITING, 0.05, "minimum seconds between relayed cursor updates per connection; a newer one replaces the waiting one")

    @classmethod
    def from_options(cls, values: Mapping[str, Any], **overrides: Any) -> "Config":
        """A Config from parsed option ``values`` (e.g. ``tornado.options.options.as_dict()``),
        with ``overrides`` on top; an unknown override name is a TypeError.  Options that
        take lists accept comma-separated items ("a, b") as well."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(overrides) - names
        if unknown:
            raise TypeError("unknown options: %s" % ", ".join(sorted(unknown)))
        merged = {name: values[name] for name in names if name in values}
        merged.update(overrides)
        for f in dataclasses.fields(cls):
            if f.type == "list[str]" and f.name in merged:
                merged[f.name] = split_items(merged[f.name])
        return cls(**merged)

    def replace(self, **overrides: Any) -> "Config":
        """A copy with ``overrides`` (checked like :meth:`from_options`)."""
        return Config.from_options(dataclasses.asdict(self), **overrides)


def split_items(items: Any) -> list[str]:
    """``["a, b", "c"]`` -> ``["a", "b", "c"]``."""
    out: list[str] = []
    for item in items or []:
        out.extend(s.strip() for s in str(item).split(",") if s.strip())
    return out


def define_options(options: Any = None) -> None:
    """Define one ``tornado.options`` option per :class:`Config` field (on
    ``options``, the global ``tornado.options.options`` by default), grouped by
    section.  Call once, before parsing."""
    if options is None:
        from tornado.options import options
    for f in dataclasses.fields(Config):
        multiple = f.type == "list[str]"
        factory = f.default_factory
        default = factory() if callable(factory) else f.default
        options.define(f.name, default=default, type=_TYPES[str(f.type)], help=f.metadata["help"], multiple=multiple,
                       group=f.metadata["section"])
