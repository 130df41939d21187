"""SQLite on disk, off the IOLoop, with group commit.

Contract:

* :meth:`SQLiteStore.write` queues a function that runs on the writer thread
  inside a transaction; the returned future resolves **after that transaction
  has committed** (and, with ``synchronous=FULL``, after the fsync).  Callers
  send an ``ack`` only then, so a ``kill -9`` after an ack loses nothing.
* Writes queued while a commit is in progress are taken together into the
  next transaction: a burst of N writes costs about one commit, not N.  With
  ``commit_delay`` the writer also waits that long after the first write of a
  batch, so a steady trickle shares commits too.
  Each write runs in its own SAVEPOINT, so one failing write is rolled back
  and reported alone while the rest of the batch commits.
* Writes run in the order they were queued, and their futures resolve in that
  order.
* :meth:`SQLiteStore.read` runs on a separate reader thread with its own
  connection (WAL mode lets it read while the writer writes).
* Every component declares a :class:`Schema` (name + ordered migrations); the
  applied version per component is kept in the ``schema_versions`` table.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from realtime.storage.base import StoreBusy, StoreClosed

__all__ = ["Schema", "SQLiteStore", "StoreBusy", "StoreClosed"]

log = logging.getLogger("realtime.storage")

T = TypeVar("T")

FORMAT_VERSION = 1  # of the store as a whole; components version their own tables


@dataclass
class Schema:
    component: str
    migrations: list[str] = field(default_factory=list)

    @property
    def version(self) -> int:
        return len(self.migrations)


_STOP = object()


class SQLiteStore:
    def __init__(
        self,
        path: str,
        *,
        synchronous: str = "FULL",
        batch_max: int = 1000,
        max_pending: int = 50_000,
        commit_delay: float = 0.0,
    ) -> None:
        self.path = path
        self.commit_delay = commit_delay
        self.synchronous = synchronous
        self.batch_max = batch_max
        self.max_pending = max_pending
        self.pending = 0
        self.commits = 0
        self.writes = 0
        self.last_commit_seconds = 0.0
        # The database's own error (disk full, I/O error, read-only) while the
        # most recent write fails; None once a write commits again.
        self.write_error: str | None = None
        self._queue: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer: threading.Thread | None = None
        self._reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sqlite-read")
        self._read_conn: sqlite3.Connection | None = None
        self._closed = False

    # -- lifecycle -------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=%s" % self.synchronous)
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    async def open(self, schemas: list[Schema]) -> None:
        """Create the file if needed, apply pending migrations, start threads."""
        d = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(d, exist_ok=True)
        self._loop = asyncio.get_running_loop()
        conn = self._connect()
        self._migrate(conn, schemas)
        self._writer = threading.Thread(target=self._write_loop, args=(conn,), name="sqlite-write", daemon=True)
        self._writer.start()

    @staticmethod
    def _migrate(conn: sqlite3.Connection, schemas: list[Schema]) -> None:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_versions(component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
        )
        conn.execute("CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute(
            "INSERT OR IGNORE INTO meta(key, value) VALUES ('format', ?)", (str(FORMAT_VERSION),)
        )
        for schema in schemas:
            row = conn.execute(
                "SELECT version FROM schema_versions WHERE component=?", (schema.component,)
            ).fetchone()
            have = row[0] if row else 0
            if have > schema.version:
                raise RuntimeError(
                    "%s: data was written by a newer version (schema %d > %d)"
                    % (schema.component, have, schema.version)
                )
            for i in range(have, schema.version):
                conn.execute("BEGIN")
                try:
                    for stmt in _split_sql(schema.migrations[i]):
                        conn.execute(stmt)
                    conn.execute(
                        "INSERT OR REPLACE INTO schema_versions(component, version) VALUES (?, ?)",
                        (schema.component, i + 1),
                    )
                    conn.execute("COMMIT")
                except Exception:
                    conn.execute("ROLLBACK")
                    raise

    async def close(self) -> None:
        """Commit everything queued so far, then stop the threads."""
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._queue.put(_STOP)
            await asyncio.get_running_loop().run_in_executor(None, self._writer.join)
        if self._read_conn is not None:
            rc = self._read_conn
            await asyncio.get_running_loop().run_in_executor(self._reader, rc.close)
        self._reader.shutdown(wait=True)

    # -- API -------------------------------------------------------------

    def write(self, fn: Callable[[sqlite3.Connection], T]) -> "asyncio.Future[T]":
        """Queue ``fn(conn)`` for the next transaction; resolves after commit."""
        if self._closed:
            raise StoreClosed("store is closed")
        if self.pending >= self.max_pending:
            raise StoreBusy("too many writes waiting")
        assert self._loop is not None
        fut: asyncio.Future[T] = self._loop.create_future()
        self.pending += 1
        self._queue.put((fn, fut))
        return fut

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise StoreClosed("store is closed")
        return await asyncio.get_running_loop().run_in_executor(self._reader, self._run_read, fn)

    def _run_read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._read_conn is None:
            self._read_conn = self._connect()
        return fn(self._read_conn)

    # -- writer thread ---------------------------------------------------

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        stopping = False
        while not stopping:
            item = self._queue.get()
            batch = []
            if item is _STOP:
                stopping = True
            else:
                batch.append(item)
                if self.commit_delay > 0:
                    # Let writes that arrive within the window share this commit
                    # (and its fsync): a little latency for much less I/O.
                    time.sleep(self.commit_delay)
            while len(batch) < self.batch_max:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    continue
                batch.append(item)
            if batch:
                self._run_batch(conn, batch)
        conn.close()

    def _run_batch(self, conn: sqlite3.Connection, batch: list[Any]) -> None:
        results: list[tuple[asyncio.Future[Any], bool, Any]] = []
        t0 = time.perf_counter()
        try:
            conn.execute("BEGIN IMMEDIATE")
            for fn, fut in batch:
                conn.execute("SAVEPOINT w")
                try:
                    value = fn(conn)
                except Exception as e:
                    if not conn.in_transaction:
                        # SQLite rolled the whole transaction back itself (disk
                        # full, I/O error): nothing in this batch is stored.
                        raise
                    conn.execute("ROLLBACK TO w")
                    conn.execute("RELEASE w")
                    results.append((fut, False, e))
                else:
                    conn.execute("RELEASE w")
                    results.append((fut, True, value))
            conn.execute("COMMIT")
        except Exception as e:  # the commit itself failed: nothing in the batch is durable
            log.error("sqlite commit failed: %s", e)
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            results = [(fut, False, e) for _, fut in batch]
        self.last_commit_seconds = time.perf_counter() - t0
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._resolve, results)
        except RuntimeError:  # loop closed during shutdown
            pass

    def _resolve(self, results: list[tuple["asyncio.Future[Any]", bool, Any]]) -> None:
        self.commits += 1
        self.writes += len(results)
        self.pending -= len(results)
        for fut, ok, value in results:
            if ok:
                self.write_error = None
            elif isinstance(value, sqlite3.Error) and not isinstance(value, sqlite3.IntegrityError):
                self.write_error = str(value)
            if fut.cancelled():
                continue
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)


def _split_sql(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
