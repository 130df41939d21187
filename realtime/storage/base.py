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


#: A room's kind: anyone may join a ``public`` one; only its stored members
#: may read or write a ``private`` one or a ``dm`` (a direct-message room of two).
ROOM_KINDS = ("public", "private", "dm")
#: A stored member row's role: ``owner`` and ``member`` may read a private
#: room; ``banned`` keeps a user out of a public one.
MEMBER_ROLES = ("owner", "member", "banned")


@dataclass
class RoomRecord:
    """A room as stored: its epoch, the last seq, the oldest seq still kept
    (``last_seq + 1`` when nothing is kept), its newest entries, its kind and
    (private rooms) its owner."""

    epoch: str
    last_seq: int
    oldest_seq: int
    recent: list[dict[str, Any]] = field(default_factory=list)
    kind: str = "public"
    owner: str | None = None


class Appended(NamedTuple):
    seq: int
    ts: int
    duplicate: bool  # the cid was used before: seq/ts are the first attempt's


class TooManyRooms(StorageError):
    pass


class RoomExists(StorageError):
    """A room of that name exists already (creating a private room)."""


class NotAMember(StorageError):
    """The user may not write to this room: not a member of a private room or
    a direct-message room, or banned from a public one.  Nothing was stored."""


class NoSuchMessage(StorageError):
    """Deleting a seq that is not a message the room still keeps."""


def may_read(kind: str, role: str | None) -> bool:
    """Whether a user whose stored role in a room of ``kind`` is ``role`` may
    read it and write to it (the one rule every store applies)."""
    if kind == "public":
        return role != "banned"
    return role in ("owner", "member")


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

    async def listen(self, rooms: list[str], ttl: float) -> list[str]:
        """This node has members in ``rooms``: what is stored in them from now on
        (by any node) reaches this node's hub for the next ``ttl`` seconds
        (renew before it ends).  Returns the rooms this node was not listening
        to before, which may have missed entries meanwhile.  A log that does
        not broadcast has nothing to route and returns []."""

    async def append(self, room: str, user_id: str, name: str, text: str, ts: int,
                     cid: str | None) -> Appended:
        """Store one message with the next seq, unless ``(room, user_id, cid)``
        was stored before (then its first seq and ts, ``duplicate``).
        :class:`NotAMember` (nothing stored) when :func:`may_read` says the
        user may not write there, checked in the same transaction."""

    async def read(self, room: str, after: int, limit: int, newest: bool) -> list[dict[str, Any]]:
        """Up to ``limit`` entries with seq > ``after`` in seq order: the newest
        of them (``newest``) or the oldest.  Entries are messages (a deleted
        one as :func:`redacted`), tombstones and membership changes."""

    async def rooms(self, limit: int, user_id: str | None = None) -> list[tuple[str, int]]:
        """``(name, last_seq)`` of the stored rooms ``user_id`` may read (every
        public room; private and dm rooms only where it is a member; None: public
        only), the most recently active (created or said in) first."""

    # -- private rooms, membership, moderation --------------------------------

    async def create_room(self, room: str, kind: str, owner: str | None, members: list[str], recent: int,
                          max_rooms: int = 0) -> RoomRecord:
        """Create a ``private`` or ``dm`` room with its member rows (``owner``
        as ``owner``, the others as ``member``).  :class:`RoomExists` if the
        name is taken -- except a ``dm`` asked for again, which is returned."""

    async def role(self, room: str, user_id: str) -> str | None:
        """The user's stored role in the room (see :data:`MEMBER_ROLES`), or None."""

    async def members(self, room: str, limit: int) -> list[tuple[str, str]]:
        """``(user_id, role)`` rows of the room, the owner first, then by user id."""

    async def set_member(self, room: str, user_id: str, role: str | None, event: str, by_id: str,
                         by_name: str, ts: int) -> Appended:
        """Store the user's role (None: remove the row) and append a membership
        entry (:func:`member_json`, ``event`` "added" or "removed") with the
        next seq, in one transaction."""

    async def delete(self, room: str, target: int, by_id: str, by_name: str, ts: int) -> Appended:
        """Erase message ``target``'s text (later reads return it
        :func:`redacted`) and append a tombstone (:func:`tombstone_json`) with
        the next seq, in one transaction.  A message deleted before: its
        tombstone's seq, ``duplicate``.  :class:`NoSuchMessage` if ``target``
        is not a message the room keeps."""


def message_json(room: str, seq: int, user_id: str, name: str, text: str, ts: int,
                 cid: str | None) -> dict[str, Any]:
    """The ``message`` shape of docs/PROTOCOL.md, as every store returns it."""
    msg = {"type": "message", "room": room, "seq": seq, "user": user_id, "name": name, "text": text, "ts": ts}
    if cid is not None:
        msg["cid"] = cid
    return msg


def redacted(msg: dict[str, Any]) -> dict[str, Any]:
    """A deleted message as every later read returns it: no text, ``deleted``."""
    out = {**msg, "text": ""}
    out["deleted"] = True
    return out


def tombstone_json(room: str, seq: int, target: int, by_id: str, by_name: str, ts: int) -> dict[str, Any]:
    """The entry that deletes message ``target``, in seq order with the messages."""
    return {"type": "deleted", "room": room, "seq": seq, "target": target,
            "by": {"id": by_id, "name": by_name}, "ts": ts}


def member_json(room: str, seq: int, event: str, user_id: str, by_id: str, by_name: str,
                ts: int) -> dict[str, Any]:
    """A membership change (``added`` / ``removed``), in seq order with the messages."""
    return {"type": "member", "room": room, "seq": seq, "event": event, "user": user_id,
            "by": {"id": by_id, "name": by_name}, "ts": ts}


class PresenceStore(Protocol):
    """Who is in each room across nodes (cluster mode).  An entry is one
    node's view of one user (``key`` = node id + user id) and expires ``ttl``
    seconds after it was last written unless refreshed."""

    async def enter(self, room: str, key: str, user_id: str, name: str, ttl: float) -> None: ...

    async def leave(self, room: str, key: str) -> None: ...

    async def leave_all(self, entries: list[tuple[str, str]]) -> None:
        """``(room, key)`` pairs: a node that stops cleanly."""

    async def refresh(self, entries: list[tuple[str, str, str, str]], ttl: float) -> set[str]:
        """``(room, key, user_id, name)``: keep these alive (and back, if they
        expired), and drop the entries of these rooms that expired.  Returns
        the rooms whose member list this changed (an entry dropped or written
        back), which everyone there must re-read."""

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

    async def renew(self) -> bool:
        """Take the lease if nobody holds it, or extend ours; whether we hold it now."""

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

    broadcasts: bool  # append() with a notice also sends it to the other nodes, in the same write

    async def append(self, meta: SensorRow, points: list[tuple[float, float]], now: float,
                     notice: tuple[str, Any] | None = None) -> None:
        """Store readings; the sensor's metadata is created from ``meta`` if missing.

        ``notice``: ``(topic, message)`` for the other nodes; a store that
        ``broadcasts`` publishes it atomically with the readings (so a node
        that dies right after the write cannot leave them stored but unsent);
        others ignore it and the service publishes."""

    async def set_meta(self, meta: SensorRow, now: float) -> None:
        """Create or update the sensor's metadata."""

    async def delete(self, sensor_id: str) -> None:
        """Remove the sensor and its readings."""

    async def trim(self, sensor_ids: list[str], cutoff: float, max_points: int) -> int:
        """Drop readings older than ``cutoff`` and past the newest ``max_points``; how many."""
