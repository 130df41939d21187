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

STORAGES = ["sqlite"]
BACKPLANES = ["memory"]


def run(coro: Any, timeout: float = 10.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(params=STORAGES)
def storage(request: pytest.FixtureRequest, tmp_path: Any) -> Callable[[], Any]:
    """``async with storage() as s``: a fresh, opened storage of one implementation."""

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

    multi_node = False

    def __init__(self) -> None:
        self.hubs: list[Hub] = []

    async def hub(self) -> Hub:
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

    @contextlib.asynccontextmanager
    async def cluster() -> AsyncIterator[Nodes]:
        nodes = Nodes()
        try:
            yield nodes
        finally:
            await nodes.close()

    return cluster
