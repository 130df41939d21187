"""The in-process backplane: publish is a direct call to this hub's dispatch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from realtime.protocol import Outgoing

if TYPE_CHECKING:
    from realtime.hub import Hub


class MemoryBackplane:
    """One node: messages go straight to this hub's subscribers, in publish order."""

    name = "memory"

    def __init__(self) -> None:
        self._hub: "Hub | None" = None
        self.healthy = True

    def attach(self, hub: "Hub") -> None:
        self._hub = hub

    def publish(self, topic: str, out: Outgoing) -> None:
        assert self._hub is not None
        self._hub.dispatch(topic, out)

    async def subscribe(self, topic: str) -> None:
        pass

    def unsubscribe(self, topic: str) -> None:
        pass

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass
