"""HTTP API: chat history, health, metrics."""

from __future__ import annotations

import os
import time
from typing import Any, Iterator

import psutil
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from handlers.base import JSONHandler
from handlers.listener import TLS_HANDSHAKE_LOG
from realtime.chat import valid_room
from realtime.protocol import ProtocolError


def _int_arg(handler: JSONHandler, name: str, default: int | None, lo: int, hi: int) -> int | None:
    raw = handler.get_query_argument(name, None)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ProtocolError("bad_message", "'%s' must be an integer" % name)
    if not lo <= value <= hi:
        raise ProtocolError("bad_message", "'%s' must be between %d and %d" % (name, lo, hi))
    return value


class RoomsAPI(JSONHandler):
    """``GET /api/rooms``: the rooms this user may read (public ones without an identity)."""

    async def get(self) -> None:
        self.finish({"rooms": await self.ctx.chat.room_list(self.user)})


class RoomMessagesAPI(JSONHandler):
    """``GET /api/rooms/<room>/messages?since=&limit=``"""

    async def get(self, room: str) -> None:
        if not valid_room(room):
            raise ProtocolError("bad_message", "room names are 1-64 letters, digits, '_', '.' or '-'")
        since = _int_arg(self, "since", None, 0, 2**62)
        limit = _int_arg(self, "limit", 100, 1, 1000)
        assert limit is not None
        self.finish(await self.ctx.chat.messages_since(room, since, limit, self.user))


class HealthHandler(JSONHandler):
    public = True  # for load balancers; says nothing about users or data

    def head(self) -> None:
        self.get()

    def get(self) -> None:
        """503 while shutting down, while the backplane is unreachable, and
        while writes to the store fail (disk full, I/O error): ``reason`` says which."""
        ctx = self.ctx
        backplane_ok = getattr(ctx.hub.backplane, "healthy", True)
        write_error = getattr(ctx.storage, "degraded", None)
        healthy = not ctx.shutting_down and backplane_ok and write_error is None
        if not healthy:
            self.set_status(503)
        reason = {}
        if not healthy and not ctx.shutting_down:
            reason = {"reason": getattr(ctx.hub.backplane, "reason", "") if not backplane_ok
                      else "writes to the store fail: %s" % write_error}
        self.finish({
            "status": "ok" if healthy else ("shutting_down" if ctx.shutting_down else "degraded"),
            "connections": len(ctx.connections),
            "uptime": round(time.time() - ctx.started, 3),
            "backplane": getattr(ctx.hub.backplane, "name", "memory"),
            **({"node": ctx.hub.backplane.node_id} if hasattr(ctx.hub.backplane, "node_id") else {}),
            **reason,
            "store": {"pending_writes": ctx.store.pending, "commits": ctx.store.commits,
                      "write_error": write_error},
        })


class _Collector:
    """Reads the plain counters at scrape time: nothing on the hot path."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.proc = psutil.Process(os.getpid())

    def collect(self) -> Iterator[Any]:
        ctx, st = self.ctx, self.ctx.stats
        yield GaugeMetricFamily("realtime_connections", "Open WebSocket connections", len(ctx.connections))
        yield CounterMetricFamily("realtime_connections_opened", "WebSocket connections opened",
                                  st.connections_total)
        yield CounterMetricFamily("realtime_messages_received", "Client messages received", st.messages_in)
        yield CounterMetricFamily("realtime_frames_sent", "Messages written to clients", st.messages_out)
        yield CounterMetricFamily("realtime_bytes_sent", "Payload bytes written to clients", st.bytes_out)
        yield CounterMetricFamily("realtime_hub_deliveries", "Messages handed to subscribers", ctx.hub.delivered)
        yield GaugeMetricFamily("realtime_hub_topics", "Topics with local subscribers", ctx.hub.topics)
        errors = CounterMetricFamily("realtime_errors", "Error messages sent, by code", labels=["code"])
        for code, n in sorted(st.errors.items()):
            errors.add_metric([code], n)
        yield errors
        closes = CounterMetricFamily("realtime_closes", "Connections closed, by close code", labels=["code"])
        for code, n in sorted(st.closes.items(), key=lambda kv: str(kv[0])):
            closes.add_metric([str(code)], n)
        yield closes
        refused = CounterMetricFamily("realtime_handshakes_refused", "Handshakes refused, by HTTP status",
                                      labels=["status"])
        for status, n in sorted(st.handshakes_refused.items()):
            refused.add_metric([str(status)], n)
        yield refused
        gate = CounterMetricFamily("realtime_requests_refused", "HTTP requests refused before their handler"
                                   " (head too large, host not allowed, body too large), by status",
                                   labels=["status"])
        for status, n in sorted(st.requests_refused.items()):
            gate.add_metric([str(status)], n)
        yield gate
        refused_creations = CounterMetricFamily(
            "realtime_creations_refused", "Rooms and documents not created: the client address was over its"
            " budget (--room_creates_per_minute, --doc_creates_per_minute)", labels=["what"])
        refused_creations.add_metric(["room"], ctx.room_creations.refused)
        refused_creations.add_metric(["document"], ctx.doc_creations.refused)
        yield refused_creations
        yield GaugeMetricFamily("realtime_creation_budgets", "Client addresses with a creation budget in use"
                                " (rooms and documents)", len(ctx.room_creations) + len(ctx.doc_creations))
        yield CounterMetricFamily("realtime_tls_handshake_errors", "TLS handshakes that failed with an SSL error"
                                  " (plain HTTP on the TLS port, an old protocol version); logged once per 10 s"
                                  " and kind", TLS_HANDSHAKE_LOG.failures)
        yield CounterMetricFamily("realtime_store_commits", "SQLite transactions committed", ctx.store.commits)
        yield CounterMetricFamily("realtime_store_writes", "Writes committed", ctx.store.writes)
        yield GaugeMetricFamily("realtime_store_pending", "Writes waiting for commit", ctx.store.pending)
        yield CounterMetricFamily("realtime_chat_messages_stored", "Chat messages stored",
                                  ctx.chat.messages_stored)
        yield CounterMetricFamily("realtime_chat_gaps_filled", "Times a room's missing seqs were read from the log",
                                  ctx.chat.gaps_filled)
        bp = ctx.hub.backplane
        yield GaugeMetricFamily("realtime_backplane_up", "1 while the backplane is reachable",
                                1 if getattr(bp, "healthy", True) else 0)
        for name, help_text in (("published", "Envelopes sent to the other nodes"),
                                ("received", "Envelopes received from the other nodes"),
                                ("resyncs", "Times the backplane reconnected and resubscribed")):
            if hasattr(bp, name):
                yield CounterMetricFamily("realtime_backplane_" + name, help_text, getattr(bp, name))
        for svc in ctx.services.values():
            metrics = getattr(svc, "metrics", None)
            if metrics is not None:
                yield from metrics()
        mem = self.proc.memory_info()
        yield GaugeMetricFamily("realtime_process_rss_bytes", "Resident memory", mem.rss)
        cpu = self.proc.cpu_times()
        yield CounterMetricFamily("realtime_process_cpu_seconds", "CPU time (user+system)", cpu.user + cpu.system)


class MetricsHandler(JSONHandler):
    """Prometheus text format (restrict it in the proxy if it should not be public)."""

    public = True

    def initialize(self, ctx: Any) -> None:  # type: ignore[override]
        super().initialize(ctx)
        registry = getattr(ctx, "_metrics_registry", None)
        if registry is None:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(_Collector(ctx))
            ctx.__dict__["_metrics_registry"] = registry
        self.registry = registry

    def head(self) -> None:
        self.get()

    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(generate_latest(self.registry))
