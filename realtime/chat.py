"""Chat rooms: durable messages with per-room sequence numbers, resume, presence.

Contracts:

* A message is acknowledged (``ack``) and broadcast only after its SQLite
  transaction has committed.  Its ``seq`` is assigned inside that transaction,
  so sequence numbers have no gaps and are in commit order.
* A ``say`` with a ``cid`` that this user already used in this room is
  acknowledged again with the first ``seq``; it is neither stored nor broadcast
  twice (the check runs inside the writing transaction, so it also holds across
  restarts and for retries that race the first attempt).
* Joining subscribes first, reads history second, then releases the live
  messages buffered meanwhile, dropping those the history already had: nothing
  is lost or doubled at the seam.
* Each room has an ``epoch``; a client that resumes with another epoch (the store
  was reset) or from before the kept history gets ``recovered: false`` and the
  recent history instead.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import secrets
import sqlite3
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from realtime.auth import Identity
from realtime.hub import Hub
from realtime.protocol import Outgoing, ProtocolError, has_control_chars
from realtime.storage.sqlite import Schema, SQLiteStore, StoreBusy

log = logging.getLogger("realtime.chat")

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
        """
    ],
)

_ROOM_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_CID_MAX = 64


def valid_room(name: object) -> bool:
    """A room name: 1-64 of ``A-Z a-z 0-9 _ . -``, starting with a letter or digit."""
    return isinstance(name, str) and bool(_ROOM_RE.match(name))


def check_text(text: object, max_len: int) -> str:
    """The text of a chat message, or ProtocolError.  Tabs and newlines are allowed."""
    if not isinstance(text, str):
        raise ProtocolError("bad_message", "'text' must be a string")
    if not text.strip():
        raise ProtocolError("bad_message", "message text is empty")
    if len(text) > max_len:
        raise ProtocolError("too_large", "message text is longer than %d characters" % max_len)
    if has_control_chars(text):
        raise ProtocolError("bad_message", "message text contains control characters")
    return text


@dataclass(frozen=True)
class ResumePlan:
    recovered: bool
    after: int  # send the messages with seq > after ...
    limit: int  # ... at most this many (the newest of them when not recovered)


def resume_plan(
    *,
    epoch: str,
    last_seq: int,
    oldest_seq: int,
    since: int | None,
    client_epoch: str | None,
    history_size: int,
    resume_max: int,
) -> ResumePlan:
    """What a joining client gets.

    ``oldest_seq`` is the oldest seq still kept (``last_seq + 1`` when the room
    keeps nothing).  Without ``since``: the last ``history_size`` messages.  With
    ``since`` in the same epoch, not ahead of the room, and nothing trimmed after
    it: exactly the messages after ``since`` (``recovered``).  Otherwise recent
    history, ``recovered`` false.
    """
    recent = ResumePlan(False, max(0, last_seq - history_size), history_size)
    if since is None:
        return recent
    if client_epoch != epoch or since > last_seq or since < oldest_seq - 1:
        return recent
    if last_seq - since > resume_max:
        return recent
    return ResumePlan(True, since, last_seq - since)


def message_row(row: sqlite3.Row | tuple[Any, ...], room: str) -> dict[str, Any]:
    seq, user_id, name, text, ts, cid = row
    msg = {"type": "message", "room": room, "seq": seq, "user": user_id, "name": name,
           "text": text, "ts": ts}
    if cid is not None:
        msg["cid"] = cid
    return msg


class RoomState:
    """A room as this process knows it: epoch, last committed seq, recent messages."""

    def __init__(self, name: str, epoch: str, last_seq: int, oldest_seq: int, cache_size: int) -> None:
        self.name = name
        self.epoch = epoch
        self.last_seq = last_seq
        self.oldest_seq = oldest_seq  # oldest kept in the store
        self.recent: deque[dict[str, Any]] = deque(maxlen=cache_size)

    def committed(self, msg: dict[str, Any], keep: int) -> None:
        if msg["seq"] > self.last_seq:
            self.last_seq = msg["seq"]
            self.recent.append(msg)
            self.oldest_seq = max(self.oldest_seq, self.last_seq - keep + 1)

    def cached_after(self, after: int, limit: int) -> list[dict[str, Any]] | None:
        """Messages with seq > after from memory, or None if memory lacks some."""
        if after >= self.last_seq:
            return []
        if not self.recent or self.recent[0]["seq"] > after + 1:
            return None
        start = after + 1 - self.recent[0]["seq"]
        msgs = list(self.recent)[start:]
        return msgs[-limit:] if limit < len(msgs) else msgs


class Presence:
    """Who is in which room on this node; a user with several connections counts once."""

    def __init__(self) -> None:
        self._rooms: dict[str, dict[str, list[Any]]] = {}

    def add(self, room: str, user: Identity) -> bool:
        """Count one more connection; True if the user was not there before (or
        is there under another name: a rename is announced as a join)."""
        members = self._rooms.setdefault(room, {})
        entry = members.get(user.id)
        if entry is None:
            members[user.id] = [user.name, 1]
            return True
        entry[1] += 1
        if entry[0] != user.name:  # renamed in another tab: announce the new name
            entry[0] = user.name
            return True
        return False

    def remove(self, room: str, user: Identity) -> bool:
        """Count one connection less; True if that was the user's last one."""
        members = self._rooms.get(room)
        if not members or user.id not in members:
            return False
        entry = members[user.id]
        entry[1] -= 1
        if entry[1] > 0:
            return False
        del members[user.id]
        if not members:
            del self._rooms[room]
        return True

    def members(self, room: str, limit: int) -> list[dict[str, str]]:
        members = self._rooms.get(room, {})
        out: list[dict[str, str]] = []
        for uid, (name, _) in members.items():
            if len(out) >= limit:
                break
            out.append({"id": uid, "name": name})
        return out

    def count(self, room: str) -> int:
        return len(self._rooms.get(room, ()))

    def rooms(self) -> list[str]:
        return list(self._rooms)


class PresenceBatch:
    """Presence changes of one room within one coalescing window.

    A user who joins and leaves within the window cancels out.  ``message``
    turns the batch into one ``presence`` message: the single-event shape for
    one change, a ``diff`` for a few, a ``sync`` (member count and the first
    members) for a mass change, so N members reconnecting at once cost O(N)
    messages, not O(N^2).
    """

    def __init__(self) -> None:
        self.joined: dict[str, dict[str, str]] = {}
        self.left: dict[str, dict[str, str]] = {}

    def join(self, user: dict[str, str]) -> None:
        prev = self.left.pop(user["id"], None)
        if prev is None or prev["name"] != user["name"]:
            # A leave and rejoin under a new name (a rename) is a change.
            self.joined[user["id"]] = user

    def leave(self, user: dict[str, str]) -> None:
        if self.joined.pop(user["id"], None) is None:
            self.left[user["id"]] = user

    def __len__(self) -> int:
        return len(self.joined) + len(self.left)

    def message(self, room: str, count: int, members: Callable[[], list[dict[str, str]]],
                diff_max: int) -> dict[str, Any] | None:
        n = len(self)
        if n == 0:
            return None
        if n == 1:
            if self.joined:
                return {"type": "presence", "room": room, "event": "join",
                        "user": next(iter(self.joined.values())), "member_count": count}
            return {"type": "presence", "room": room, "event": "leave",
                    "user": next(iter(self.left.values())), "member_count": count}
        if n <= diff_max:
            return {"type": "presence", "room": room, "event": "diff",
                    "joined": list(self.joined.values()), "left": list(self.left.values()),
                    "member_count": count}
        return {"type": "presence", "room": room, "event": "sync", "members": members(),
                "member_count": count}


class Member(Protocol):
    """A connection as the chat core sees it."""

    user: Identity

    def deliver(self, out: Outgoing) -> None: ...

    def send(self, obj: dict[str, Any]) -> None: ...


class RoomSubscription:
    """One member's subscription to one room's topic.

    While ``buffering`` (between subscribing and sending the history), live
    messages are held; :meth:`release` sends those the history did not have.
    """

    __slots__ = ("member", "room", "buffering", "buffer", "last_sent")

    def __init__(self, member: Member, room: str) -> None:
        self.member = member
        self.room = room
        self.buffering = True
        self.buffer: list[Outgoing] = []
        self.last_sent = 0

    def deliver(self, out: Outgoing) -> None:
        if self.buffering:
            self.buffer.append(out)
            return
        seq = out.seq
        if seq is not None:
            if seq <= self.last_sent:
                return
            self.last_sent = seq
        self.member.deliver(out)

    def release(self, upto: int) -> None:
        self.last_sent = upto
        self.buffering = False
        held, self.buffer = self.buffer, []
        for out in held:
            self.deliver(out)


class ChatService:
    """Rooms, history, presence and typing, over a store and a hub."""

    def __init__(self, store: SQLiteStore, hub: Hub, *, history_size: int = 50,
                 history_keep: int = 1000, max_text: int = 2000, max_rooms: int = 20,
                 members_max: int = 100, presence_window: float = 0.1,
                 presence_diff_max: int = 50, typing_interval: float = 1.0) -> None:
        self.store = store
        self.hub = hub
        self.history_size = history_size
        self.history_keep = max(history_keep, history_size)
        self.max_text = max_text
        self.max_rooms = max_rooms
        self.members_max = members_max
        self.presence_window = presence_window
        self.presence_diff_max = presence_diff_max
        self.typing_interval = typing_interval
        self.presence = Presence()
        self._rooms: dict[str, RoomState] = {}
        self._loading: dict[str, asyncio.Future[RoomState]] = {}
        self._batches: dict[str, PresenceBatch] = {}
        self._flush_handle: asyncio.TimerHandle | None = None
        self.messages_stored = 0

    @staticmethod
    def topic(room: str) -> str:
        return "chat:" + room

    # -- rooms -----------------------------------------------------------

    async def room(self, name: str, create: bool = True) -> RoomState:
        """The room's state, created in the store on first use (``create``), else
        ProtocolError not_found for a room that never existed."""
        state = self._rooms.get(name)
        if state is not None:
            return state
        if not create:
            exists = await self.store.read(
                lambda conn: conn.execute("SELECT 1 FROM rooms WHERE name=?", (name,)).fetchone())
            if not exists:
                raise ProtocolError("not_found", "no room named %s" % name)
        fut = self._loading.get(name)
        if fut is None:
            fut = asyncio.ensure_future(self._load_room(name))
            self._loading[name] = fut
            fut.add_done_callback(lambda _f: self._loading.pop(name, None))
        return await asyncio.shield(fut)

    async def _load_room(self, name: str) -> RoomState:
        keep = self.history_keep

        def load(conn: sqlite3.Connection) -> tuple[str, int, int, list[tuple[Any, ...]]]:
            conn.execute(
                "INSERT OR IGNORE INTO rooms(name, epoch, last_seq, created) VALUES (?, ?, 0, ?)",
                (name, secrets.token_hex(8), time.time()),
            )
            epoch, last_seq = conn.execute(
                "SELECT epoch, last_seq FROM rooms WHERE name=?", (name,)
            ).fetchone()
            row = conn.execute("SELECT MIN(seq) FROM messages WHERE room=?", (name,)).fetchone()
            oldest = row[0] if row[0] is not None else last_seq + 1
            recent = conn.execute(
                "SELECT seq, user_id, name, text, ts, cid FROM messages WHERE room=? "
                "ORDER BY seq DESC LIMIT ?", (name, self.history_size),
            ).fetchall()
            return epoch, last_seq, max(oldest, last_seq - keep + 1), recent[::-1]

        epoch, last_seq, oldest, recent = await self.store.write(load)
        state = self._rooms.get(name)
        if state is None:
            state = RoomState(name, epoch, last_seq, oldest, max(self.history_size, 200))
            for row in recent:
                state.recent.append(message_row(tuple(row), name))
            self._rooms[name] = state
        return state

    async def history(self, room: RoomState, after: int, limit: int, *,
                      newest: bool = True) -> list[dict[str, Any]]:
        """Up to ``limit`` committed messages with seq > after, in seq order: the
        newest ones if there are more (``newest``), else the oldest ones."""
        cached = room.cached_after(after, limit)
        if cached is not None and (newest or len(cached) < limit):
            return cached
        name = room.name
        order = "DESC" if newest else "ASC"

        def read(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
            rows = conn.execute(
                "SELECT seq, user_id, name, text, ts, cid FROM messages WHERE room=? AND seq>? "
                "ORDER BY seq %s LIMIT ?" % order, (name, after, limit),
            ).fetchall()
            return [tuple(r) for r in (rows[::-1] if newest else rows)]

        return [message_row(r, name) for r in await self.store.read(read)]

    # -- membership ------------------------------------------------------

    async def join(self, member: Member, subs: dict[str, RoomSubscription], name: str,
                   since: int | None, epoch: str | None) -> dict[str, Any]:
        """Subscribe ``member`` to ``name`` and return the ``joined`` message.

        The caller sends it, then calls ``subs[name].release(reply["seq"])``."""
        if not valid_room(name):
            raise ProtocolError("bad_message", "room names are 1-64 letters, digits, '_', '.' or '-'")
        if name in subs:
            raise ProtocolError("conflict", "already in room %s" % name)
        if len(subs) >= self.max_rooms:
            raise ProtocolError("too_large", "at most %d rooms per connection" % self.max_rooms)
        sub = RoomSubscription(member, name)
        subs[name] = sub
        self.hub.subscribe(self.topic(name), sub)
        try:
            room = await self.room(name)
            plan = resume_plan(epoch=room.epoch, last_seq=room.last_seq, oldest_seq=room.oldest_seq,
                               since=since, client_epoch=epoch, history_size=self.history_size,
                               resume_max=self.history_keep)
            upto = room.last_seq
            if plan.recovered:
                messages = await self.history(room, plan.after, self.history_keep, newest=False)
            else:
                messages = await self.history(room, plan.after, plan.limit)
        except BaseException:
            subs.pop(name, None)
            self.hub.unsubscribe(self.topic(name), sub)
            raise
        if messages:
            upto = max(upto, messages[-1]["seq"])
        if subs.get(name) is sub:  # still subscribed (the member may have left meanwhile)
            if self.presence.add(name, member.user):
                self._presence_change(name, "join", member.user)
        return {"type": "joined", "room": name, "epoch": room.epoch, "seq": upto,
                "recovered": plan.recovered, "messages": messages,
                "members": self.presence.members(name, self.members_max),
                "member_count": self.presence.count(name)}

    def leave(self, member: Member, subs: dict[str, RoomSubscription], name: str) -> bool:
        sub = subs.pop(name, None)
        if sub is None:
            return False
        self.hub.unsubscribe(self.topic(name), sub)
        if self.presence.remove(name, member.user):
            self._presence_change(name, "leave", member.user)
        if self.hub.subscribers(self.topic(name)) == 0 and not self._batches.get(name):
            self._rooms.pop(name, None)
        return True

    def leave_all(self, member: Member, subs: dict[str, RoomSubscription]) -> None:
        for name in list(subs):
            self.leave(member, subs, name)

    def _presence_change(self, room: str, event: str, user: Identity) -> None:
        batch = self._batches.get(room)
        if batch is None:
            batch = self._batches[room] = PresenceBatch()
        (batch.join if event == "join" else batch.leave)(user.to_json())
        if self._flush_handle is None:
            loop = asyncio.get_running_loop()
            self._flush_handle = loop.call_later(self.presence_window, self.flush_presence)

    def flush_presence(self) -> None:
        self._flush_handle = None
        batches, self._batches = self._batches, {}
        for room, batch in batches.items():
            msg = batch.message(room, self.presence.count(room),
                                functools.partial(self.presence.members, room, self.members_max),
                                self.presence_diff_max)
            if msg is not None:
                self.hub.publish(self.topic(room), msg)

    # -- messages --------------------------------------------------------

    async def say(self, user: Identity, name: str, text: object, cid: object,
                  reply: Callable[[dict[str, Any]], None]) -> None:
        """Store one message; after commit, ``reply(ack)`` to the sender, then
        broadcast the message to the room (unless it was a retry)."""
        text = check_text(text, self.max_text)
        if cid is not None and (not isinstance(cid, str) or not cid or len(cid) > _CID_MAX):
            raise ProtocolError("bad_message", "'cid' must be a string of 1-%d characters" % _CID_MAX)
        room = await self.room(name)
        ts = int(time.time() * 1000)

        def append(conn: sqlite3.Connection) -> tuple[int, int, bool]:
            if cid is not None:
                row = conn.execute(
                    "SELECT seq, ts FROM messages WHERE room=? AND user_id=? AND cid=?",
                    (name, user.id, cid),
                ).fetchone()
                if row is not None:
                    return row[0], row[1], True
            seq = conn.execute(
                "UPDATE rooms SET last_seq=last_seq+1 WHERE name=? RETURNING last_seq", (name,)
            ).fetchone()[0]
            conn.execute(
                "INSERT INTO messages(room, seq, user_id, name, text, ts, cid) VALUES (?,?,?,?,?,?,?)",
                (name, seq, user.id, user.name, text, ts, cid),
            )
            if seq % 100 == 0 and seq > self.history_keep:
                conn.execute("DELETE FROM messages WHERE room=? AND seq<=?", (name, seq - self.history_keep))
            return seq, ts, False

        try:
            seq, stored_ts, duplicate = await self.store.write(append)
        except StoreBusy:
            raise ProtocolError("unavailable", "the server is overloaded; retry shortly")
        except sqlite3.Error as e:
            # Disk full, I/O error: nothing was stored; the client may retry with its cid.
            log.error("storing a message in %s failed: %s", name, e)
            raise ProtocolError("unavailable", "the message could not be stored; retry shortly")
        ack: dict[str, Any] = {"type": "ack", "room": name, "seq": seq}
        if cid is not None:
            ack["cid"] = cid
        if duplicate:
            ack["duplicate"] = True
            reply(ack)
            return
        reply(ack)
        self.messages_stored += 1
        msg = {"type": "message", "room": name, "seq": seq, "user": user.id, "name": user.name,
               "text": text, "ts": stored_ts}
        if cid is not None:
            msg["cid"] = cid
        state = self._rooms.get(name, room)
        state.committed(msg, self.history_keep)
        self.hub.publish(self.topic(name), Outgoing(msg, seq=seq))

    def typing(self, user: Identity, name: str) -> None:
        self.hub.publish(self.topic(name), {"type": "typing", "room": name, "user": user.to_json()})

    # -- HTTP ------------------------------------------------------------

    async def messages_since(self, name: str, since: int | None, limit: int) -> dict[str, Any]:
        """History over HTTP: without ``since`` the newest ``limit`` messages,
        with it the oldest ``limit`` after it (page forward with the last seq).
        ``complete`` is false when messages after ``since`` were already trimmed."""
        room = await self.room(name, create=False)
        limit = max(1, min(limit, self.history_keep))
        if since is None:
            msgs = await self.history(room, max(0, room.last_seq - limit), limit)
        else:
            msgs = await self.history(room, since, limit, newest=False)
        return {"room": name, "epoch": room.epoch, "seq": room.last_seq,
                "oldest": room.oldest_seq, "messages": msgs,
                "complete": since is None or since >= room.oldest_seq - 1}

    async def room_list(self) -> list[dict[str, Any]]:
        def read(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
            return [tuple(r) for r in conn.execute(
                "SELECT name, last_seq FROM rooms ORDER BY name LIMIT 1000").fetchall()]

        rows = await self.store.read(read)
        return [{"room": n, "seq": s, "members": self.presence.count(n)} for n, s in rows]
