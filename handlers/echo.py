"""``/ws/echo``: every text and binary message comes back as it was sent.

The endpoint to try a client, a proxy or a load balancer against: it stands on
the same socket base as the apps (origin check, identity, connections per
address, message size, rate limit, slow-consumer bound, the writer's fast
path, permessage-deflate), but interprets nothing.  It sends no welcome, only
echoes, and an ``error`` when a client goes over the rate limit (in MessagePack
on a ``msgpack`` connection).
"""

from __future__ import annotations

from typing import Awaitable

from handlers.base import BaseSocketHandler


class EchoSocketHandler(BaseSocketHandler):
    app_name = "echo"

    def on_message(self, message: str | bytes) -> Awaitable[None] | None:
        if self._closing:
            return None
        verdict = self.admit()
        if verdict is None:
            return None
        if verdict != "ok":
            self.reply_error("rate_limited", "too many messages; slow down")
            return None
        self.send_raw(message)
        return None
