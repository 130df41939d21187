"""Every storage and backplane implementation runs the same contract suite.

``STORAGES`` and ``BACKPLANES`` name the implementations; a test takes the
``storage`` or ``backplane`` fixture and is run once per name.  A cluster
implementation adds its name here (and what it needs to start), and the whole
suite holds it to the same contract as the single-process default.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator, Callable

import pytest

from realtime.backplane.memory import MemoryBackplane
from realtime.hub import Hub
from realtime.storage.sqlite import SQLiteStore
from realtime.storage.sqlite_repos import SQLiteStorage
from tests.redis_server import RedisServer

STORAGES = ["sqlite", "redis"]
BACKPLANES = ["memory", "redis"]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: Any) -> Any:
    server = RedisServer(str(tmp_path_factory.mktemp("redis"))).start()
    yield server.url
    server.stop()


def _flush(url: str) -> None:
    import redis as sync_redis

    client = sync_redis.Redis.from_url(url)
    client.flushdb()
    client.close()


def run(coro: Any, timeout: float = 10.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(params=STORAGES)
def storage(request: pytest.FixtureRequest, tmp_path: Any) -> Callable[[], Any]:
    """``async with storage() as s``: a fresh, opened storage of one implementation."""

    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        _flush(url)

        @contextlib.asynccontextmanager
        async def open_redis() -> AsyncIterator[Any]:
            from realtime.backplane.redis import RedisBackplane
            from realtime.storage.redis_repos import RedisStorage

            bp = RedisBackplane(url)
            Hub(bp)
            await bp.start()
            try:
                yield RedisStorage(bp)
            finally:
                await bp.close()

        return open_redis

    @contextlib.asynccontextmanager
    async def open_storage() -> AsyncIterator[Any]:
        s = SQLiteStorage(SQLiteStore(str(tmp_path / "contract.sqlite3")))
        s.chat_log(keep=5)  # every app's tables
        s.document_log()
        s.reading_store()
        await s.open()
        try:
            yield s
        finally:
            await s.close()

    return open_storage


class Nodes:
    """Hubs of one cluster: ``await nodes.hub()`` adds a node."""

    def __init__(self, redis_url: str | None = None) -> None:
        self.hubs: list[Hub] = []
        self.redis_url = redis_url
        self.multi_node = redis_url is not None

    async def hub(self) -> Hub:
        if self.redis_url is not None:
            from realtime.backplane.redis import RedisBackplane

            hub = Hub(RedisBackplane(self.redis_url))
        else:
            hub = Hub(MemoryBackplane())
        await hub.backplane.start()
        self.hubs.append(hub)
        return hub

    async def close(self) -> None:
        for hub in self.hubs:
            await hub.backplane.close()


@pytest.fixture(params=BACKPLANES)
def backplane(request: pytest.FixtureRequest) -> Callable[[], Any]:
    """``async with backplane() as nodes``: a cluster of hubs on one backplane."""

    url = request.getfixturevalue("redis_url") if request.param == "redis" else None

    @contextlib.asynccontextmanager
    async def cluster() -> AsyncIterator[Nodes]:
        nodes = Nodes(url)
        try:
            yield nodes
        finally:
            await nodes.close()

    return cluster
