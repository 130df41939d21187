"""Cluster fixtures: a real redis-server and server.py nodes on it."""

from __future__ import annotations

from typing import Any

import pytest

from tests.redis_server import RedisServer
from tests.servers import ServerProcess, free_port, start_server


@pytest.fixture
def redis(tmp_path: Any) -> Any:
    server = RedisServer(str(tmp_path / "redis")).start()
    yield server
    server.stop()


@pytest.fixture
def cluster(tmp_path: Any, redis: RedisServer) -> Any:
    """``cluster(n)`` -> n node ports (each with its own data_dir) on one Redis;
    ``cluster.procs`` are their :class:`~tests.servers.ServerProcess` es."""
    procs: list[ServerProcess] = []

    def start(n: int, *args: str) -> list[int]:
        ports = []
        for _ in range(n):
            port = free_port()
            procs.append(start_server(port, tmp_path / ("node%d" % len(procs)), "--backplane=" + redis.url, *args))
            ports.append(port)
        return ports

    start.procs = procs  # type: ignore[attr-defined]
    yield start
    for p in procs:
        p.kill()
