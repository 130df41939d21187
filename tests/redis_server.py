"""A real redis-server for tests and the benchmarks: unprivileged, on a free port,
in its own directory, AOF on with ``appendfsync always`` (what docs/DEPLOY.md asks
for), stopped by its pid.  Never a system service.

:func:`redis_argv` and :func:`wait_for_redis` are the one way this tree starts one;
bench/cluster_scenario.py and bench/editor_scenario.py use them too, with processes
of their own (pinned, measured), so nothing here needs pytest at import time.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from typing import Callable

from tests.servers import free_port


def redis_binary() -> str | None:
    return shutil.which("redis-server")


def require_redis() -> str:
    """The redis-server path; a missing one skips the test (a failure under CI: scripts/test.sh installs it)."""
    import pytest

    path = redis_binary()
    if path is None:
        pytest.skip("redis-server is not installed (scripts/test.sh installs Debian's redis-server)")
    return path


def redis_argv(binary: str, port: int, directory: str) -> list[str]:
    """redis-server as docs/DEPLOY.md runs it: loopback only, AOF with an fsync on every
    write, no RDB snapshots, in the foreground, its log in ``directory``/redis.log."""
    return [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", directory, "--appendonly", "yes",
            "--appendfsync", "always", "--save", "", "--daemonize", "no", "--protected-mode", "yes",
            "--logfile", os.path.join(directory, "redis.log")]


def answers_ping(port: int) -> bool:
    """Whether a Redis on 127.0.0.1:``port`` answers ``PING`` now."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.3) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def wait_for_redis(port: int, alive: Callable[[], bool], timeout: float = 10.0) -> str | None:
    """Wait until the redis-server on ``port`` answers ``PING``: ``None`` once it does,
    otherwise why not (``"exited"`` when ``alive()`` turns false first, or that it did
    not answer within ``timeout`` seconds).  Callers raise their own error with it."""
    deadline = time.monotonic() + timeout
    while True:
        if not alive():
            return "exited"
        if answers_ping(port):
            return None
        if time.monotonic() >= deadline:
            return "did not answer PING on port %d within %.0f s" % (port, timeout)
        time.sleep(0.05)


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
        self.proc = subprocess.Popen(redis_argv(require_redis(), self.port, self.dir),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        proc = self.proc
        why = wait_for_redis(self.port, lambda: proc.poll() is None)
        if why is not None:
            raise RuntimeError("redis-server %s: see %s/redis.log" % (why, self.dir))
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        self.kill(signal.SIGTERM)
