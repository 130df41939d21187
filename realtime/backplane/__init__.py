"""Backplanes: how published messages reach every node's hub."""

from __future__ import annotations

from realtime.hub import Backplane


def make_backplane(url: str) -> Backplane:
    """``memory`` (one process, the default) or ``redis://host:port/db``."""
    if url in ("", "memory"):
        from realtime.backplane.memory import MemoryBackplane

        return MemoryBackplane()
    if url.startswith(("redis://", "rediss://", "unix://")):
        try:
            from realtime.backplane.redis import RedisBackplane  # type: ignore[import-not-found]
        except ModuleNotFoundError:
            raise ValueError("the Redis backplane is not part of this version yet; use 'memory'")
        return RedisBackplane(url)
    raise ValueError("unknown backplane %r: use 'memory' or redis://host:port/db" % url)
