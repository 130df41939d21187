"""The apps' storage interfaces (:mod:`realtime.storage.base`) on SQLite.

Each repository owns its tables (its :class:`Schema`) and runs its SQL on the
:class:`SQLiteStore`'s threads: writes through its group commit (they resolve
after COMMIT), reads on the reader connection.  SQLite errors become
:class:`StorageError` so the services never see ``sqlite3``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sqlite3
import time
from functools import partial
from typing import Any, Awaitable, Callable, TypeVar

from realtime.documents import SNAPSHOT_FORMAT
from realtime.storage.base import (
    Appended,
    Loaded,
    LogGap,
    NoSuchMessage,
    NotAMember,
    RoomExists,
    RoomRecord,
    SensorRow,
    StorageError,
    StoredOp,
    TooManyDocuments,
    TooManyRooms,
    may_read,
    member_json,
    message_json,
    redacted,
    tombstone_json,
)
from realtime.storage.sqlite import Schema, SQLiteStore

T = TypeVar("T")


async def _durable(fut: Awaitable[T]) -> T:
    try:
        return await fut
    except StorageError:
        raise
    except sqlite3.Error as e:
        raise StorageError(str(e)) from e


# -- chat ---------------------------------------------------------------------------

CHAT_SCHEMA = Schema(
    "chat",
    [
        """
        CREATE TABLE rooms(
            name TEXT PRIMARY KEY,
            epoch TEXT NOT NULL,
            last_seq INTEGER NOT NULL DEFAULT 0,
            created REAL NOT NULL
        );
        CREATE TABLE messages(
            room TEXT NOT NULL,
            seq INTEGER NOT NULL,
            user_id TEXT NOT NULL,
            name TEXT NOT NULL,
            text TEXT NOT NULL,
            ts INTEGER NOT NULL,
            cid TEXT,
            PRIMARY KEY(room, seq)
        ) WITHOUT ROWID;
        CREATE UNIQUE INDEX messages_cid ON messages(room, user_id, cid) WHERE cid IS NOT NULL
        """,
        # 2: rooms are listed by activity (the newest message, else creation)
        """
        ALTER TABLE rooms ADD COLUMN active REAL NOT NULL DEFAULT 0;
        UPDATE rooms SET active = COALESCE((SELECT MAX(m.ts) / 1000.0 FROM messages m WHERE m.room = rooms.name),
                                            created);
        CREATE INDEX rooms_active ON rooms(active)
        """,
        # 3: private and direct-message rooms with their members (and bans from
        # public rooms); tombstones and membership changes as entries in the
        # room's seq order (kind 'deleted' / 'member', their fields in data);
        # a deleted message keeps its row, without its text, and the seq of its tombstone
        """
        ALTER TABLE rooms ADD COLUMN kind TEXT NOT NULL DEFAULT 'public';
        ALTER TABLE rooms ADD COLUMN owner TEXT;
        CREATE TABLE room_members(
            room TEXT NOT NULL,
            user_id TEXT NOT NULL,
            role TEXT NOT NULL,
            added REAL NOT NULL,
            PRIMARY KEY(room, user_id)
        ) WITHOUT ROWID;
        CREATE INDEX room_members_by_user ON room_members(user_id, role);
        ALTER TABLE messages ADD COLUMN kind TEXT;
        ALTER TABLE messages ADD COLUMN data TEXT;
        ALTER TABLE messages ADD COLUMN deleted INTEGER
        """,
    ],
)

_ENTRY_COLUMNS = "seq, user_id, name, text, ts, cid, kind, data, deleted"


def _entry(room: str, row: Any) -> dict[str, Any]:
    seq, user_id, name, text, ts, cid, kind, data, deleted = tuple(row)
    if kind is None:
        msg = message_json(room, seq, user_id, name, text, ts, cid)
        return redacted(msg) if deleted is not None else msg
    fields = json.loads(data)
    if kind == "deleted":
        return tombstone_json(room, seq, fields["target"], user_id, name, ts)
    return member_json(room, seq, fields["event"], fields["user"], user_id, name, ts)


def _entries(room: str, rows: list[Any]) -> list[dict[str, Any]]:
    return [_entry(room, r) for r in rows]


def _next_seq(conn: sqlite3.Connection, room: str, ts: int) -> int:
    found = conn.execute(
        "UPDATE rooms SET last_seq=last_seq+1, active=? WHERE name=? RETURNING last_seq", (ts / 1000.0, room)
    ).fetchone()
    if found is None:
        raise StorageError("room %s does not exist" % room)
    return int(found[0])


def _role(conn: sqlite3.Connection, room: str, user_id: str) -> str | None:
    row = conn.execute("SELECT role FROM room_members WHERE room=? AND user_id=?", (room, user_id)).fetchone()
    return None if row is None else str(row[0])


def _check_capacity(conn: sqlite3.Connection, room: str, max_rooms: int) -> None:
    if max_rooms > 0 and conn.execute("SELECT 1 FROM rooms WHERE name=?", (room,)).fetchone() is None:
        if conn.execute("SELECT COUNT(*) FROM rooms").fetchone()[0] >= max_rooms:
            raise TooManyRooms("this server holds at most %d rooms" % max_rooms)


class SQLiteChatLog:
    """Rooms, their members and their entries in three tables; the seq is
    assigned (and the cid and the writer's membership checked) inside the
    committing transaction, so seqs have no gaps, a retry that races the first
    attempt is still caught, and a removed member cannot slip a message in."""

    schema = CHAT_SCHEMA
    broadcasts = False  # the service publishes what it stored

    def __init__(self, store: SQLiteStore, keep: int) -> None:
        self.store = store
        self.keep = keep

    def _record(self, conn: sqlite3.Connection, room: str, recent: int) -> RoomRecord | None:
        row = conn.execute("SELECT epoch, last_seq, kind, owner FROM rooms WHERE name=?", (room,)).fetchone()
        if row is None:
            return None
        epoch, last_seq, kind, owner = row
        oldest = conn.execute("SELECT MIN(seq) FROM messages WHERE room=?", (room,)).fetchone()[0]
        oldest = last_seq + 1 if oldest is None else oldest
        rows = conn.execute(
            "SELECT %s FROM messages WHERE room=? ORDER BY seq DESC LIMIT ?" % _ENTRY_COLUMNS, (room, recent)
        ).fetchall()
        return RoomRecord(epoch, last_seq, max(oldest, last_seq - self.keep + 1), _entries(room, rows[::-1]),
                          kind, owner)

    async def open_room(self, room: str, recent: int, max_rooms: int = 0) -> RoomRecord:
        def load(conn: sqlite3.Connection) -> RoomRecord:
            _check_capacity(conn, room, max_rooms)
            now = time.time()
            conn.execute(
                "INSERT OR IGNORE INTO rooms(name, epoch, last_seq, created, active) VALUES (?, ?, 0, ?, ?)",
                (room, secrets.token_hex(8), now, now),
            )
            record = self._record(conn, room, recent)
            assert record is not None
            return record

        return await _durable(self.store.write(load))

    async def create_room(self, room: str, kind: str, owner: str | None, members: list[str], recent: int,
                          max_rooms: int = 0) -> RoomRecord:
        def create(conn: sqlite3.Connection) -> RoomRecord:
            existing = conn.execute("SELECT kind FROM rooms WHERE name=?", (room,)).fetchone()
            if existing is not None:
                if kind == "dm" and existing[0] == "dm":
                    record = self._record(conn, room, recent)
                    assert record is not None
                    return record
                raise RoomExists("a room named %s exists already" % room)
            _check_capacity(conn, room, max_rooms)
            now = time.time()
            conn.execute(
                "INSERT INTO rooms(name, epoch, last_seq, created, active, kind, owner) VALUES (?, ?, 0, ?, ?, ?, ?)",
                (room, secrets.token_hex(8), now, now, kind, owner),
            )
            rows = [(room, owner, "owner", now)] if owner is not None else []
            rows += [(room, m, "member", now) for m in members if m != owner]
            conn.executemany("INSERT OR IGNORE INTO room_members(room, user_id, role, added) VALUES (?, ?, ?, ?)",
                             rows)
            record = self._record(conn, room, recent)
            assert record is not None
            return record

        return await _durable(self.store.write(create))

    async def find_room(self, room: str, recent: int) -> RoomRecord | None:
        return await _durable(self.store.read(partial(self._record, room=room, recent=recent)))

    async def listen(self, rooms: list[str], ttl: float) -> list[str]:
        return []  # one process: the hub has every message already

    async def drop_if_empty(self, room: str) -> bool:
        def drop(conn: sqlite3.Connection) -> bool:
            if conn.execute("DELETE FROM rooms WHERE name=? AND last_seq=0 AND kind='public'",
                            (room,)).rowcount == 0:
                return False
            conn.execute("DELETE FROM room_members WHERE room=?", (room,))
            return True

        return await _durable(self.store.write(drop))

    async def append(self, room: str, user_id: str, name: str, text: str, ts: int,
                     cid: str | None) -> Appended:
        keep = self.keep

        def append(conn: sqlite3.Connection) -> Appended:
            if cid is not None:
                row = conn.execute(
                    "SELECT seq, ts FROM messages WHERE room=? AND user_id=? AND cid=?", (room, user_id, cid)
                ).fetchone()
                if row is not None:
                    return Appended(row[0], row[1], True)
            kind = conn.execute("SELECT kind FROM rooms WHERE name=?", (room,)).fetchone()
            if kind is not None and not may_read(kind[0], _role(conn, room, user_id)):
                raise NotAMember("%s may not write to room %s" % (user_id, room))
            seq = _next_seq(conn, room, ts)
            conn.execute(
                "INSERT INTO messages(room, seq, user_id, name, text, ts, cid) VALUES (?,?,?,?,?,?,?)",
                (room, seq, user_id, name, text, ts, cid),
            )
            if seq % 100 == 0 and seq > keep:
                conn.execute("DELETE FROM messages WHERE room=? AND seq<=?", (room, seq - keep))
            return Appended(seq, ts, False)

        return await _durable(self.store.write(append))

    async def read(self, room: str, after: int, limit: int, newest: bool) -> list[dict[str, Any]]:
        order = "DESC" if newest else "ASC"

        def read(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = conn.execute(
                "SELECT %s FROM messages WHERE room=? AND seq>? ORDER BY seq %s LIMIT ?" % (_ENTRY_COLUMNS, order),
                (room, after, limit),
            ).fetchall()
            return _entries(room, rows[::-1] if newest else rows)

        return await _durable(self.store.read(read))

    async def rooms(self, limit: int, user_id: str | None = None) -> list[tuple[str, int]]:
        def read(conn: sqlite3.Connection) -> list[tuple[str, int]]:
            return [(r[0], r[1]) for r in conn.execute(
                "SELECT name, last_seq FROM rooms WHERE kind='public' OR name IN"
                " (SELECT room FROM room_members WHERE user_id=? AND role IN ('owner', 'member'))"
                " ORDER BY active DESC, name LIMIT ?", (user_id, limit)).fetchall()]

        return await _durable(self.store.read(read))

    async def role(self, room: str, user_id: str) -> str | None:
        return await _durable(self.store.read(partial(_role, room=room, user_id=user_id)))

    async def members(self, room: str, limit: int) -> list[tuple[str, str]]:
        def read(conn: sqlite3.Connection) -> list[tuple[str, str]]:
            return [(r[0], r[1]) for r in conn.execute(
                "SELECT user_id, role FROM room_members WHERE room=? ORDER BY role != 'owner', user_id LIMIT ?",
                (room, limit)).fetchall()]

        return await _durable(self.store.read(read))

    async def set_member(self, room: str, user_id: str, role: str | None, event: str, by_id: str,
                         by_name: str, ts: int) -> Appended:
        def write(conn: sqlite3.Connection) -> Appended:
            if role is None:
                conn.execute("DELETE FROM room_members WHERE room=? AND user_id=?", (room, user_id))
            else:
                conn.execute("INSERT INTO room_members(room, user_id, role, added) VALUES (?, ?, ?, ?)"
                             " ON CONFLICT(room, user_id) DO UPDATE SET role=excluded.role",
                             (room, user_id, role, time.time()))
            seq = _next_seq(conn, room, ts)
            conn.execute(
                "INSERT INTO messages(room, seq, user_id, name, text, ts, kind, data) VALUES (?,?,?,?,'',?,'member',?)",
                (room, seq, by_id, by_name, ts, json.dumps({"event": event, "user": user_id})),
            )
            return Appended(seq, ts, False)

        return await _durable(self.store.write(write))

    async def delete(self, room: str, target: int, by_id: str, by_name: str, ts: int) -> Appended:
        def write(conn: sqlite3.Connection) -> Appended:
            row = conn.execute("SELECT kind, deleted FROM messages WHERE room=? AND seq=?", (room, target)).fetchone()
            if row is None or row[0] is not None:
                raise NoSuchMessage("room %s keeps no message %d" % (room, target))
            if row[1] is not None:
                first = conn.execute("SELECT ts FROM messages WHERE room=? AND seq=?", (room, row[1])).fetchone()
                return Appended(int(row[1]), int(first[0]) if first else ts, True)
            seq = _next_seq(conn, room, ts)
            conn.execute("UPDATE messages SET text='', deleted=? WHERE room=? AND seq=?", (seq, room, target))
            conn.execute(
                "INSERT INTO messages(room, seq, user_id, name, text, ts, kind, data)"
                " VALUES (?,?,?,?,'',?,'deleted',?)", (room, seq, by_id, by_name, ts, json.dumps({"target": target})),
            )
            return Appended(seq, ts, False)

        return await _durable(self.store.write(write))


# -- documents ------------------------------------------------------------------------

DOCS_SCHEMA = Schema(
    "docs",
    [
        """
        CREATE TABLE docs(
            id TEXT PRIMARY KEY,
            rev INTEGER NOT NULL DEFAULT 0,
            length INTEGER NOT NULL DEFAULT 0,
            created INTEGER NOT NULL,
            updated INTEGER NOT NULL
        );
        CREATE TABLE doc_ops(
            doc TEXT NOT NULL,
            rev INTEGER NOT NULL,
            op TEXT NOT NULL,
            client TEXT,
            seq INTEGER,
            user_id TEXT,
            ts INTEGER NOT NULL,
            PRIMARY KEY(doc, rev)
        ) WITHOUT ROWID;
        CREATE TABLE doc_snapshots(
            doc TEXT NOT NULL,
            rev INTEGER NOT NULL,
            format INTEGER NOT NULL,
            data TEXT NOT NULL,
            ts INTEGER NOT NULL,
            PRIMARY KEY(doc, rev)
        ) WITHOUT ROWID
        """
    ],
)


def now_ms() -> int:
    return int(time.time() * 1000)


def load_doc_rows(doc_id: str, create: bool, max_docs: int, keep: int, conn: sqlite3.Connection) -> Loaded | None:
    row = conn.execute("SELECT rev, updated FROM docs WHERE id=?", (doc_id,)).fetchone()
    if row is None:
        if not create:
            return None
        if max_docs > 0 and conn.execute("SELECT COUNT(*) FROM docs").fetchone()[0] >= max_docs:
            raise TooManyDocuments()
        ts = now_ms()
        conn.execute(
            "INSERT INTO docs(id, rev, length, created, updated) VALUES (?, 0, 0, ?, ?)", (doc_id, ts, ts)
        )
        return Loaded(0, ts, None, [])
    rev, updated = row
    snap = conn.execute(
        "SELECT rev, format, data FROM doc_snapshots WHERE doc=? ORDER BY rev DESC LIMIT 1", (doc_id,)
    ).fetchone()
    snap_rev = snap[0] if snap else 0
    start = max(0, min(snap_rev, rev) - keep)
    ops = conn.execute(
        "SELECT rev, op, client, seq, user_id FROM doc_ops WHERE doc=? AND rev>? ORDER BY rev", (doc_id, start)
    ).fetchall()
    return Loaded(rev, updated, (snap[0], snap[1], snap[2]) if snap else None, [StoredOp(*r) for r in ops])


def write_doc_ops(doc_id: str, ops: list[StoredOp], length: int, ts: int, snapshots: list[tuple[int, str]],
                  keep: int, conn: sqlite3.Connection) -> None:
    first, last = ops[0].rev, ops[-1].rev
    row = conn.execute("SELECT rev FROM docs WHERE id=?", (doc_id,)).fetchone()
    if row is None or row[0] != first - 1:
        raise LogGap(f"document {doc_id}: stored rev {row and row[0]}, writing {first}..{last}")
    conn.executemany(
        "INSERT INTO doc_ops(doc, rev, op, client, seq, user_id, ts) VALUES (?, ?, ?, ?, ?, ?, ?)",
        [(doc_id, o.rev, o.op, o.client, o.seq, o.user_id, ts) for o in ops],
    )
    conn.execute("UPDATE docs SET rev=?, length=?, updated=? WHERE id=?", (last, length, ts, doc_id))
    if snapshots:
        for rev, data in snapshots:
            conn.execute(
                "INSERT OR REPLACE INTO doc_snapshots(doc, rev, format, data, ts) VALUES (?, ?, ?, ?, ?)",
                (doc_id, rev, SNAPSHOT_FORMAT, data, ts),
            )
        _trim_doc(conn, doc_id, snapshots[-1][0], last, keep)


def write_doc_snapshot(doc_id: str, rev: int, data: str, keep: int, conn: sqlite3.Connection) -> bool:
    row = conn.execute("SELECT rev FROM docs WHERE id=?", (doc_id,)).fetchone()
    if row is None or row[0] != rev:
        return False  # the store holds something else: that snapshot would be wrong
    conn.execute(
        "INSERT OR REPLACE INTO doc_snapshots(doc, rev, format, data, ts) VALUES (?, ?, ?, ?, ?)",
        (doc_id, rev, SNAPSHOT_FORMAT, data, now_ms()),
    )
    _trim_doc(conn, doc_id, rev, rev, keep)
    return True


def _trim_doc(conn: sqlite3.Connection, doc_id: str, snap_rev: int, last: int, keep: int) -> None:
    """Keep the newest snapshot, every op after it, and ``keep`` ops before ``last``."""
    conn.execute("DELETE FROM doc_snapshots WHERE doc=? AND rev<?", (doc_id, snap_rev))
    conn.execute("DELETE FROM doc_ops WHERE doc=? AND rev<=?", (doc_id, min(snap_rev, last - keep)))


class SQLiteDocumentLog:
    """Documents, their op logs and snapshots in three tables.

    ``append`` and ``save_snapshot`` return the store's future at once (so the
    editing pipeline can chain on it without a task per write); a full queue
    raises :class:`StoreBusy` right away."""

    schema = DOCS_SCHEMA

    def __init__(self, store: SQLiteStore) -> None:
        self.store = store

    @property
    def overloaded(self) -> bool:
        return self.store.pending >= self.store.max_pending // 2

    async def load(self, doc_id: str, *, create: bool, max_docs: int, keep: int) -> Loaded | None:
        fn = partial(load_doc_rows, doc_id, create, max_docs, keep)
        return await _durable(self.store.write(fn) if create else self.store.read(fn))

    def append(self, doc_id: str, ops: list[StoredOp], length: int, ts: int,
               snapshots: list[tuple[int, str]], keep: int) -> "asyncio.Future[None]":
        return self.store.write(partial(write_doc_ops, doc_id, ops, length, ts, snapshots, keep))

    async def ops_since(self, doc_id: str, rev: int) -> list[StoredOp] | None:
        def read(conn: sqlite3.Connection) -> list[StoredOp] | None:
            row = conn.execute("SELECT rev FROM docs WHERE id=?", (doc_id,)).fetchone()
            if row is None:
                return None
            ops = [StoredOp(*r) for r in conn.execute(
                "SELECT rev, op, client, seq, user_id FROM doc_ops WHERE doc=? AND rev>? ORDER BY rev",
                (doc_id, rev)).fetchall()]
            if len(ops) != row[0] - rev or (ops and ops[0].rev != rev + 1):
                return None  # trimmed (or rev is ahead of the store)
            return ops

        return await _durable(self.store.read(read))

    def save_snapshot(self, doc_id: str, rev: int, data: str, keep: int) -> "asyncio.Future[bool]":
        return self.store.write(partial(write_doc_snapshot, doc_id, rev, data, keep))

    async def list(self, limit: int) -> list[tuple[str, int, int, int, int]]:
        def read(conn: sqlite3.Connection) -> list[tuple[str, int, int, int, int]]:
            return [(r[0], r[1], r[2], r[3], r[4]) for r in conn.execute(
                "SELECT id, rev, length, created, updated FROM docs ORDER BY updated DESC, id LIMIT ?",
                (limit,)).fetchall()]

        return await _durable(self.store.read(read))

    async def drop_if_empty(self, doc_id: str) -> bool:
        def drop(conn: sqlite3.Connection) -> bool:
            if conn.execute("DELETE FROM docs WHERE id=? AND rev=0", (doc_id,)).rowcount == 0:
                return False
            conn.execute("DELETE FROM doc_snapshots WHERE doc=?", (doc_id,))
            conn.execute("DELETE FROM doc_ops WHERE doc=?", (doc_id,))
            return True

        return await _durable(self.store.write(drop))


# -- sensors ----------------------------------------------------------------------------

SENSORS_SCHEMA = Schema(
    "sensors",
    [
        """
        CREATE TABLE sensor_meta(
            id TEXT PRIMARY KEY,
            label TEXT NOT NULL,
            unit TEXT NOT NULL,
            rate_hz REAL NOT NULL,
            created REAL NOT NULL,
            updated REAL NOT NULL
        ) WITHOUT ROWID;
        CREATE TABLE readings(
            sensor TEXT NOT NULL,
            t REAL NOT NULL,
            v REAL NOT NULL
        );
        CREATE INDEX readings_by_sensor ON readings(sensor, t)
        """
    ],
)


class SQLiteReadingStore:
    """Device sensors' metadata and readings in two tables."""

    schema = SENSORS_SCHEMA

    def __init__(self, store: SQLiteStore) -> None:
        self.store = store

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await _durable(self.store.write(fn))

    async def load(self, since: float, max_points: int) -> list[tuple[SensorRow, list[tuple[float, float]]]]:
        def read(conn: sqlite3.Connection) -> list[tuple[SensorRow, list[tuple[float, float]]]]:
            out = []
            for row in conn.execute("SELECT id, label, unit, rate_hz FROM sensor_meta ORDER BY id").fetchall():
                rows = conn.execute(
                    "SELECT t, v FROM readings WHERE sensor=? AND t>=? ORDER BY t DESC, rowid DESC LIMIT ?",
                    (row[0], since, max_points)).fetchall()
                points = [(float(r[0]), float(r[1])) for r in reversed(rows)]
                out.append((SensorRow(row[0], row[1], row[2], float(row[3])), points))
            return out

        return await _durable(self.store.read(read))

    broadcasts = False  # the service publishes what it stored

    async def append(self, meta: SensorRow, points: list[tuple[float, float]], now: float,
                     notice: tuple[str, Any] | None = None) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR IGNORE INTO sensor_meta(id, label, unit, rate_hz, created, updated)"
                " VALUES (?, ?, ?, ?, ?, ?)", (*meta, now, now))
            conn.executemany("INSERT INTO readings(sensor, t, v) VALUES (?, ?, ?)",
                             [(meta.id, t, v) for t, v in points])

        await self._write(write)

    async def set_meta(self, meta: SensorRow, now: float) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO sensor_meta(id, label, unit, rate_hz, created, updated) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(id) DO UPDATE SET label=excluded.label, unit=excluded.unit,"
                " rate_hz=excluded.rate_hz, updated=excluded.updated", (*meta, now, now))

        await self._write(write)

    async def delete(self, sensor_id: str) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM readings WHERE sensor=?", (sensor_id,))
            conn.execute("DELETE FROM sensor_meta WHERE id=?", (sensor_id,))

        await self._write(write)

    async def trim(self, sensor_ids: list[str], cutoff: float, max_points: int) -> int:
        def write(conn: sqlite3.Connection) -> int:
            n = 0
            for sid in sensor_ids:
                n += conn.execute("DELETE FROM readings WHERE sensor=? AND t<?", (sid, cutoff)).rowcount
                row = conn.execute("SELECT t FROM readings WHERE sensor=? ORDER BY t DESC LIMIT 1 OFFSET ?",
                                   (sid, max_points)).fetchone()
                if row is not None:
                    n += conn.execute("DELETE FROM readings WHERE sensor=? AND t<=?", (sid, row[0])).rowcount
            return n

        return await self._write(write)


class SQLiteStorage:
    """Every app's repository on one SQLite file (the single-process default).

    ``make_app`` asks this for each app's repository; a cluster storage (Redis)
    answers the same calls, so the services never know which one they run on."""

    name = "sqlite"

    def __init__(self, store: SQLiteStore) -> None:
        self.store = store
        self._schemas: list[Schema] = []

    def _uses(self, schema: Schema) -> None:
        if schema not in self._schemas:
            self._schemas.append(schema)

    def chat_log(self, keep: int, topic: Callable[[str], str] | None = None) -> SQLiteChatLog:
        self._uses(CHAT_SCHEMA)
        return SQLiteChatLog(self.store, keep)

    def document_log(self) -> SQLiteDocumentLog:
        self._uses(DOCS_SCHEMA)
        return SQLiteDocumentLog(self.store)

    def reading_store(self) -> SQLiteReadingStore:
        self._uses(SENSORS_SCHEMA)
        return SQLiteReadingStore(self.store)

    @property
    def degraded(self) -> str | None:
        """Why writes fail right now (the database's error), or None."""
        return self.store.write_error

    lease = None  # one process runs every feed itself

    def presence_store(self) -> None:
        """One process knows its members itself: no shared presence."""
        return None

    async def open(self) -> None:
        """Create or migrate the tables of the repositories handed out."""
        await self.store.open(self._schemas)

    async def close(self) -> None:
        await self.store.close()
