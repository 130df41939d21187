"""The Redis backplane: several processes and machines behave as one server.

Each node has an id; what it publishes is dispatched to its own subscribers at
once and sent to the others as an :class:`~realtime.hub.Envelope` on the
topic's channel (``rt:ch:<topic>``), which the others dispatch and the origin
ignores.  Pub/sub is at-most-once: a node that loses its connection misses
what was published meanwhile.  So:

* ``subscribe`` resolves only when Redis has confirmed the SUBSCRIBE: from then
  on every PUBLISH reaches this node (the chat join reads history after it);
* when the connection comes back, the node resubscribes every topic and tells
  its listeners (``on_resync``), which fill what they missed from the durable
  streams (chat rooms) or reload (documents);
* ``healthy`` is false while Redis is unreachable: ``/healthz`` answers 503 so
  a load balancer routes new clients elsewhere, and nothing is acknowledged
  that Redis did not store (the stores refuse with ``unavailable``).

Outgoing envelopes go through one writer task per node that sends whatever
accumulated in one pipeline, so a burst of publishes costs one round trip (on
the lean connection of realtime.storage.resp, shared with the chat says, when
the URL allows it).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import TYPE_CHECKING, Any, Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from realtime.hub import Envelope
from realtime.protocol import Outgoing
from realtime.storage.resp import RespPipe
from realtime.storage.resp import supports as resp_supports

if TYPE_CHECKING:
    from realtime.hub import Hub

log = logging.getLogger("realtime.backplane")

CHANNEL_PREFIX = "rt:ch:"


def channel(topic: str) -> str:
    return CHANNEL_PREFIX + topic


POOL_SIZE = 64  # connections a node opens to Redis for commands, at most


def connect(url: str) -> "aioredis.Redis":
    """A client for commands (scripts, streams); short timeouts so that an
    unreachable Redis is an error a client hears about, not a hang.

    The pool is bounded and *blocking*: a burst of commands (hundreds of
    clients reconnecting at once after a node died, each joining its rooms)
    waits its turn for one of ``POOL_SIZE`` connections, up to the socket
    timeout, where redis-py's default pool would fail every command past its
    100th with "Too many connections"."""
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=POOL_SIZE, timeout=5.0, socket_timeout=5.0,
                                                    socket_connect_timeout=3.0, health_check_interval=10,
                                                    retry_on_timeout=False)
    client = aioredis.Redis(connection_pool=pool)
    client.auto_close_connection_pool = True  # aclose() closes the pool too
    return client


class RedisBackplane:
    name = "redis"

    def __init__(self, url: str, node_id: str | None = None, *, heartbeat: float = 1.0) -> None:
        self.url = url
        self.node_id = node_id or "n-" + secrets.token_hex(6)
        self.heartbeat = heartbeat
        self.redis = connect(url)
        # The heartbeat's own connection: a burst that holds every pooled one
        # must not make a PING wait its turn and the node look unreachable.
        self._probe = aioredis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=3.0,
                                              single_connection_client=True)
        # The lean connection (realtime.storage.resp) for the hot writes, chat says and
        # publishes, where the URL allows it.
        self.pipe = RespPipe(url) if resp_supports(url) else None
        self.healthy = False
        self.reason = "not started"
        self._hub: "Hub | None" = None
        self._topics: set[str] = set()
        self._confirm: dict[str, asyncio.Future[None]] = {}
        self._outbox: list[tuple[str, bytes]] = []
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._pubsub: Any = None
        self._resync: list[Callable[[], Any]] = []
        self._closing = False
        self._resubscribing = False  # the subscription was lost and is not back yet
        self.published = 0
        self.received = 0
        self.resyncs = 0

    def attach(self, hub: "Hub") -> None:
        self._hub = hub

    def on_resync(self, fn: Callable[[], Any]) -> None:
        """Call ``fn()`` after the subscription was lost and is back."""
        self._resync.append(fn)

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Connect (an unreachable Redis raises ``ConnectionError`` with a clear text)."""
        try:
            await self.redis.ping()
        except (RedisError, OSError) as e:
            raise ConnectionError("cannot reach Redis at %s: %s" % (self.url, e)) from None
        self._pubsub = self.redis.pubsub()
        await self._pubsub.subscribe(CHANNEL_PREFIX + "_node:" + self.node_id)  # opens the connection
        self.healthy, self.reason = True, ""
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read_loop()), loop.create_task(self._write_loop()),
                       loop.create_task(self._watch())]

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        self._wake.set()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2.0)
        # Each step is bounded: a shutdown never hangs on a Redis that went
        # away, nor on a subscription whose reader was cancelled mid-read.
        steps = [self._flush_outbox()]
        if self._pubsub is not None:
            steps.append(self._pubsub.aclose())
        steps.append(self.redis.aclose())
        steps.append(self._probe.aclose())
        if self.pipe is not None:
            steps.append(self.pipe.close())
        for step in steps:
            try:
                await asyncio.wait_for(step, 2.0)
            except (RedisError, OSError, asyncio.TimeoutError):
                pass

    # -- publishing ----------------------------------------------------------

    def publish(self, topic: str, out: Outgoing) -> None:
        assert self._hub is not None
        self._hub.dispatch(topic, out)
        self.send(topic, Envelope.of(self.node_id, topic, out).pack())

    def send(self, topic: str, packed: bytes) -> None:
        """Queue an envelope for the other nodes (this node already has it)."""
        self._outbox.append((channel(topic), packed))
        self._wake.set()

    async def _write_loop(self) -> None:
        while not self._closing:  # not only the cancel: redis-py can swallow one mid-command
            await self._wake.wait()
            self._wake.clear()
            await self._flush_outbox()

    async def _flush_outbox(self) -> None:
        while self._outbox:
            batch, self._outbox = self._outbox, []
            try:
                if self.pipe is not None:
                    await self.pipe.execute([["PUBLISH", ch, data] for ch, data in batch])
                else:
                    async with self.redis.pipeline(transaction=False) as pipe:
                        for ch, data in batch:
                            pipe.publish(ch, data)
                        await pipe.execute()
                self.published += len(batch)
            except (RedisError, OSError) as e:
                # Live delivery is at-most-once; what matters is stored in the
                # streams and filled by the receivers' gap detection.
                self._unhealthy("publish failed: %s" % e)
                return

    # -- subscribing --------------------------------------------------------------

    async def subscribe(self, topic: str) -> None:
        self._topics.add(topic)
        if not self.healthy or self._pubsub is None:
            raise ConnectionError("Redis is unreachable: " + self.reason)
        ch = channel(topic)
        fut = self._confirm.get(ch)
        if fut is None or fut.done():
            fut = self._confirm[ch] = asyncio.get_running_loop().create_future()
            try:
                await self._pubsub.subscribe(ch)
            except (RedisError, OSError) as e:
                self._confirm.pop(ch, None)
                self._unhealthy("subscribe failed: %s" % e)
                raise ConnectionError("Redis is unreachable: %s" % e) from None
        await asyncio.wait_for(asyncio.shield(fut), 5.0)

    def unsubscribe(self, topic: str) -> None:
        self._topics.discard(topic)
        if self._pubsub is not None and self.healthy:
            asyncio.ensure_future(self._unsubscribe(channel(topic)))

    async def _unsubscribe(self, ch: str) -> None:
        try:
            if ch[len(CHANNEL_PREFIX):] not in self._topics:
                await self._pubsub.unsubscribe(ch)
        except (RedisError, OSError):
            pass

    async def _read_loop(self) -> None:
        hub = self._hub
        assert hub is not None
        while not self._closing:
            try:
                msg = await self._pubsub.get_message(ignore_subscribe_messages=False, timeout=1.0)
            except (RedisError, OSError) as e:
                self._unhealthy("subscription lost: %s" % e)
                self._resubscribing = True
                await self._reconnect()
                self._resubscribing = False
                continue
            if msg is None:
                continue
            kind = msg.get("type")
            ch = msg["channel"].decode() if isinstance(msg["channel"], bytes) else msg["channel"]
            if kind == "subscribe":
                fut = self._confirm.get(ch)
                if fut is not None and not fut.done():
                    fut.set_result(None)
                continue
            if kind != "message":
                continue
            try:
                env = Envelope.unpack(msg["data"])
            except (ValueError, TypeError) as e:
                log.warning("dropping a malformed envelope on %s: %s", ch, e)
                continue
            if env.origin == self.node_id:
                continue
            self.received += 1
            hub.dispatch(env.topic, env.outgoing())

    async def _reconnect(self) -> None:
        delay = 0.1
        while not self._closing:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
            try:
                try:
                    await self._pubsub.aclose()
                except (RedisError, OSError):
                    pass
                self._pubsub = self.redis.pubsub()
                channels = [CHANNEL_PREFIX + "_node:" + self.node_id] + [channel(t) for t in self._topics]
                for ch in channels:
                    self._confirm[ch] = asyncio.get_running_loop().create_future()
                await self._pubsub.subscribe(*channels)
                await self.redis.ping()
            except (RedisError, OSError) as e:
                self.reason = "reconnecting: %s" % e
                continue
            log.warning("Redis is back: resubscribed %d topics", len(self._topics))
            await self._drop_stale_connections()
            self.healthy, self.reason = True, ""
            self.resyncs += 1
            asyncio.get_running_loop().call_soon(self._run_resync)
            return

    def _run_resync(self) -> None:
        for fn in self._resync:
            try:
                result = fn()
                if asyncio.iscoroutine(result):
                    asyncio.ensure_future(result)
            except Exception:
                log.exception("resync listener failed")

    async def _watch(self) -> None:
        """PING every ``heartbeat`` seconds: ``healthy`` follows Redis."""
        while not self._closing:
            await asyncio.sleep(self.heartbeat)
            try:
                await asyncio.wait_for(self._probe.ping(), max(1.0, self.heartbeat))
            except (RedisError, OSError, asyncio.TimeoutError) as e:
                self._unhealthy("ping failed: %s" % (e or "timeout"))
                continue
            # Back from a failed PING or PUBLISH (a connection Redis closed, a pool
            # wait that timed out): Redis answers and the subscription is intact,
            # so nothing else will mark the node healthy again.  A lost
            # subscription is _reconnect's to restore (it resubscribes first).
            if not self.healthy and not self._resubscribing and self.reason.startswith(("ping", "publish")):
                await self._drop_stale_connections()
                self.healthy, self.reason = True, ""

    async def _drop_stale_connections(self) -> None:
        """Pooled connections from before an outage are dead: close the idle
        ones so the next command opens a fresh one instead of failing once."""
        try:
            await self.redis.connection_pool.disconnect(inuse_connections=False)
        except (RedisError, OSError):
            pass

    def _unhealthy(self, reason: str) -> None:
        if self.healthy:
            log.error("Redis backplane degraded: %s", reason)
        self.healthy = False
        self.reason = reason
