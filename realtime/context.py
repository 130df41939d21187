"""What ``make_app`` builds once and injects into every handler."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from realtime.auth import Authenticator
from realtime.hub import Hub
from realtime.limits import ConnectionCounter
from realtime.protocol import Formats
from realtime.storage.sqlite import SQLiteStore


@dataclass
class Stats:
    """Plain counters read by /healthz and /metrics (no locks on the hot path)."""

    connections_total: int = 0
    messages_in: int = 0
    messages_out: int = 0
    bytes_out: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    closes: dict[int, int] = field(default_factory=dict)
    handshakes_refused: dict[int, int] = field(default_factory=dict)

    def error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1

    def closed(self, code: int) -> None:
        self.closes[code] = self.closes.get(code, 0) + 1

    def refused(self, status: int) -> None:
        self.handshakes_refused[status] = self.handshakes_refused.get(status, 0) + 1


@dataclass
class Context:
    cfg: SimpleNamespace
    hub: Hub
    store: SQLiteStore
    auth: Authenticator
    conn_limit: ConnectionCounter
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
        # ctx.chat, ctx.feeds, ctx.docs: the app services, by name.
        services = self.__dict__.get("services")
        if services is not None and name in services:
            return services[name]
        raise AttributeError(name)
