"""A real redis-server for tests: unprivileged, on a free port, in its own
directory, AOF on with ``appendfsync always`` (what docs/DEPLOY.md asks for),
stopped by its pid.  Never a system service."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

import pytest


def redis_binary() -> str | None:
    return shutil.which("redis-server")


def require_redis() -> str:
    """The redis-server path; a missing one fails in CI (scripts/test.sh installs it) and skips elsewhere."""
    path = redis_binary()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed (scripts/test.sh installs Debian's redis-server)")
        pytest.skip("redis-server is not installed")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("redis-server exited: see %s/redis.log" % self.dir)
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        self.kill(signal.SIGTERM)
