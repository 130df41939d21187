"""Real server processes, for the tests that kill, restart or cluster them, and
the browser tests: the one launcher every such test uses."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import IO, Any, Callable

from tests.clients import request
from tests.waiting import until_sync

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(port: int, data_dir: str | Path, *args: str) -> list[str]:
    """``python server.py`` on 127.0.0.1:port with ``args`` (logging at warning unless they say)."""
    logging = [] if any(a.startswith("--logging=") for a in args) else ["--logging=warning"]
    return [sys.executable, "server.py", "--port=%d" % port, "--address=127.0.0.1", "--data_dir=%s" % data_dir,
            *logging, *args]


def healthz(port: int, timeout: float = 1.0) -> int | None:
    """The status ``/healthz`` answers with, or None when nothing answers."""
    try:
        return request(port, "/healthz", timeout=timeout).status
    except OSError:
        return None


class ServerProcess:
    """``python server.py`` as a child process on a fixed port and data_dir.

    ``start()`` returns once ``/healthz`` answers 200; ``stop()`` is SIGTERM (a
    graceful shutdown: sockets close with 1001), then SIGKILL if it lingers;
    ``kill()`` is ``kill -9``.  The port and data_dir stay the same across
    ``restart()``.  ``log_path`` collects the process's stdout and stderr (else
    they go to the test's, or to ``stderr`` when given); ``wrap`` runs it under
    another command (e.g. ``prlimit``)."""

    def __init__(self, port: int, data_dir: str | Path, *args: str, log_path: Path | None = None,
                 wrap: tuple[str, ...] = (), stderr: IO[bytes] | None = None) -> None:
        self.port = port
        self.data_dir = Path(data_dir)
        self.args = args
        self.log_path = log_path
        self.wrap = wrap
        self.stderr = stderr
        self.url = "http://127.0.0.1:%d" % port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not running"
        return self.proc.pid

    def start(self, timeout: float = 15.0, ready: Callable[[], bool] | None = None) -> "ServerProcess":
        """Start it; return once ``ready()`` (default: ``/healthz`` answers 200)."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        cmd = [*self.wrap, *server_command(self.port, self.data_dir, *self.args)]
        if self.log_path is not None:
            with open(self.log_path, "ab") as log:  # the child keeps its own copy of the fd
                self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL)
        else:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stderr=self.stderr, stdin=subprocess.DEVNULL)
        proc = self.proc

        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError("server exited with %s:\n%s" % (proc.returncode, self.log_tail()))
            return ready() if ready is not None else healthz(self.port) == 200

        try:
            until_sync(up, timeout, what="the server on port %d to be ready" % self.port)
        except AssertionError:
            self.kill()
            raise RuntimeError("server was not ready within %.0fs:\n%s" % (timeout, self.log_tail()))
        return self

    def listening(self) -> bool:
        """Whether the port accepts TCP connections (a ``ready`` for servers /healthz can't reach, e.g. TLS)."""
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        assert self.proc is not None, "never started"
        return self.proc.wait(timeout)

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None, "never started"
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; the exit status (None if it never ran)."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        return proc.returncode

    def kill(self) -> None:
        """``kill -9``, no shutdown, no flush; returns once the process is gone."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, n: int = 40) -> str:
        if self.log_path is None:
            return "(output not captured)"
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(lines[-n:])

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.kill()


def start_server(port: int, data_dir: str | Path, *args: str, timeout: float = 15.0, wrap: tuple[str, ...] = (),
                 stderr: IO[bytes] | None = None, log_path: Path | None = None) -> ServerProcess:
    """A started :class:`ServerProcess`."""
    return ServerProcess(port, data_dir, *args, wrap=wrap, stderr=stderr, log_path=log_path).start(timeout)
