"""Topic fan-out: topic -> local subscribers, fed by a backplane.

A message is encoded once (:class:`~realtime.protocol.Outgoing`) and handed to
every subscriber with a plain method call: ``deliver`` never blocks and never
awaits, so one slow recipient cannot stall the others.  What a subscriber does
with a message it cannot send yet (queue within a bound, conflate, or close the
connection) is its own business.

The backplane carries published messages between processes.  The in-memory one
(:mod:`realtime.backplane.memory`) loops them straight back; the Redis one
publishes them on a channel every node subscribes to.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from realtime.protocol import Outgoing

log = logging.getLogger("realtime.hub")


class Subscriber(Protocol):
    def deliver(self, out: Outgoing) -> None:
        """Take one message.  Must not block, await or raise."""


class Backplane(Protocol):
    """Moves published messages to every node's hub (this one included)."""

    def attach(self, hub: "Hub") -> None: ...

    def publish(self, topic: str, out: Outgoing) -> None: ...

    def topic_added(self, topic: str) -> None: ...

    def topic_removed(self, topic: str) -> None: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class Hub:
    """Local subscriptions plus the backplane that feeds them."""

    def __init__(self, backplane: Backplane) -> None:
        self._topics: dict[str, dict[Subscriber, None]] = {}
        self.backplane = backplane
        self.delivered = 0  # messages handed to subscribers, for /metrics
        backplane.attach(self)

    def subscribe(self, topic: str, sub: Subscriber) -> None:
        subs = self._topics.get(topic)
        if subs is None:
            subs = self._topics[topic] = {}
            self.backplane.topic_added(topic)
        subs[sub] = None

    def unsubscribe(self, topic: str, sub: Subscriber) -> None:
        subs = self._topics.get(topic)
        if subs is None:
            return
        subs.pop(sub, None)
        if not subs:
            del self._topics[topic]
            self.backplane.topic_removed(topic)

    def subscribers(self, topic: str) -> int:
        subs = self._topics.get(topic)
        return len(subs) if subs else 0

    @property
    def topics(self) -> int:
        return len(self._topics)

    def publish(self, topic: str, message: Any) -> Outgoing:
        """Encode ``message`` once and send it to every subscriber of ``topic``
        on every node.  Returns the encoded message."""
        out = message if isinstance(message, Outgoing) else Outgoing(message)
        self.backplane.publish(topic, out)
        return out

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
