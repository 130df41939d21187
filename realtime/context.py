"""What ``make_app`` builds once and injects into every handler."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from realtime.auth import Authenticator
from realtime.config import Config
from realtime.hub import Hub
from realtime.limits import ConnectionCounter, PerAddressBudget
from realtime.protocol import Formats
from realtime.storage.sqlite import SQLiteStore
from realtime.storage.sqlite_repos import SQLiteStorage

# The close codes RFC 6455 defines (1004 is reserved) and the ones this server sends.
METRIC_CLOSE_CODES = frozenset({1000, 1001, 1002, 1003, 1005, 1006, 1007, 1008, 1009, 1010, 1011, 1012, 1013,
                                1014, 1015, 4001, 4003})


@dataclass
class Stats:
    """Plain counters read by /healthz and /metrics (no locks on the hot path)."""

    connections_total: int = 0
    messages_in: int = 0
    messages_out: int = 0
    bytes_out: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    closes: dict[int | str, int] = field(default_factory=dict)
    handshakes_refused: dict[int, int] = field(default_factory=dict)
    requests_refused: dict[int, int] = field(default_factory=dict)

    def error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1

    def closed(self, code: int) -> None:
        """Counted by code; a code outside :data:`METRIC_CLOSE_CODES` (a
        client may send any number) counts as ``other``, so that clients
        cannot add series to /metrics."""
        key: int | str = code if code in METRIC_CLOSE_CODES else "other"
        self.closes[key] = self.closes.get(key, 0) + 1

    def refused(self, status: int) -> None:
        self.handshakes_refused[status] = self.handshakes_refused.get(status, 0) + 1

    def request_refused(self, status: int) -> None:
        self.requests_refused[status] = self.requests_refused.get(status, 0) + 1


@dataclass
class Context:
    cfg: Config
    hub: Hub
    store: SQLiteStore
    storage: SQLiteStorage  # hands each app its repository (or RedisStorage in cluster mode)
    secret: Callable[[str], str]  # generated secrets, shared by every node
    auth: Authenticator
    conn_limit: ConnectionCounter
    room_creations: PerAddressBudget  # --room_creates_per_minute, charged by the chat socket
    doc_creations: PerAddressBudget  # --doc_creates_per_minute, charged by the editor socket
    services: dict[str, Any] = field(default_factory=dict)
    connections: set[Any] = field(default_factory=set)
    stats: Stats = field(default_factory=Stats)
    started: float = field(default_factory=time.time)
    shutting_down: bool = False
    flusher: Any = None  # handlers.writer.Flusher, set by make_app
    formats: Formats = field(default_factory=Formats)  # wire formats and their compressors
    wire_params: Any = None  # handlers.websocket.WireParams, made by the first connection
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    def next_id(self) -> int:
        return next(self._ids)

    def __getattr__(self, name: str) -> Any:
        # ctx.chat, ctx.sensors, ctx.editing: the app services, by name.
        services = self.__dict__.get("services")
        if services is not None and name in services:
            return services[name]
        raise AttributeError(name)
