"""Child processes of a benchmark run: started pinned, measured from /proc, always stopped.

Every process the harness starts goes through :class:`Child`, which registers it in
:data:`_LIVE`; :func:`stop_all` (called on exit, on Ctrl-C and on SIGTERM) stops every
one of them by its own process group id, so no server or worker outlives the run.
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import selectors
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from typing import IO, Any

import psutil

_LIVE: list[Child] = []


def _limit_and_pin(cores: set[int] | None) -> Callable[[], None]:
    def setup() -> None:  # runs in the child between fork and exec
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        if cores:
            os.sched_setaffinity(0, cores)
    return setup


class Child:
    """A child process in its own session, pinned to ``cores``."""

    def __init__(self, argv: list[str], *, cores: set[int] | None, cwd: str, log_path: str | None = None,
                 pipes: bool = False, env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.log_path = log_path
        self._log: IO[bytes] | None = open(log_path, "wb") if log_path else None  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv, cwd=cwd, env=env, start_new_session=True,
            preexec_fn=_limit_and_pin(cores),  # noqa: PLW1509 - the runner starts no threads
            stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipes else self._log,
            stderr=self._log if self._log else None)
        self.pid = self.proc.pid
        self.ps = psutil.Process(self.pid)
        _LIVE.append(self)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu_seconds(self) -> float:
        """User + system CPU of the process, all threads: the kernel's rusage counters."""
        try:
            times = self.ps.cpu_times()
            return times.user + times.system
        except psutil.Error:
            return float("nan")

    def cpu_seconds_fine(self) -> float:
        """The same to the nanosecond: the scheduler's on-CPU time of every thread
        (/proc/<pid>/task/*/schedstat), where rusage counts in clock ticks (10 ms),
        too coarse for a process that works a few ms a second (redis-server). Falls
        back to :meth:`cpu_seconds` where schedstat is missing."""
        total = 0
        try:
            tasks = os.listdir(f"/proc/{self.pid}/task")
        except OSError:
            return self.cpu_seconds()
        for task in tasks:
            try:
                with open(f"/proc/{self.pid}/task/{task}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue  # a thread that just ended
        return total / 1e9 if total else self.cpu_seconds()

    def rss(self) -> int:
        try:
            return self.ps.memory_info().rss
        except psutil.Error:
            return 0

    def log_tail(self, lines: int = 8) -> str:
        if not self.log_path:
            return ""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 4000))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM to the child's process group, SIGKILL after ``grace`` seconds."""
        if self in _LIVE:
            _LIVE.remove(self)
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(self.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        else:
            try:  # leftovers in the group (a server's own children)
                os.killpg(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream:
                try:
                    stream.close()
                except OSError:
                    pass
        if self._log:
            self._log.close()
            self._log = None
        return self.proc.returncode


def stop_all() -> None:
    while _LIVE:  # stop() removes the child from _LIVE
        _LIVE[-1].stop(grace=2.0)


def _on_signal(signum: int, _frame: Any) -> None:
    stop_all()
    raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)


def install_cleanup() -> None:
    atexit.register(stop_all)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)


def core_busy() -> list[float]:
    """CPU seconds each core spent on anything but idling, from /proc/stat."""
    return [t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)
            for t in psutil.cpu_times(percpu=True)]


def own_cpu_seconds() -> float:
    times = psutil.Process().cpu_times()
    return times.user + times.system


def cores() -> tuple[set[int] | None, set[int] | None]:
    """(server cores, load generator cores): core 0 for the servers (and Redis)
    when this process may use two or more cores, else no pinning."""
    try:
        mine = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return None, None
    if len(mine) < 2 or 0 not in mine:
        return None, None
    return {0}, mine - {0}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, child: Child, timeout: float) -> bool:
    """Poll until 127.0.0.1:port accepts a TCP connection, the child exits, or timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class WorkerError(RuntimeError):
    pass


class Worker:
    """A load generator process speaking JSON lines (see bench/loadgen.py)."""

    def __init__(self, child: Child) -> None:
        self.child = child
        self.buf = b""
        self.fd = child.proc.stdout.fileno()  # type: ignore[union-attr]
        os.set_blocking(self.fd, False)
        self.ready: dict[str, Any] = {}

    def send(self, obj: dict[str, Any]) -> None:
        assert self.child.proc.stdin is not None
        try:
            self.child.proc.stdin.write((json.dumps(obj) + "\n").encode())
            self.child.proc.stdin.flush()
        except (OSError, ValueError) as exc:  # a closed pipe: the worker is gone
            raise WorkerError(f"load generator {self.child.pid} is gone: {exc}") from exc

    def read_lines(self) -> list[dict[str, Any]]:
        try:
            data = os.read(self.fd, 1 << 20)
        except BlockingIOError:
            return []
        if not data:
            raise WorkerError(f"load generator {self.child.pid} exited: {self.child.log_tail()}")
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]


class WorkerPool:
    """Sends one command to every worker and gathers the replies, bounded in time.

    ``tick`` is called about ten times a second while waiting (the runner samples the
    server's memory and redraws the progress line there); ``on_progress`` gets the
    workers' progress texts.
    """

    def __init__(self, workers: list[Worker]) -> None:
        self.workers = workers
        self.next_id = 1
        self.selector = selectors.DefaultSelector()
        for worker in workers:
            self.selector.register(worker.fd, selectors.EVENT_READ, worker)

    @property
    def pids(self) -> list[int]:
        return [w.child.pid for w in self.workers]

    def cpu_seconds(self) -> float:
        return sum(w.child.cpu_seconds() for w in self.workers)

    def wait_ready(self, timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        pending = set(self.workers)
        while pending:
            if time.monotonic() > deadline:
                raise WorkerError("load generator did not start")
            for key, _ in self.selector.select(0.1):
                worker = key.data
                for msg in worker.read_lines():
                    if msg.get("event") == "ready":
                        worker.ready = msg
                        pending.discard(worker)
        return [w.ready for w in self.workers]

    def call(self, cmd: str, wait: float, per_worker: Iterable[dict[str, Any]] | None = None,
             tick: Callable[[], None] | None = None,
             on_progress: Callable[[str], None] | None = None, **common: Any) -> list[dict[str, Any]]:
        extras = list(per_worker) if per_worker is not None else [{} for _ in self.workers]
        req_id = self.next_id
        self.next_id += 1
        for worker, extra in zip(self.workers, extras):
            worker.send(dict(common, **extra, cmd=cmd, id=req_id))
        replies: dict[Worker, dict[str, Any]] = {}
        deadline = time.monotonic() + wait
        while len(replies) < len(self.workers):
            if time.monotonic() > deadline:
                raise WorkerError(f"load generator did not answer {cmd!r} within {wait:.0f} s")
            for key, _ in self.selector.select(0.1):
                worker = key.data
                for msg in worker.read_lines():
                    if msg.get("event") == "progress":
                        if on_progress:
                            on_progress(msg["text"])
                    elif msg.get("id") == req_id:
                        replies[worker] = msg
            if tick:
                tick()
        out = [replies[w] for w in self.workers]
        for reply in out:
            if not reply.get("ok"):
                raise WorkerError("load generator failed {!r}: {}".format(cmd, reply.get("error")))
        return out

    def close(self) -> None:
        for worker in self.workers:
            try:
                worker.send({"cmd": "exit", "id": 0})
            except WorkerError:
                pass
        deadline = time.monotonic() + 3
        for worker in self.workers:
            try:
                worker.child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            worker.child.stop(grace=1.0)
        self.selector.close()
