"""Topic fan-out: topic -> local subscribers, fed by a backplane.

A message is encoded once (:class:`~realtime.protocol.Outgoing`) and handed to
every subscriber with a plain method call: ``deliver`` never blocks and never
awaits, so one slow recipient cannot stall the others.  What a subscriber does
with a message it cannot send yet (queue within a bound, conflate, or close the
connection) is its own business.

The backplane carries published messages between processes.  The in-memory one
(:mod:`realtime.backplane.memory`) loops them straight back; a cluster one
carries an :class:`Envelope` to every node, whose hub rebuilds the
``Outgoing`` from it.  Subscribers therefore read only what an envelope
carries -- ``out.kind``, ``out.seq``, ``out.client`` and the payload -- never
state that exists only on the publishing node.

Contract: once ``await hub.subscribe(topic, sub)`` returns, every message
published on ``topic`` afterwards, on any node, reaches ``sub`` (the chat
join reads history only then, so nothing falls between the two).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, NamedTuple, Protocol

import ujson

from realtime.protocol import Outgoing

log = logging.getLogger("realtime.hub")


class Subscriber(Protocol):
    def deliver(self, out: Outgoing) -> None:
        """Take one message.  Must not block, await or raise."""


class Envelope(NamedTuple):
    """What crosses between nodes: who sent it, where to, its ordering number
    (chat seq, document rev), the client it came from, and the JSON payload."""

    origin: str
    topic: str
    kind: str | None
    seq: int | None
    client: str | None
    payload: str

    @classmethod
    def of(cls, origin: str, topic: str, out: Outgoing) -> "Envelope":
        return cls(origin, topic, out.kind, out.seq, out.client, out.text)

    def pack(self) -> bytes:
        """One line of JSON header, then the payload as it is (not re-encoded)."""
        head = ujson.dumps([self.origin, self.topic, self.kind, self.seq, self.client])
        return (head + "\n" + self.payload).encode("utf-8")

    @classmethod
    def unpack(cls, data: bytes | str) -> "Envelope":
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        head, _, payload = text.partition("\n")
        origin, topic, kind, seq, client = ujson.loads(head)
        return cls(origin, topic, kind, seq, client, payload)

    def outgoing(self) -> Outgoing:
        return Outgoing.from_text(self.payload, seq=self.seq, client=self.client, kind=self.kind)


class Backplane(Protocol):
    """Moves published messages to every node's hub (this one included)."""

    name: str
    healthy: bool

    def attach(self, hub: "Hub") -> None: ...

    def publish(self, topic: str, out: Outgoing) -> None:
        """Send ``out`` to every node's subscribers of ``topic``; never blocks."""

    async def subscribe(self, topic: str) -> None:
        """Resolve once this node receives what is published on ``topic``."""

    def unsubscribe(self, topic: str) -> None: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class Hub:
    """Local subscriptions plus the backplane that feeds them."""

    def __init__(self, backplane: Backplane) -> None:
        self._topics: dict[str, dict[Subscriber, None]] = {}
        self._joining: dict[str, asyncio.Future[None]] = {}
        self.backplane = backplane
        self.delivered = 0  # messages handed to subscribers, for /metrics
        backplane.attach(self)

    async def subscribe(self, topic: str, sub: Subscriber) -> None:
        """Add ``sub``; returns once messages on ``topic`` from every node reach it.

        The first subscriber of a topic on this node asks the backplane (inline:
        no task, so the in-memory backplane costs nothing); any others that
        arrive meanwhile wait for that answer."""
        subs = self._topics.get(topic)
        if subs is not None:
            subs[sub] = None
            waiter = self._joining.get(topic)
            if waiter is not None:
                try:
                    await asyncio.shield(waiter)
                except BaseException:
                    self.unsubscribe(topic, sub)
                    raise
            return
        self._topics[topic] = {sub: None}
        waiter = asyncio.get_running_loop().create_future()
        self._joining[topic] = waiter
        try:
            await self.backplane.subscribe(topic)
        except BaseException as e:
            self.unsubscribe(topic, sub)
            waiter.set_exception(e if isinstance(e, Exception) else ConnectionError("subscribe cancelled"))
            waiter.exception()  # retrieved here; the waiting subscribers re-raise it
            raise
        else:
            waiter.set_result(None)
        finally:
            if self._joining.get(topic) is waiter:
                del self._joining[topic]

    def unsubscribe(self, topic: str, sub: Subscriber) -> None:
        subs = self._topics.get(topic)
        if subs is None:
            return
        subs.pop(sub, None)
        if not subs:
            del self._topics[topic]
            self.backplane.unsubscribe(topic)

    def subscribers(self, topic: str) -> int:
        subs = self._topics.get(topic)
        return len(subs) if subs else 0

    def subscribed(self) -> list[str]:
        return list(self._topics)

    @property
    def topics(self) -> int:
        return len(self._topics)

    def publish(self, topic: str, message: Any, *, seq: int | None = None, client: str | None = None) -> Outgoing:
        """Encode ``message`` once and send it to every subscriber of ``topic``
        on every node.  ``seq`` (an ordering number subscribers may dedupe
        on) and ``client`` travel with it.  Returns the encoded message."""
        out = message if isinstance(message, Outgoing) else Outgoing(message, seq=seq, client=client)
        self.backplane.publish(topic, out)
        return out

    def send_others(self, topic: str, out: Outgoing) -> None:
        """Send ``out`` to the other nodes' subscribers only (this node handed it
        to its own already, in its own order)."""
        send = getattr(self.backplane, "send", None)
        if send is not None:
            send(topic, Envelope.of(getattr(self.backplane, "node_id", ""), topic, out).pack())

    def dispatch(self, topic: str, out: Outgoing) -> None:
        """Hand ``out`` to this node's subscribers of ``topic`` (backplane side)."""
        subs = self._topics.get(topic)
        if not subs:
            return
        # A copy: a subscriber may unsubscribe (close) while we iterate.
        for sub in tuple(subs):
            try:
                sub.deliver(out)
            except Exception:
                log.exception("subscriber %r failed on topic %s", sub, topic)
        self.delivered += len(subs)
