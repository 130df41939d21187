"""What each app needs from its storage: one small interface per app.

The services (:mod:`realtime.chat`, :mod:`realtime.editing`,
:mod:`realtime.sensors`) hold the rules -- the join seam, dedupe, transform,
conflation -- and reach what must last only through these interfaces.  SQLite
implements them for one process (:mod:`realtime.storage.sqlite_repos`); a
cluster implementation is a sibling, and ``tests/contract`` runs the same
suite against every one.

Contract common to all of them: a method that writes resolves **only after
the write is durable** (committed, fsynced as configured).  When it raises
:class:`StorageError` nothing was stored and the caller may retry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Awaitable, NamedTuple, Protocol


class StorageError(Exception):
    """The write did not happen (disk full, I/O error, store unreachable); retry."""


class StoreBusy(StorageError):
    """Too many writes are waiting: the caller should refuse, not queue more."""


class StoreClosed(StorageError):
    """The store is shutting down."""


# -- chat ---------------------------------------------------------------------------


@dataclass
class RoomRecord:
    """A room as stored: its epoch, the last seq, the oldest seq still kept
    (``last_seq + 1`` when nothing is kept) and its newest messages."""

    epoch: str
    last_seq: int
    oldest_seq: int
    recent: list[dict[str, Any]] = field(default_factory=list)


class Appended(NamedTuple):
    seq: int
    ts: int
    duplicate: bool  # the cid was used before: seq/ts are the first attempt's


class TooManyRooms(StorageError):
    pass


class ChatLog(Protocol):
    """Each room: an epoch, a gap-free sequence of messages, the newest ``keep`` kept."""

    #: True when ``append`` itself sends the stored message to the other nodes
    #: (atomically with storing it); the service then hands it only to this node.
    broadcasts: bool

    async def open_room(self, room: str, recent: int, max_rooms: int = 0) -> RoomRecord:
        """The room, created (with a fresh epoch) if it does not exist
        (:class:`TooManyRooms` if ``max_rooms`` rooms exist already; 0 = no limit)."""

    async def drop_if_empty(self, room: str) -> bool:
        """Remove the room if no message was ever said in it (its last member
        left); whether it was removed.  A store shared by several nodes may
        keep it (another node may have members) and return False."""

    async def find_room(self, room: str, recent: int) -> RoomRecord | None:
        """The room, or None if it was never created (nothing is created)."""

    async def append(self, room: str, user_id: str, name: str, text: str, ts: int,
                     cid: str | None) -> Appended:
        """Store one message with the next seq, unless ``(room, user_id, cid)``
        was stored before (then its first seq and ts, ``duplicate``)."""

    async def read(self, room: str, after: int, limit: int, newest: bool) -> list[dict[str, Any]]:
        """Up to ``limit`` messages with seq > ``after`` in seq order: the newest
        of them (``newest``) or the oldest."""

    async def rooms(self, limit: int) -> list[tuple[str, int]]:
        """``(name, last_seq)`` of stored rooms, the most recently active
        (created or said in) first."""


def message_json(room: str, seq: int, user_id: str, name: str, text: str, ts: int,
                 cid: str | None) -> dict[str, Any]:
    """The ``message`` shape of docs/PROTOCOL.md, as every store returns it."""
    msg = {"type": "message", "room": room, "seq": seq, "user": user_id, "name": name, "text": text, "ts": ts}
    if cid is not None:
        msg["cid"] = cid
    return msg


class PresenceStore(Protocol):
    """Who is in each room across nodes (cluster mode).  An entry is one
    node's view of one user (``key`` = node id + user id) and expires ``ttl``
    seconds after it was last written unless refreshed."""

    async def enter(self, room: str, key: str, user_id: str, name: str, ttl: float) -> None: ...

    async def leave(self, room: str, key: str) -> None: ...

    async def leave_all(self, entries: list[tuple[str, str]]) -> None:
        """``(room, key)`` pairs: a node that stops cleanly."""

    async def refresh(self, entries: list[tuple[str, str, str, str]], ttl: float) -> None:
        """``(room, key, user_id, name)``: keep these alive (and back, if they expired)."""

    async def members(self, room: str) -> dict[str, str]:
        """The room's live members, ``user id -> name`` (each user once), in join order."""


# -- documents --------------------------------------------------------------------------


class TooManyDocuments(StorageError):
    pass


class LogGap(StorageError):
    """A write for a revision that does not follow the stored one."""


class StoredOp(NamedTuple):
    rev: int
    op: str  # JSON
    client: str | None
    seq: int | None
    user_id: str | None


@dataclass
class Loaded:
    rev: int
    updated: int
    snapshot: tuple[int, int, str] | None  # (rev, format, data)
    ops: list[StoredOp]


class DocumentLog(Protocol):
    """Each document: a revision, a gap-free op log, its newest snapshot."""

    @property
    def overloaded(self) -> bool:
        """Writes are piling up: refuse new edits for a moment."""

    async def load(self, doc_id: str, *, create: bool, max_docs: int, keep: int) -> Loaded | None:
        """The newest snapshot and the ops after it (and ``keep`` before it).
        ``create``: a new empty document if none (:class:`TooManyDocuments` past
        ``max_docs``, 0 = no limit); otherwise None for a missing one."""

    def append(self, doc_id: str, ops: list[StoredOp], length: int, ts: int,
               snapshots: list[tuple[int, str]], keep: int) -> Awaitable[None]:
        """Compare-and-append: store ``ops`` only if the stored revision is
        ``ops[0].rev - 1`` (else :class:`LogGap`), with any snapshots, and trim
        the log to ``keep`` ops before the newest snapshot."""

    async def ops_since(self, doc_id: str, rev: int) -> list[StoredOp] | None:
        """The stored ops after ``rev``, in order; None when the log no longer
        reaches back to ``rev`` (or the document is gone)."""

    def save_snapshot(self, doc_id: str, rev: int, data: str, keep: int) -> Awaitable[bool]:
        """Store a snapshot of ``rev`` if that is the stored revision (else False)."""

    async def list(self, limit: int) -> list[tuple[str, int, int, int, int]]:
        """``(id, rev, length, created, updated)``, most recently edited first."""

    async def drop_if_empty(self, doc_id: str) -> bool:
        """Remove the document if it was never edited (revision 0); whether it was."""


class Lease(Protocol):
    """A role one node holds for the whole cluster at a time (running the
    simulated sensors): kept while the holder renews it, taken over by
    another node within its time-to-live once the holder stops renewing."""

    held: bool

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


# -- sensors ------------------------------------------------------------------------------


class SensorRow(NamedTuple):
    id: str
    label: str
    unit: str
    rate_hz: float


class ReadingStore(Protocol):
    """Device sensors: their metadata and recent readings."""

    async def load(self, since: float, max_points: int) -> list[tuple[SensorRow, list[tuple[float, float]]]]:
        """Every stored sensor with its newest readings (at most ``max_points``) after ``since``."""

    async def append(self, meta: SensorRow, points: list[tuple[float, float]], now: float) -> None:
        """Store readings; the sensor's metadata is created from ``meta`` if missing."""

    async def set_meta(self, meta: SensorRow, now: float) -> None:
        """Create or update the sensor's metadata."""

    async def delete(self, sensor_id: str) -> None:
        """Remove the sensor and its readings."""

    async def trim(self, sensor_ids: list[str], cutoff: float, max_points: int) -> int:
        """Drop readings older than ``cutoff`` and past the newest ``max_points``; how many."""
