"""Chat rooms: durable messages with per-room sequence numbers, resume, presence.

Contracts:

* A message is acknowledged (``ack``) and broadcast only after the chat log
  (:class:`~realtime.storage.base.ChatLog`: SQLite, or Redis in a cluster)
  has stored it.  Its ``seq`` is assigned by that store, so sequence numbers
  have no gaps and are in commit order.
* A ``say`` with a ``cid`` that this user already used in this room is
  acknowledged again with the first ``seq``; it is neither stored nor broadcast
  twice (the check runs inside the writing transaction, so it also holds across
  restarts and for retries that race the first attempt).
* Joining subscribes first, reads history second, then releases the live
  messages buffered meanwhile, dropping those the history already had: nothing
  is lost or doubled at the seam.
* Each node has one :class:`RoomRelay` per room with local members: it keeps
  the room's state current from what arrives on the room's topic (from any
  node), fills any gap in the seqs from the log before passing messages on,
  and so hands every member each message once, in seq order.
* Each room has an ``epoch``; a client that resumes with another epoch (the store
  was reset) or from before the kept history gets ``recovered: false`` and the
  recent history instead.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import re
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from realtime.auth import Identity, valid_user_id
from realtime.hub import Hub
from realtime.protocol import Outgoing, ProtocolError, has_control_chars
from realtime.storage.base import (
    ChatLog,
    NoSuchMessage,
    NotAMember,
    PresenceStore,
    RoomExists,
    RoomRecord,
    StorageError,
    StoreBusy,
    TooManyRooms,
    may_read,
    member_json,
    redacted,
    tombstone_json,
)

log = logging.getLogger("realtime.chat")

_ROOM_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_CID_MAX = 64


def valid_room(name: object) -> bool:
    """A room name: 1-64 of ``A-Z a-z 0-9 _ . -``, starting with a letter or digit."""
    return isinstance(name, str) and bool(_ROOM_RE.match(name))


DM_PREFIX = "dm-"  # reserved: only direct-message rooms have names starting so


def dm_room(a: str, b: str) -> str:
    """The name of the direct-message room of users ``a`` and ``b`` (either
    order): ``dm-`` and the first 32 hex digits of SHA-256 over
    ``<length of the smaller id>:<smaller id><larger id>`` (UTF-8)."""
    lo, hi = sorted((a, b))
    return DM_PREFIX + hashlib.sha256(("%d:%s%s" % (len(lo), lo, hi)).encode("utf-8")).hexdigest()[:32]


#: Asked just before a room is actually created (never for one that exists):
#: whether the creator's budget allows it (see realtime.limits.PerAddressBudget).
MayCreate = Callable[[], bool]

ROOM_CREATES_LIMITED = ("creating rooms is limited per address and this one is over its budget;"
                        " join an existing room, or retry in a minute")


def check_create(may_create: MayCreate | None) -> None:
    """ProtocolError ``rate_limited`` if ``may_create`` refuses a creation."""
    if may_create is not None and not may_create():
        raise ProtocolError("rate_limited", ROOM_CREATES_LIMITED)


def is_moderator(user: Identity) -> bool:
    """The ``moderator`` role, or ``admin`` (which includes it)."""
    return user.can("moderator")


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


class RoomState:
    """A room as this process knows it: epoch, last committed seq, recent messages."""

    def __init__(self, name: str, epoch: str, last_seq: int, oldest_seq: int, cache_size: int,
                 kind: str = "public", owner: str | None = None) -> None:
        self.name = name
        self.epoch = epoch
        self.last_seq = last_seq
        self.oldest_seq = oldest_seq  # oldest kept in the store
        self.recent: deque[dict[str, Any]] = deque(maxlen=cache_size)
        self.kind = kind  # public, private, dm (realtime.storage.base.ROOM_KINDS)
        self.owner = owner

    def committed(self, msg: dict[str, Any], keep: int) -> None:
        if msg["seq"] > self.last_seq:
            self.last_seq = msg["seq"]
            self.recent.append(msg)
            self.oldest_seq = max(self.oldest_seq, self.last_seq - keep + 1)
            if msg["type"] == "deleted":
                self._redact(msg["target"])

    def _redact(self, target: int) -> None:
        """What the store did to the deleted message, done to the cache (which
        then answers history reads exactly as the store would)."""
        if not self.recent:
            return
        i = target - self.recent[0]["seq"]
        if 0 <= i < len(self.recent) and self.recent[i]["type"] == "message":
            self.recent[i] = redacted(self.recent[i])

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

    __slots__ = ("member", "room", "buffering", "buffer", "last_sent", "subs", "removed")

    def __init__(self, member: Member, room: str, subs: "dict[str, RoomSubscription] | None" = None) -> None:
        self.member = member
        self.room = room
        self.buffering = True
        self.buffer: list[Outgoing] = []
        self.last_sent = 0
        self.subs = subs  # the member's subscriptions, this one among them
        self.removed = False  # the member was removed from the room (a moderator, the owner)

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


PRESENCE_HINT = "presence_hint"  # "re-read this room's presence": between nodes, never to clients
REREAD_EVERY = 12  # presence heartbeats: each room's members are re-read at least this often anyway


class ClusterPresence:
    """Presence across nodes (cluster mode).

    Each node writes its own members into the shared :class:`PresenceStore`,
    as entries that expire unless refreshed: a node refreshes them every
    ``ttl / 3``, and the same call drops the room's expired entries, so the
    members of a node that dies leave everyone's presence within about
    ``ttl`` (the refresh that dropped them, or that wrote back entries of this
    node that had expired, hints the room).  A join or leave anywhere is a hint on the room's topic;
    every node with members in the room then re-reads the room's members
    (coalesced over ``presence_window``) and tells its own members the
    difference from what it told them before, as the same ``presence``
    messages the single-process server sends.  A user with connections on
    several nodes is one member until the last of them leaves.
    """

    def __init__(self, svc: "ChatService", store: PresenceStore, node_id: str, ttl: float) -> None:
        self.svc = svc
        self.store = store
        self.node = node_id
        self.ttl = ttl
        self.views: dict[str, dict[str, str]] = {}  # room -> user id -> name, as told to this node's members
        self._dirty: set[str] = set()
        self._handle: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Future[Any]] = set()
        self._beat: asyncio.Task[None] | None = None
        self._beats = 0

    def _key(self, user_id: str) -> str:
        return self.node + "|" + user_id

    def start(self) -> None:
        self._beat = asyncio.ensure_future(self._heartbeat())

    async def stop(self) -> None:
        if self._beat is not None:
            self._beat.cancel()
        if self._handle is not None:
            self._handle.cancel()
        entries = [(room, self._key(u["id"])) for room in self.svc.presence.rooms()
                   for u in self.svc.presence.members(room, 1 << 30)]
        if entries:
            try:
                await self.store.leave_all(entries)  # a clean stop: the others see the leaves at once
            except StorageError:
                pass
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def baseline(self, room: str) -> None:
        """What this node's first member of ``room`` is told about comes after this."""
        try:
            self.views[room] = await self.store.members(room)
        except StorageError:
            self.views[room] = {}

    async def members(self, room: str, limit: int) -> tuple[list[dict[str, str]], int]:
        try:
            view = await self.store.members(room)
        except StorageError:
            view = self.views.get(room, {})
        listed = [{"id": uid, "name": name} for uid, name in list(view.items())[:limit]]
        return listed, len(view)

    def local_change(self, room: str, event: str, user: Identity) -> None:
        self._spawn(self.write(room, event, user.id, user.name))

    async def write(self, room: str, event: str, user_id: str, name: str) -> None:
        """Store this node's change, then hint every node (this one too) to re-read."""
        try:
            if event == "join":
                await self.store.enter(room, self._key(user_id), user_id, name, self.ttl)
            else:
                await self.store.leave(room, self._key(user_id))
        except StorageError as e:
            log.warning("presence of %s in %s not stored (%s); the heartbeat retries", user_id, room, e)
            return
        self.svc.hub.publish(ChatService.topic(room), {"type": PRESENCE_HINT, "room": room})

    def changed(self, room: str) -> None:
        self._dirty.add(room)
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(self.svc.presence_window, self._flush)

    def _flush(self) -> None:
        self._handle = None
        rooms, self._dirty = self._dirty, set()
        self._spawn(self._announce(rooms))

    async def _announce(self, rooms: set[str]) -> None:
        svc = self.svc
        for room in rooms:
            relay = svc._relays.get(room)
            if relay is None:
                self.views.pop(room, None)
                continue
            try:
                view = await self.store.members(room)
            except StorageError:
                continue
            old = self.views.get(room, {})
            self.views[room] = view
            batch = PresenceBatch()
            for uid, name in old.items():
                if view.get(uid) != name:
                    batch.leave({"id": uid, "name": name})
            for uid, name in view.items():
                if old.get(uid) != name:
                    batch.join({"id": uid, "name": name})
            members = [{"id": uid, "name": name} for uid, name in list(view.items())[:svc.members_max]]
            msg = batch.message(room, len(view), functools.partial(list, members), svc.presence_diff_max)
            if msg is not None:
                relay._fan(Outgoing(msg))  # this node's members only: every node tells its own

    async def _heartbeat(self) -> None:
        """Keep this node's entries alive; notice the others' that expired."""
        svc = self.svc
        while True:
            await asyncio.sleep(self.ttl / 3)
            entries = [(room, self._key(u["id"]), u["id"], u["name"]) for room in svc.presence.rooms()
                       for u in svc.presence.members(room, 1 << 30)]
            changed: set[str] = set()
            try:
                missed = await svc.log.listen(list(svc._relays), self.ttl)
                if entries:
                    changed = await self.store.refresh(entries, self.ttl)
            except StorageError as e:
                log.warning("presence heartbeat failed: %s", e)
                continue
            for room in missed:  # no longer routed here for a while (this node stalled): read what passed
                relay = svc._relays.get(room)
                if relay is not None:
                    relay.catch_up()
            # Someone's entries expired (their node died) or ours came back (this node
            # stalled): every node with members there re-reads the room, this one too.
            for room in changed:
                svc.hub.publish(ChatService.topic(room), {"type": PRESENCE_HINT, "room": room})
            # And, a slice of the rooms each beat, every room re-read now and then anyway:
            # a hint is at-most-once like any publish.
            self._beats += 1
            rooms = list(svc._relays)
            for i in range(self._beats % REREAD_EVERY, len(rooms), REREAD_EVERY):
                self.changed(rooms[i])

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class RoomRelay:
    """This node's one subscription to a room's topic.

    Messages with a ``seq`` arrive from any node, possibly late, twice, or with
    one missing (a cluster backplane's pub/sub is at-most-once).  The relay
    keeps the room's :class:`RoomState` current from them and passes each on to
    the members' subscriptions exactly once and in seq order: older ones are
    dropped, and a gap is filled from the log before anything after it goes
    out.  Messages without a seq (presence, typing) pass straight through.
    """

    def __init__(self, service: "ChatService", name: str, may_create: MayCreate | None = None) -> None:
        self.service = service
        self.name = name
        self.may_create = may_create  # the first joiner's: asked if the room must be created
        self.topic = ChatService.topic(name)
        self.state: RoomState | None = None
        self.members: dict[RoomSubscription, None] = {}
        self.held: list[Outgoing] = []  # arrived before the state, or behind a gap
        self.ready: asyncio.Future[RoomState] = asyncio.get_running_loop().create_future()
        self.filling: asyncio.Task[None] | None = None
        self.closed = False

    async def start(self) -> None:
        """Subscribe, then load the room: whatever is published from now on
        arrives here, and the state covers everything before it."""
        svc = self.service
        try:
            await svc.hub.subscribe(self.topic, self)
            try:
                await svc.log.listen([self.name], svc.listen_ttl)  # the room's messages are routed here
                # An existing room is read, not written: joining it works on a full disk too.
                found = await svc.log.find_room(self.name, svc.history_size)
                if found is None:
                    check_create(self.may_create)
                record = found if found is not None else await svc.log.open_room(
                    self.name, svc.history_size, svc.max_rooms_total)
            except BaseException:
                svc.hub.unsubscribe(self.topic, self)
                raise
        except BaseException as e:
            self.ready.set_exception(e if isinstance(e, Exception) else ConnectionError("cancelled"))
            self.ready.exception()
            raise
        if svc.cluster is not None:
            await svc.cluster.baseline(self.name)
        if self.closed:  # every member left while this was loading
            svc.hub.unsubscribe(self.topic, self)
        self.state = svc.room_state(self.name, record)
        self.ready.set_result(self.state)
        self._drain()

    def deliver(self, out: Outgoing) -> None:
        if out.seq is None:
            if out.kind == PRESENCE_HINT:  # between nodes only: this node re-reads the room's presence
                cluster = self.service.cluster
                if cluster is not None:
                    cluster.changed(self.name)
                return
            self._fan(out)
            return
        if self.state is None or self.filling is not None:
            self.held.append(out)
            return
        self._take(out)

    def _take(self, out: Outgoing) -> None:
        state = self.state
        assert state is not None and out.seq is not None
        if out.seq <= state.last_seq:
            return  # already passed on (a duplicate, or covered by the loaded state)
        if out.seq > state.last_seq + 1:
            self.held.append(out)
            self.filling = asyncio.ensure_future(self._fill(out.seq))
            return
        self._pass(out)

    def _pass(self, out: Outgoing) -> None:
        """The next entry in seq order: into the state, to every member, then
        what a membership change means for this node's members."""
        assert self.state is not None
        self.state.committed(out.obj, self.service.history_keep)
        self._fan(out)
        if out.kind == "member" and out.obj.get("event") == "removed":
            self._removed(out.obj["user"])

    def _removed(self, user_id: str) -> None:
        """A member was removed (or banned): this node's connections of that
        user leave the room after the entry that says so, and get nothing after it."""
        for sub in tuple(self.members):
            if sub.member.user.id != user_id:
                continue
            sub.removed = True
            if sub.subs is not None:
                self.service.leave(sub.member, sub.subs, self.name)
            else:
                self.service._drop(self, sub)
            if not sub.buffering:
                sub.member.send({"type": "left", "room": self.name, "reason": "removed"})

    def _fan(self, out: Outgoing) -> None:
        for sub in tuple(self.members):
            sub.deliver(out)
        self.service.delivered += len(self.members)

    def _drain(self) -> None:
        held, self.held = self.held, []
        held.sort(key=lambda o: -1 if o.seq is None else o.seq)
        for i, out in enumerate(held):
            if self.filling is not None:
                self.held.extend(held[i:])
                return
            self.deliver(out)

    async def _fill(self, upto: int) -> None:
        """Read the messages between the last one passed on and ``upto`` from
        the log, pass them on, then what was held behind them."""
        svc = self.service
        delay = 0.05
        while not self.closed:
            state = self.state
            assert state is not None
            try:
                msgs = await svc.log.read(self.name, state.last_seq, min(upto - state.last_seq - 1,
                                                                         svc.history_keep), False)
            except StorageError as e:
                log.warning("room %s: filling seqs %d..%d failed (%s); retrying", self.name,
                            state.last_seq + 1, upto - 1, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            svc.gaps_filled += 1
            for msg in msgs:
                if msg["seq"] == state.last_seq + 1:
                    self._pass(Outgoing(msg, seq=msg["seq"]))
            if self.held and state.last_seq < upto - 1:
                # Not in the log (trimmed, or another epoch): skip ahead rather than stall.
                log.warning("room %s: seqs %d..%d are not in the log; skipping them", self.name,
                            state.last_seq + 1, upto - 1)
                state.last_seq = upto - 1
                state.recent.clear()  # the cache holds only an unbroken run of seqs
            break
        self.filling = None
        if not self.closed:
            self._drain()

    def catch_up(self) -> None:
        """After this node lost its subscription for a while: pass on what the
        log has beyond the last message passed on."""
        state = self.state
        if state is None or self.filling is not None or self.closed:
            return
        self.filling = asyncio.ensure_future(self._fill(state.last_seq + 1 + self.service.history_keep))

    def close(self) -> None:
        self.closed = True
        if self.filling is not None:
            self.filling.cancel()
        self.service.hub.unsubscribe(self.topic, self)


class ChatService:
    """Rooms, history, presence and typing, over a chat log and a hub."""

    def __init__(self, log: ChatLog, hub: Hub, *, history_size: int = 50,
                 history_keep: int = 1000, max_text: int = 2000, max_rooms: int = 20,
                 members_max: int = 100, presence_window: float = 0.1,
                 presence_diff_max: int = 50, typing_interval: float = 1.0, max_rooms_total: int = 0,
                 presence_store: PresenceStore | None = None, node_id: str = "",
                 presence_ttl: float = 15.0, max_private_members: int = 1000) -> None:
        self.log = log
        self.max_private_members = max_private_members
        self.max_rooms_total = max_rooms_total  # rooms stored at most (0 = no limit)
        self.rooms_reclaimed = 0
        self.hub = hub
        self.history_size = history_size
        self.history_keep = max(history_keep, history_size)
        self.max_text = max_text
        self.max_rooms = max_rooms
        self.members_max = members_max
        self.presence_window = presence_window
        self.presence_diff_max = presence_diff_max
        self.typing_interval = typing_interval
        self.presence = Presence()  # this node's connections
        # Across nodes (cluster mode): who is in each room, from the shared store.
        self.cluster = (ClusterPresence(self, presence_store, node_id, presence_ttl)
                        if presence_store is not None else None)
        # How long a room stays routed to this node without renewal (the presence heartbeat renews it).
        self.listen_ttl = presence_ttl
        self._relays: dict[str, RoomRelay] = {}
        self._batches: dict[str, PresenceBatch] = {}
        self._flush_handle: asyncio.TimerHandle | None = None
        self.messages_stored = 0
        self.delivered = 0
        self.gaps_filled = 0
        on_resync = getattr(hub.backplane, "on_resync", None)
        if on_resync is not None:
            on_resync(self.resync)

    def resync(self) -> None:
        """The backplane was cut off and is back: every room is routed here
        again (the routes may have expired meanwhile), then catches up from the log."""
        asyncio.ensure_future(self._resync())

    async def _resync(self) -> None:
        delay = 0.1
        while self._relays:
            try:
                await self.log.listen(list(self._relays), self.listen_ttl)
                break
            except StorageError as e:
                log.warning("routing the rooms here again failed (%s); retrying", e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        for relay in list(self._relays.values()):
            relay.catch_up()
            if self.cluster is not None:  # presence hints may have been lost too
                self.cluster.changed(relay.name)

    @staticmethod
    def topic(room: str) -> str:
        return "chat:" + room

    # -- rooms -----------------------------------------------------------

    def room_state(self, name: str, record: RoomRecord) -> RoomState:
        state = RoomState(name, record.epoch, record.last_seq, record.oldest_seq, max(self.history_size, 200),
                          record.kind, record.owner)
        state.recent.extend(record.recent)
        return state

    async def room(self, name: str, create: bool = True) -> RoomState:
        """The room's state: this node's live one while it has members, else read
        from the log (created on first use with ``create``; otherwise
        ProtocolError not_found for a room that never existed)."""
        relay = self._relays.get(name)
        if relay is not None:
            return await asyncio.shield(relay.ready)
        try:
            if create:
                record = await self.log.open_room(name, self.history_size, self.max_rooms_total)
            else:
                found = await self.log.find_room(name, self.history_size)
                if found is None:
                    raise ProtocolError("not_found", "no room named %s" % name)
                record = found
        except TooManyRooms as e:
            raise ProtocolError("too_large", "%s; join an existing one" % e) from None
        except StorageError:
            raise ProtocolError("unavailable", "the room could not be read; retry shortly")
        return self.room_state(name, record)

    async def history(self, room: RoomState, after: int, limit: int, *,
                      newest: bool = True) -> list[dict[str, Any]]:
        """Up to ``limit`` committed messages with seq > after, in seq order: the
        newest ones if there are more (``newest``), else the oldest ones."""
        cached = room.cached_after(after, limit)
        if cached is not None and (newest or len(cached) < limit):
            return cached
        try:
            return await self.log.read(room.name, after, limit, newest)
        except StorageError:
            raise ProtocolError("unavailable", "history could not be read; retry shortly")

    # -- who may read -----------------------------------------------------

    async def _role(self, room: str, user_id: str | None) -> str | None:
        if user_id is None:
            return None
        try:
            return await self.log.role(room, user_id)
        except StorageError:
            raise ProtocolError("unavailable", "the room's members could not be read; retry shortly")

    async def check_read(self, room: RoomState, user: Identity | None) -> str | None:
        """ProtocolError ``forbidden`` unless ``user`` may read ``room`` (None:
        an anonymous HTTP reader, who may read public rooms only).  Returns the
        user's stored role.  Read from the store, so a removal on another node
        counts at once."""
        role = await self._role(room.name, user.id if user is not None else None)
        if not may_read(room.kind, role):
            if room.kind == "public":
                raise ProtocolError("forbidden", "you were removed from room %s" % room.name)
            raise ProtocolError("forbidden", "room %s is private: only its members may read it" % room.name)
        return role

    # -- membership ------------------------------------------------------

    async def join_dm(self, member: Member, subs: dict[str, RoomSubscription], other: str,
                      since: int | None, epoch: str | None, may_create: MayCreate | None = None) -> dict[str, Any]:
        """Join the direct-message room of ``member`` and user ``other``; the
        room is created the first time either of them asks (``may_create``
        is asked then)."""
        if not valid_user_id(other):
            raise ProtocolError("bad_message", "'with' must be a user id (1-64 of A-Z a-z 0-9 _ . : @ -)")
        me = member.user.id
        if other == me:
            raise ProtocolError("bad_message", "a direct-message room needs another user")
        name = dm_room(me, other)
        if name not in subs and name not in self._relays:
            try:
                if await self.log.find_room(name, 0) is None:
                    check_create(may_create)
                    await self.log.create_room(name, "dm", None, sorted((me, other)), self.history_size,
                                               self.max_rooms_total)
            except TooManyRooms as e:
                raise ProtocolError("too_large", "%s; join an existing one" % e) from None
            except RoomExists:
                raise ProtocolError("conflict", "room %s exists and is not a direct-message room" % name) from None
            except StorageError:
                raise ProtocolError("unavailable", "the room could not be created; retry shortly") from None
        reply = await self.join(member, subs, name, since, epoch)
        reply["with"] = other
        return reply

    async def join(self, member: Member, subs: dict[str, RoomSubscription], name: str,
                   since: int | None, epoch: str | None, may_create: MayCreate | None = None) -> dict[str, Any]:
        """Subscribe ``member`` to ``name`` and return the ``joined`` message.

        The caller sends it, then calls ``subs[name].release(reply["seq"])``.
        A private or direct-message room is ``forbidden`` to a non-member, a
        public one to a user removed from it.  A public room that does not
        exist yet is created, if ``may_create`` allows (``rate_limited``
        otherwise); it is asked only then.  Joiners that arrive while the
        room is being opened share the first one's outcome."""
        if not valid_room(name):
            raise ProtocolError("bad_message", "room names are 1-64 letters, digits, '_', '.' or '-'")
        if name in subs:
            raise ProtocolError("conflict", "already in room %s" % name)
        if len(subs) >= self.max_rooms:
            raise ProtocolError("too_large", "at most %d rooms per connection" % self.max_rooms)
        if name.startswith(DM_PREFIX) and name not in self._relays:
            # Direct-message rooms exist only once made (join with 'with'): never created as public.
            try:
                found = await self.log.find_room(name, 0)
            except StorageError:
                raise ProtocolError("unavailable", "the room could not be read; retry shortly") from None
            if found is None:
                raise ProtocolError("not_found", "no direct-message room %s: join with {\"with\": <user id>}"
                                    % name)
            if name in subs:
                raise ProtocolError("conflict", "already in room %s" % name)
        sub = RoomSubscription(member, name, subs)
        subs[name] = sub
        relay = self._relays.get(name)
        if relay is None:
            relay = self._relays[name] = RoomRelay(self, name, may_create)
            relay.members[sub] = None
            starting: asyncio.Future[None] | None = asyncio.ensure_future(relay.start())
        else:
            relay.members[sub] = None
            starting = None
        try:
            if starting is not None:
                await asyncio.shield(starting)
            room = await asyncio.shield(relay.ready)
            await self.check_read(room, member.user)
            plan = resume_plan(epoch=room.epoch, last_seq=room.last_seq, oldest_seq=room.oldest_seq,
                               since=since, client_epoch=epoch, history_size=self.history_size,
                               resume_max=self.history_keep)
            upto = room.last_seq
            if plan.recovered:
                messages = await self.history(room, plan.after, self.history_keep, newest=False)
            else:
                messages = await self.history(room, plan.after, plan.limit)
        except BaseException as e:
            subs.pop(name, None)
            self._drop(relay, sub)
            if isinstance(e, TooManyRooms):
                raise ProtocolError("too_large", "%s; join an existing one" % e)
            if isinstance(e, (StorageError, ConnectionError)):  # the store, or the backplane, is unreachable
                raise ProtocolError("unavailable", "the room could not be opened; retry shortly")
            raise
        if messages:
            upto = max(upto, messages[-1]["seq"])
        if sub.removed:
            raise ProtocolError("forbidden", "you were removed from room %s" % name)
        if subs.get(name) is sub:  # still subscribed (the member may have left meanwhile)
            if self.presence.add(name, member.user):
                if self.cluster is not None:  # stored before the reply, so the joiner is in its own list
                    await self.cluster.write(name, "join", member.user.id, member.user.name)
                else:
                    self._presence_change(name, "join", member.user)
        if self.cluster is not None:
            members, count = await self.cluster.members(name, self.members_max)
        else:
            members, count = self.presence.members(name, self.members_max), self.presence.count(name)
        return {"type": "joined", "room": name, "kind": room.kind, "epoch": room.epoch, "seq": upto,
                "recovered": plan.recovered, "messages": messages,
                "members": members, "member_count": count}

    def _drop(self, relay: RoomRelay, sub: RoomSubscription) -> None:
        relay.members.pop(sub, None)
        if not relay.members and self._relays.get(relay.name) is relay:
            del self._relays[relay.name]
            relay.close()
            if relay.state is not None and relay.state.last_seq == 0:
                # Its last member left and nothing was said: a room created by
                # joining alone is not kept (rooms cost storage, and are capped).
                asyncio.ensure_future(self._reclaim(relay.name))

    async def _reclaim(self, name: str) -> None:
        if name in self._relays:
            return  # joined again meanwhile
        try:
            if await self.log.drop_if_empty(name):
                self.rooms_reclaimed += 1
        except StorageError as e:
            log.warning("could not remove the empty room %s: %s", name, e)

    def leave(self, member: Member, subs: dict[str, RoomSubscription], name: str) -> bool:
        sub = subs.pop(name, None)
        if sub is None:
            return False
        relay = self._relays.get(name)
        if relay is not None:
            self._drop(relay, sub)
        if self.presence.remove(name, member.user):
            self._presence_change(name, "leave", member.user)
        return True

    def leave_all(self, member: Member, subs: dict[str, RoomSubscription]) -> None:
        for name in list(subs):
            self.leave(member, subs, name)

    def _presence_change(self, room: str, event: str, user: Identity) -> None:
        if self.cluster is not None:
            self.cluster.local_change(room, event, user)
            return
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
        """Store one message; once stored, ``reply(ack)`` to the sender, then
        publish the message to the room on every node (unless it was a retry)."""
        text = check_text(text, self.max_text)
        if cid is not None and (not isinstance(cid, str) or not cid or len(cid) > _CID_MAX):
            raise ProtocolError("bad_message", "'cid' must be a string of 1-%d characters" % _CID_MAX)
        await self.room(name)  # exists in the log (a member's room always does)
        try:
            seq, stored_ts, duplicate = await self.log.append(name, user.id, user.name, text,
                                                              int(time.time() * 1000), cid)
        except NotAMember:
            raise ProtocolError("forbidden", "you may not write to room %s (no longer a member)" % name) from None
        except StoreBusy:
            raise ProtocolError("unavailable", "the server is overloaded; retry shortly")
        except StorageError as e:
            # Disk full, I/O error, store unreachable: nothing was stored; the client may retry with its cid.
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
        if self.log.broadcasts:  # the other nodes have it from the log's append
            self.hub.dispatch(self.topic(name), Outgoing(msg, seq=seq))
        else:
            self.hub.publish(self.topic(name), msg, seq=seq)

    def _publish_entry(self, name: str, entry: dict[str, Any]) -> None:
        """A stored tombstone or membership change, to the room on every node."""
        if self.log.broadcasts:
            self.hub.dispatch(self.topic(name), Outgoing(entry, seq=entry["seq"]))
        else:
            self.hub.publish(self.topic(name), entry, seq=entry["seq"])

    # -- private rooms and moderation --------------------------------------
    # Who may do what is one table in docs/PROTOCOL.md ("Roles"); these
    # methods are where it is enforced.

    async def create_private(self, user: Identity, name: str, members: list[str],
                             may_create: MayCreate | None = None) -> dict[str, Any]:
        """Create private room ``name`` owned by ``user``, with ``members``
        (``conflict`` if the name is taken; only then is ``may_create`` asked)."""
        if not valid_room(name):
            raise ProtocolError("bad_message", "room names are 1-64 letters, digits, '_', '.' or '-'")
        if name.startswith(DM_PREFIX):
            raise ProtocolError("bad_message", "room names starting with %r are direct-message rooms" % DM_PREFIX)
        if len(members) >= self.max_private_members:
            raise ProtocolError("too_large", "a private room has at most %d members" % self.max_private_members)
        for m in members:
            if not valid_user_id(m):
                raise ProtocolError("bad_message", "'members' must be user ids (1-64 of A-Z a-z 0-9 _ . : @ -)")
        try:
            if await self.log.find_room(name, 0) is not None:
                raise RoomExists(name)
            check_create(may_create)
            record = await self.log.create_room(name, "private", user.id, members, 0, self.max_rooms_total)
            rows = await self.log.members(name, self.max_private_members)
        except RoomExists:
            raise ProtocolError("conflict", "a room named %s exists already" % name) from None
        except TooManyRooms as e:
            raise ProtocolError("too_large", "%s; join an existing one" % e) from None
        except StorageError:
            raise ProtocolError("unavailable", "the room could not be created; retry shortly") from None
        return {"type": "created", "room": name, "kind": record.kind, "owner": user.id,
                "members": [{"id": uid, "role": role} for uid, role in rows]}

    async def _managed(self, user: Identity, name: str, target: str) -> tuple[RoomState, str | None]:
        """The room and the target's role, once ``user`` may change who is in it."""
        if not valid_user_id(target):
            raise ProtocolError("bad_message", "'user' must be a user id (1-64 of A-Z a-z 0-9 _ . : @ -)")
        room = await self.room(name, create=False)
        if room.kind == "dm":
            raise ProtocolError("forbidden", "the members of a direct-message room cannot change")
        if room.kind == "public":
            if not is_moderator(user):
                raise ProtocolError("forbidden", "only moderators and admins remove users from public rooms")
        elif not user.can("admin"):
            role = await self.check_read(room, user)
            if role != "owner" and not is_moderator(user) and target != user.id:
                raise ProtocolError("forbidden", "only the owner, moderators and admins manage the members of %s"
                                    % name)
        return room, await self._role(name, target)

    async def add_member(self, user: Identity, name: str, target: str,
                         reply: Callable[[dict[str, Any]], None]) -> None:
        """Add ``target`` to a private room (or lift its ban from a public one);
        the change is an entry in the room's seq order.  ``reply(ack)`` first,
        then the entry goes to the room."""
        room, role = await self._managed(user, name, target)
        if room.kind == "public":
            if role != "banned":
                raise ProtocolError("conflict", "%s is not removed from %s" % (target, name))
            new_role: str | None = None
        else:
            if role in ("owner", "member"):
                raise ProtocolError("conflict", "%s is a member of %s already" % (target, name))
            if len(await self.log.members(name, self.max_private_members)) >= self.max_private_members:
                raise ProtocolError("too_large", "a private room has at most %d members" % self.max_private_members)
            new_role = "member"
        await self._set_member(user, name, target, new_role, "added", reply)

    async def remove_member(self, user: Identity, name: str, target: str,
                            reply: Callable[[dict[str, Any]], None]) -> None:
        """Remove ``target`` from a private room (a member may remove itself), or
        ban it from a public one; its connections leave the room, on every node."""
        room, role = await self._managed(user, name, target)
        if role == "owner":
            raise ProtocolError("forbidden", "the owner of %s cannot be removed" % name)
        if room.kind == "public":
            if role == "banned":
                raise ProtocolError("conflict", "%s is removed from %s already" % (target, name))
            new_role: str | None = "banned"
        else:
            if role != "member":
                raise ProtocolError("not_found", "%s is not a member of %s" % (target, name))
            new_role = None
        await self._set_member(user, name, target, new_role, "removed", reply)

    async def _set_member(self, user: Identity, name: str, target: str, role: str | None,
                          event: str, reply: Callable[[dict[str, Any]], None]) -> None:
        ts = int(time.time() * 1000)
        try:
            done = await self.log.set_member(name, target, role, event, user.id, user.name, ts)
        except StorageError as e:
            log.error("changing the members of %s failed: %s", name, e)
            raise ProtocolError("unavailable", "the change could not be stored; retry shortly") from None
        reply({"type": "ack", "room": name, "seq": done.seq})
        self._publish_entry(name, member_json(name, done.seq, event, target, user.id, user.name, done.ts))

    async def delete_message(self, user: Identity, name: str, target: object,
                             reply: Callable[[dict[str, Any]], None]) -> None:
        """A moderator deletes message ``target``: its text is erased from the
        store and a tombstone takes the next seq, so every member sees it live
        and every later history or resume read sees the message deleted."""
        if type(target) is not int or target < 1:
            raise ProtocolError("bad_message", "'seq' must be the positive seq of a message")
        if not is_moderator(user):
            raise ProtocolError("forbidden", "only moderators and admins delete messages")
        room = await self.room(name, create=False)
        await self.check_read(room, user)
        ts = int(time.time() * 1000)
        try:
            done = await self.log.delete(name, target, user.id, user.name, ts)
        except NoSuchMessage:
            raise ProtocolError("not_found", "room %s keeps no message with seq %d" % (name, target)) from None
        except StorageError as e:
            log.error("deleting a message in %s failed: %s", name, e)
            raise ProtocolError("unavailable", "the deletion could not be stored; retry shortly") from None
        ack: dict[str, Any] = {"type": "ack", "room": name, "seq": done.seq, "target": target}
        if done.duplicate:
            ack["duplicate"] = True
        reply(ack)
        if not done.duplicate:
            self._publish_entry(name, tombstone_json(name, done.seq, target, user.id, user.name, done.ts))

    async def member_list(self, user: Identity | None, name: str) -> dict[str, Any]:
        """The stored member rows: of a private or dm room for whoever may read
        it (and admins); of a public room (the removed users) for moderators."""
        room = await self.room(name, create=False)
        if room.kind == "public":
            if user is None or not is_moderator(user):
                raise ProtocolError("forbidden", "only moderators and admins list the users removed from a room")
        elif user is None or not (user.can("admin") and room.kind == "private"):
            await self.check_read(room, user)
        try:
            rows = await self.log.members(name, self.max_private_members)
        except StorageError:
            raise ProtocolError("unavailable", "the members could not be read; retry shortly") from None
        return {"type": "member_list", "room": name, "kind": room.kind, "owner": room.owner,
                "members": [{"id": uid, "role": role} for uid, role in rows]}

    def typing(self, user: Identity, name: str) -> None:
        self.hub.publish(self.topic(name), {"type": "typing", "room": name, "user": user.to_json()})

    # -- HTTP ------------------------------------------------------------

    async def messages_since(self, name: str, since: int | None, limit: int,
                             user: Identity | None = None) -> dict[str, Any]:
        """History over HTTP: without ``since`` the newest ``limit`` messages,
        with it the oldest ``limit`` after it (page forward with the last seq).
        ``complete`` is false when messages after ``since`` were already trimmed.
        ``forbidden`` where ``user`` may not read (see :meth:`check_read`)."""
        room = await self.room(name, create=False)
        await self.check_read(room, user)
        limit = max(1, min(limit, self.history_keep))
        if since is None:
            msgs = await self.history(room, max(0, room.last_seq - limit), limit)
        else:
            msgs = await self.history(room, since, limit, newest=False)
        return {"room": name, "epoch": room.epoch, "seq": room.last_seq,
                "oldest": room.oldest_seq, "messages": msgs,
                "complete": since is None or since >= room.oldest_seq - 1}

    async def room_list(self, user: Identity | None = None) -> list[dict[str, Any]]:
        """The rooms ``user`` may read: every public one, and the private and
        direct-message rooms it is a member of."""
        try:
            rows = await self.log.rooms(1000, user.id if user is not None else None)
        except StorageError:
            raise ProtocolError("unavailable", "rooms could not be read; retry shortly")
        views = self.cluster.views if self.cluster is not None else {}
        return [{"room": n, "seq": s, "members": len(views[n]) if n in views else self.presence.count(n)}
                for n, s in rows]

    async def start(self) -> None:
        if self.cluster is not None:
            self.cluster.start()

    async def stop(self) -> None:
        if self.cluster is not None:
            await self.cluster.stop()
