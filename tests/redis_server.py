"""A real redis-server for tests: unprivileged, on a free port, in its own
directory, AOF on with ``appendfsync always`` (what docs/DEPLOY.md asks for),
stopped by its pid.  Never a system service."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess

import pytest

from tests.servers import free_port
from tests.waiting import until_sync


def redis_binary() -> str | None:
    return shutil.which("redis-server")


def require_redis() -> str:
    """The redis-server path; a missing one skips the test (a failure under CI: scripts/test.sh installs it)."""
    path = redis_binary()
    if path is None:
        pytest.skip("redis-server is not installed (scripts/test.sh installs Debian's redis-server)")
    return path


class RedisServer:
    def __init__(self, directory: str, port: int | None = None) -> None:
        self.dir = directory
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return "redis://127.0.0.1:%d/0" % self.port

    def start(self) -> "RedisServer":
        os.makedirs(self.dir, exist_ok=True)
        self.proc = subprocess.Popen(
            [require_redis(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
             "--protected-mode", "yes", "--logfile", os.path.join(self.dir, "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        proc = self.proc

        def answers() -> bool:
            if proc.poll() is not None:
                raise RuntimeError("redis-server exited: see %s/redis.log" % self.dir)
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    return s.recv(16).startswith(b"+PONG")
            except OSError:
                return False

        until_sync(answers, 10, what="redis-server to answer PING on port %d" % self.port)
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        self.kill(signal.SIGTERM)
