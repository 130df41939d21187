"""The apps' storage interfaces on Redis (cluster mode).

Keys carry a hash tag per room (``rt:room:{lobby}:...``) so that every key a
script touches lives in one slot of a Redis Cluster.  Durability is Redis's:
with ``appendonly yes`` and ``appendfsync always`` a reply means the write is
on disk (docs/DEPLOY.md).  Every method raises
:class:`~realtime.storage.base.StorageError` when Redis did not answer: nothing
is acknowledged that Redis did not store.

Chat: one Lua script per ``say`` does the cid dedupe, takes the next seq,
appends to the room's stream (entry id ``<seq>-1``), trims it to ``keep``
(dropping the trimmed messages' cids with them) and PUBLISHes the message's
envelope to the other nodes -- so a message is never stored without being
sent, nor sent without being stored.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any, Callable

import ujson
from redis.exceptions import NoScriptError, RedisError, ResponseError

from realtime.protocol import encode
from realtime.storage.base import (
    Appended,
    Loaded,
    LogGap,
    NoSuchMessage,
    NotAMember,
    RoomExists,
    RoomRecord,
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
from realtime.storage.resp import RespPipe

ROOMS_KEY = "rt:rooms"
ACTIVITY_GRAIN = 1.0  # seconds: a room's activity score moves at most this often per node

_OPEN_ROOM = """
if redis.call('HSETNX', KEYS[1], 'epoch', ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], 'seq', 0, 'created', ARGV[2])
end
return redis.call('HMGET', KEYS[1], 'epoch', 'seq', 'kind', 'owner')
"""

_CREATE_ROOM = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {0, redis.call('HGET', KEYS[1], 'kind') or 'public'}
end
redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'seq', 0, 'created', ARGV[2], 'kind', ARGV[3])
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[1], 'owner', ARGV[4])
  redis.call('HSET', KEYS[2], ARGV[4], 'owner')
end
for i = 5, #ARGV do
  redis.call('HSETNX', KEYS[2], ARGV[i], 'member')
end
return {1, ARGV[3]}
"""

# Who gets a stored entry: the nodes listening to the room (``nodes``, node id
# scored by when its listening expires, on Redis's clock), each on its own
# channel, the origin excepted -- so a room on one node publishes nothing, and
# no node receives its own messages back.
_ROUTE = """
local function route(nodes, prefix, origin, env)
  local t = redis.call('TIME')
  local now = t[1] * 1000 + math.floor(t[2] / 1000)
  for _, n in ipairs(redis.call('ZRANGEBYSCORE', nodes, now, '+inf')) do
    if n ~= origin then redis.call('PUBLISH', prefix .. n, env) end
  end
end
"""

# This node listens to a room for ARGV[2] ms more (KEYS[1] the room's ``nodes``);
# the entries of nodes that stopped refreshing go.  1 if this node had not been
# listening (it may have missed entries stored meanwhile).
_LISTEN = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
"""

# Who may write: the rule of realtime.storage.base.may_read.
_MAY_WRITE = """
local function may_write(meta, members, user)
  local kind = redis.call('HGET', meta, 'kind') or 'public'
  local role = redis.call('HGET', members, user)
  if kind == 'public' then return role ~= 'banned' end
  return role == 'owner' or role == 'member'
end
"""

_SAY = _MAY_WRITE + _ROUTE + """
local user, cid, ts = ARGV[1], ARGV[5], ARGV[4]
if cid ~= '' then
  local prev = redis.call('HGET', KEYS[3], user .. '\\31' .. cid)
  if prev then
    local sep = string.find(prev, ':', 1, true)
    return {tonumber(string.sub(prev, 1, sep - 1)), tonumber(string.sub(prev, sep + 1)), 1}
  end
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('NOROOM no such room')
end
if not may_write(KEYS[1], KEYS[4], user) then
  return redis.error_reply('NOTMEMBER not a member of this room')
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
if cid ~= '' then
  redis.call('XADD', KEYS[2], seq .. '-1', 'u', user, 'n', ARGV[2], 't', ARGV[3], 'ts', ts, 'c', cid)
  redis.call('HSET', KEYS[3], user .. '\\31' .. cid, seq .. ':' .. ts)
else
  redis.call('XADD', KEYS[2], seq .. '-1', 'u', user, 'n', ARGV[2], 't', ARGV[3], 'ts', ts)
end
local keep = tonumber(ARGV[6])
if seq % 100 == 0 and seq > keep then
  local old = redis.call('XRANGE', KEYS[2], '-', (seq - keep) .. '-1')
  for _, entry in ipairs(old) do
    local f, u, c = entry[2], nil, nil
    for i = 1, #f, 2 do
      if f[i] == 'u' then u = f[i + 1] elseif f[i] == 'c' then c = f[i + 1] end
    end
    if c then redis.call('HDEL', KEYS[3], u .. '\\31' .. c) end
  end
  redis.call('XTRIM', KEYS[2], 'MINID', (seq - keep + 1) .. '-0')
  local dels = redis.call('HGETALL', KEYS[5])
  for i = 1, #dels, 2 do
    if tonumber(dels[i]) <= seq - keep then
      local p = cjson.decode(dels[i + 1])
      if p.c then redis.call('HDEL', KEYS[3], p.u .. '\\31' .. p.c) end
      redis.call('HDEL', KEYS[5], dels[i])
    end
  end
end
if ARGV[7] ~= '' then
  route(KEYS[6], ARGV[7], ARGV[11], ARGV[8] .. seq .. ARGV[9] .. seq .. ARGV[10])
end
return {seq, tonumber(ts), 0}
"""

# A tombstone (ARGV[1] 'delete', ARGV[2] the target seq) or a membership change
# (ARGV[1] 'member', ARGV[2] the user, ARGV[10] the role or '' to remove, ARGV[11]
# the event), appended with the next seq and published like a message.  A deleted
# message leaves the stream; its fields, without the text, stay in the 'deleted'
# hash (seq -> placeholder) until trimmed, and reads put it back in its place.
_EVENT = _ROUTE + """
local op, by, byname, ts = ARGV[1], ARGV[3], ARGV[4], ARGV[5]
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('NOROOM no such room')
end
local seq
if op == 'delete' then
  local target = ARGV[2]
  local prev = redis.call('HGET', KEYS[5], target)
  if prev then
    local p = cjson.decode(prev)
    return {p.d, p.dts, 1}
  end
  local found = redis.call('XRANGE', KEYS[2], target .. '-1', target .. '-1')
  if #found == 0 then return redis.error_reply('NOMSG no such message') end
  local f, t = found[1][2], {}
  for i = 1, #f, 2 do t[f[i]] = f[i + 1] end
  if t.k then return redis.error_reply('NOMSG not a message') end
  seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
  redis.call('XADD', KEYS[2], seq .. '-1', 'k', 'd', 'x', target, 'u', by, 'n', byname, 'ts', ts)
  redis.call('HSET', KEYS[5], target, cjson.encode({u = t.u, n = t.n, ts = t.ts, c = t.c, d = seq,
                                                    dts = tonumber(ts)}))
  redis.call('XDEL', KEYS[2], target .. '-1')
else
  local user = ARGV[2]
  if ARGV[10] == '' then
    redis.call('HDEL', KEYS[4], user)
  else
    redis.call('HSET', KEYS[4], user, ARGV[10])
  end
  seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
  redis.call('XADD', KEYS[2], seq .. '-1', 'k', 'm', 'e', ARGV[11], 's', user, 'u', by, 'n', byname, 'ts', ts)
end
if ARGV[6] ~= '' then
  route(KEYS[6], ARGV[6], ARGV[12], ARGV[7] .. seq .. ARGV[8] .. seq .. ARGV[9])
end
return {seq, tonumber(ts), 0}
"""


def _text(v: Any) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def _seq_of(entry_id: Any) -> int:
    return int(_text(entry_id).split("-", 1)[0])


def _refused(e: Exception) -> StorageError:
    text = str(e)
    if text.startswith("LOGGAP"):
        return LogGap(text)
    if text.startswith("NOTMEMBER"):
        return NotAMember(text)
    if text.startswith("NOMSG"):
        return NoSuchMessage(text)
    return StorageError("Redis refused: %s" % text)


async def _redis(coro: Any) -> Any:
    """Await one Redis call: what a script refused becomes its own
    :class:`StorageError`, and an unreachable Redis a plain one."""
    try:
        return await coro
    except ResponseError as e:
        raise _refused(e) from None
    except (RedisError, OSError) as e:
        raise StorageError("Redis is unreachable: %s" % e) from None


async def _evalsha_all(redis: Any, source: str, queue: Callable[[Any], None]) -> list[Any]:
    """The EVALSHAs of one script that ``queue`` adds to a pipeline, in one
    round trip.  If Redis has lost the script (it restarted) none of them ran:
    load it and send them again.  A refusal of any raises StorageError."""
    for attempt in range(2):
        async with redis.pipeline(transaction=False) as pipe:
            queue(pipe)
            results = await _redis(pipe.execute(raise_on_error=False))
        if attempt == 0 and any(isinstance(r, NoScriptError) for r in results):
            await _redis(redis.script_load(source))
            continue
        break
    failed = next((r for r in results if isinstance(r, Exception)), None)
    if failed is not None:
        raise StorageError("Redis refused: %s" % failed)
    return list(results)


class RedisChatLog:
    """Each room: ``meta`` (epoch, seq, kind, owner), ``log`` (a stream of
    messages, tombstones and membership changes), ``cids`` (a hash),
    ``members`` (user -> role) and ``deleted`` (placeholders of deleted messages)."""

    def __init__(self, redis: Any, keep: int, *, node_id: str = "", channel: Callable[[str], str] | None = None,
                 topic: Callable[[str], str] | None = None, pipe: RespPipe | None = None) -> None:
        self.redis = redis
        self.pipe = pipe  # the says' own connection, if the URL allows one (else redis-py's pipeline)
        self.keep = keep
        self.node_id = node_id
        self._channel = channel
        self._topic = topic
        self._open = redis.register_script(_OPEN_ROOM)
        self._create = redis.register_script(_CREATE_ROOM)
        self._say = redis.register_script(_SAY)
        self._event = redis.register_script(_EVENT)
        self._listen = redis.register_script(_LISTEN)
        self._active: dict[str, float] = {}  # room -> when this node last scored its activity
        self._queue: list[tuple[str, list[str], list[Any], asyncio.Future[Any]]] = []
        self._flusher: asyncio.Future[None] | None = None
        # The service need not publish what this log's append already sent to the other nodes.
        self.broadcasts = channel is not None and topic is not None

    @staticmethod
    def keys(room: str) -> list[str]:
        tag = "rt:room:{%s}:" % room
        return [tag + "meta", tag + "log", tag + "cids", tag + "members", tag + "deleted"]

    @staticmethod
    def nodes_key(room: str) -> str:
        """The nodes listening to the room: node id scored by when that ends (ms)."""
        return "rt:room:{%s}:nodes" % room

    def _script_keys(self, room: str) -> list[str]:
        return self.keys(room) + [self.nodes_key(room)]

    async def listen(self, rooms: list[str], ttl: float) -> list[str]:
        """Route what is stored in ``rooms`` to this node for ``ttl`` seconds
        (one script call per room, in one pipeline: each key in its room's
        slot).  Returns the rooms this node had not been listening to."""
        if not rooms or not self.broadcasts:
            return []
        args = [self.node_id, int(ttl * 1000)]

        def queue(pipe: Any) -> None:
            for room in rooms:
                pipe.evalsha(self._listen.sha, 1, self.nodes_key(room), *args)

        results = await _evalsha_all(self.redis, _LISTEN, queue)
        return [room for room, added in zip(rooms, results) if added == 1]

    _call = staticmethod(_redis)

    def _entries(self, room: str, entries: list[Any], deleted: dict[Any, Any], after: int) -> list[dict[str, Any]]:
        """Stream entries as JSON, with the placeholders of deleted messages
        after ``after`` put back in their places (seq order)."""
        out = []
        for entry_id, fields in entries:
            f = {_text(k): _text(v) for k, v in fields.items()}
            seq = _seq_of(entry_id)
            kind = f.get("k")
            if kind == "d":
                out.append(tombstone_json(room, seq, int(f["x"]), f["u"], f["n"], int(f["ts"])))
            elif kind == "m":
                out.append(member_json(room, seq, f["e"], f["s"], f["u"], f["n"], int(f["ts"])))
            else:
                out.append(message_json(room, seq, f["u"], f["n"], f["t"], int(f["ts"]), f.get("c")))
        for seq_text, raw in deleted.items():
            seq = int(_text(seq_text))
            if seq > after:
                p = ujson.loads(_text(raw))
                out.append(redacted(message_json(room, seq, p["u"], p["n"], "", int(p["ts"]), p.get("c"))))
        if deleted:
            out.sort(key=lambda m: m["seq"])
        return out

    async def _record(self, room: str, epoch: str, last_seq: int, recent: int, kind: Any = None,
                      owner: Any = None) -> RoomRecord:
        meta, log, *_, deleted = self.keys(room)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xrange(log, "-", "+", count=1)
            pipe.xrevrange(log, "+", "-", count=max(recent, 1))
            pipe.hgetall(deleted)
            first, newest, dels = await self._call(pipe.execute())
        kept = [_seq_of(first[0][0])] if first else []
        kept += [int(_text(k)) for k in dels]
        oldest = min(kept) if kept else last_seq + 1
        entries = self._entries(room, newest[::-1], dels, 0)[-recent:] if recent > 0 else []
        return RoomRecord(epoch, last_seq, max(oldest, last_seq - self.keep + 1), entries,
                          _text(kind) if kind else "public", _text(owner) if owner else None)

    async def _check_capacity(self, room: str, max_rooms: int) -> None:
        if max_rooms > 0 and await self._call(self.redis.zscore(ROOMS_KEY, room)) is None:
            if await self._call(self.redis.zcard(ROOMS_KEY)) >= max_rooms:
                raise TooManyRooms("this server holds at most %d rooms" % max_rooms)

    async def open_room(self, room: str, recent: int, max_rooms: int = 0) -> RoomRecord:
        now = time.time()
        await self._check_capacity(room, max_rooms)
        epoch, seq, kind, owner = await self._call(self._open(keys=self.keys(room)[:1],
                                                              args=[secrets.token_hex(8), now]))
        # Scored by activity (creation, then each message): rooms() lists the liveliest first.
        await self._call(self.redis.zadd(ROOMS_KEY, {room: now}, nx=True))
        return await self._record(room, _text(epoch), int(seq), recent, kind, owner)

    async def create_room(self, room: str, kind: str, owner: str | None, members: list[str], recent: int,
                          max_rooms: int = 0) -> RoomRecord:
        await self._check_capacity(room, max_rooms)
        meta, _, _, members_key, _ = self.keys(room)
        now = time.time()
        created, existing = await self._call(self._create(
            keys=[meta, members_key], args=[secrets.token_hex(8), now, kind, owner or "", *members]))
        if not created and not (kind == "dm" and _text(existing) == "dm"):
            raise RoomExists("a room named %s exists already" % room)
        await self._call(self.redis.zadd(ROOMS_KEY, {room: now}, nx=True))
        found = await self.find_room(room, recent)
        assert found is not None
        return found

    async def find_room(self, room: str, recent: int) -> RoomRecord | None:
        epoch, seq, kind, owner = await self._call(self.redis.hmget(self.keys(room)[0], "epoch", "seq", "kind",
                                                                    "owner"))
        if epoch is None:
            return None
        return await self._record(room, _text(epoch), int(seq), recent, kind, owner)

    async def drop_if_empty(self, room: str) -> bool:
        """Kept: members on other nodes may still be in it (the cap counts it)."""
        return False

    def _envelope(self, room: str, mtype: str, rest: dict[str, Any]) -> list[str]:
        """``[channel prefix, head, body, tail]``: the envelope the script
        publishes to each listening node's channel (prefix + node id) is
        ``head .. seq .. body .. seq .. tail``, exactly what Envelope.pack
        makes of ``{"type": mtype, "room": room, "seq": seq, **rest}``."""
        if not self.broadcasts:
            return ["", "", "", ""]
        assert self._channel is not None and self._topic is not None
        topic = self._topic(room)
        head = ujson.dumps([self.node_id, topic, mtype])[:-1] + ","
        body = ",null]\n" + encode({"type": mtype, "room": room})[:-1] + ',"seq":'
        return [self._channel("_node:"), head, body, "," + encode(rest)[1:]]

    async def append(self, room: str, user_id: str, name: str, text: str, ts: int,
                     cid: str | None) -> Appended:
        rest: dict[str, Any] = {"user": user_id, "name": name, "text": text, "ts": ts}
        if cid is not None:
            rest["cid"] = cid
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((room, self._script_keys(room), [user_id, name, text, ts, cid or "", self.keep,
                                                            *self._envelope(room, "message", rest),
                                                            self.node_id], fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush())
        seq, stored_ts, dup = await fut
        return Appended(int(seq), int(stored_ts), bool(dup))

    async def _flush(self) -> None:
        """Send every queued ``say`` in one pipeline on one connection: Redis
        runs them in the order they were said (a client's messages keep their
        order) and, with ``appendfsync always``, a burst shares its fsyncs."""
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                results = await self._run_says(batch)
                if any(isinstance(r, NoScriptError) for r in results):
                    # Redis lost its script cache (a restart): none of them ran; load it, run them again.
                    await self.redis.script_load(_SAY)
                    results = await self._run_says(batch)
            except (RedisError, OSError) as e:
                error = StorageError("Redis is unreachable: %s" % e)
                for *_, fut in batch:
                    if not fut.done():
                        fut.set_exception(error)
                continue
            for (*_, fut), result in zip(batch, results):
                if fut.done():
                    continue
                if isinstance(result, Exception):
                    fut.set_exception(_refused(result))
                else:
                    fut.set_result(result)
            for *_, fut in batch:
                if not fut.done():
                    fut.set_exception(StorageError("Redis gave no answer for this write"))

    async def _run_says(self, batch: list[tuple[str, list[str], list[Any], asyncio.Future[Any]]]) -> list[Any]:
        """One pipeline of EVALSHAs, one round trip (redis-py's Script objects
        would add a SCRIPT EXISTS round trip before every pipeline), on the
        lean connection when there is one.  Each say's reply (or error), in order."""
        now = time.monotonic()
        commands: list[list[Any]] = []
        says = []  # where each say's script call is among the commands
        for room, keys, args, _ in batch:
            says.append(len(commands))
            commands.append(["EVALSHA", self._say.sha, len(keys), *keys, *args])
            # The rooms' activity order (GET /api/rooms) at a second's grain: a
            # busy room is scored once a second, not once a message.
            if now - self._active.get(room, -ACTIVITY_GRAIN) >= ACTIVITY_GRAIN:
                if len(self._active) >= 10000:
                    self._active.clear()
                self._active[room] = now
                commands.append(["ZADD", ROOMS_KEY, "XX", "GT", args[3] / 1000.0, room])
        if self.pipe is not None:
            results = await self.pipe.execute(commands)
        else:
            async with self.redis.pipeline(transaction=False) as pipe:
                for command in commands:
                    pipe.execute_command(*command)
                results = await pipe.execute(raise_on_error=False)
        return [results[i] for i in says]

    async def read(self, room: str, after: int, limit: int, newest: bool) -> list[dict[str, Any]]:
        _, log, *_, deleted = self.keys(room)
        start = "%d-0" % (after + 1)
        async with self.redis.pipeline(transaction=False) as pipe:
            if newest:
                pipe.xrevrange(log, "+", start, count=limit)
            else:
                pipe.xrange(log, start, "+", count=limit)
            pipe.hgetall(deleted)
            entries, dels = await self._call(pipe.execute())
        out = self._entries(room, entries[::-1] if newest else entries, dels, after)
        return out[-limit:] if newest else out[:limit]

    async def rooms(self, limit: int, user_id: str | None = None) -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []
        start = 0
        chunk = max(limit, 100)
        while len(out) < limit and start < 10 * chunk:  # bounded: private rooms others are in are skipped
            names = [_text(n) for n in await self._call(self.redis.zrevrange(ROOMS_KEY, start, start + chunk - 1))]
            if not names:
                break
            start += chunk
            async with self.redis.pipeline(transaction=False) as pipe:
                for n in names:
                    meta, *_, members, _ = self.keys(n)
                    pipe.hmget(meta, "seq", "kind")
                    pipe.hget(members, user_id or "")
                rows = await self._call(pipe.execute())
            for i, n in enumerate(names):
                (seq, kind), role = rows[2 * i], rows[2 * i + 1]
                kind_text = _text(kind) if kind else "public"
                role_text = _text(role) if role else None
                if kind_text == "public" or (user_id is not None and may_read(kind_text, role_text)):
                    out.append((n, int(seq or 0)))
        return out[:limit]

    async def role(self, room: str, user_id: str) -> str | None:
        role = await self._call(self.redis.hget(self.keys(room)[3], user_id))
        return _text(role) if role is not None else None

    async def members(self, room: str, limit: int) -> list[tuple[str, str]]:
        rows = await self._call(self.redis.hgetall(self.keys(room)[3]))
        out = sorted(((_text(k), _text(v)) for k, v in rows.items()), key=lambda r: (r[1] != "owner", r[0]))
        return out[:limit]

    async def _append_event(self, room: str, args: list[Any]) -> Appended:
        seq, ts, dup = await self._call(self._event(keys=self._script_keys(room), args=[*args, self.node_id]))
        return Appended(int(seq), int(ts), bool(dup))

    async def set_member(self, room: str, user_id: str, role: str | None, event: str, by_id: str,
                         by_name: str, ts: int) -> Appended:
        rest = {"event": event, "user": user_id, "by": {"id": by_id, "name": by_name}, "ts": ts}
        return await self._append_event(room, ["member", user_id, by_id, by_name, ts,
                                               *self._envelope(room, "member", rest), role or "", event])

    async def delete(self, room: str, target: int, by_id: str, by_name: str, ts: int) -> Appended:
        rest = {"target": target, "by": {"id": by_id, "name": by_name}, "ts": ts}
        return await self._append_event(room, ["delete", target, by_id, by_name, ts,
                                               *self._envelope(room, "deleted", rest), "", ""])


# -- presence --------------------------------------------------------------------------


# Drop the room's entries that expired by ``now`` (KEYS[1] ``pres``, KEYS[2]
# ``who``), in chunks that stay within Lua's stack; how many there were.
_DROP_EXPIRED = """
local function drop_expired(now)
  local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
  for i = 1, #expired, 1000 do
    local chunk = {unpack(expired, i, math.min(i + 999, #expired))}
    redis.call('ZREM', KEYS[1], unpack(chunk))
    redis.call('HDEL', KEYS[2], unpack(chunk))
  end
  return #expired
end
"""

_PRESENCE_MEMBERS = _DROP_EXPIRED + """
drop_expired(ARGV[1])
local live = redis.call('ZRANGE', KEYS[1], 0, -1)
local out = {}
for i = 1, #live, 1000 do
  local values = redis.call('HMGET', KEYS[2], unpack(live, i, math.min(i + 999, #live)))
  for _, v in ipairs(values) do
    if v then out[#out + 1] = v end
  end
end
return out
"""


_PRESENCE_REFRESH = _DROP_EXPIRED + """
local expiry, names = ARGV[1], ARGV[2] == '1'
local changed = drop_expired(ARGV[3])
for i = 4, #ARGV, 2 do
  local added = redis.call('ZADD', KEYS[1], expiry, ARGV[i])
  changed = changed + added
  if added == 1 or names then
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  end
end
return changed
"""
REFRESH_CHUNK = 500  # entries per script call: a heartbeat of a big room never holds Redis for long


class _MemberRead:
    """The read of one room's members in flight, and the one queued behind it."""

    __slots__ = ("running", "queued")

    def __init__(self) -> None:
        self.running: asyncio.Future[dict[str, str]] | None = None
        self.queued: asyncio.Future[dict[str, str]] | None = None


class RedisPresenceStore:
    """Each room: ``pres`` (a sorted set of entry keys scored by when they
    expire) and ``who`` (entry key -> user id and name).  Expired entries are
    dropped by whoever reads the room next.  Expiry uses the nodes' clocks:
    keep them in sync (NTP), as any cluster does.

    Reading a room's members is one script (drop the expired entries, return
    the live ones), and reads of one room are coalesced: while one is in
    flight, every caller that arrives meanwhile shares the single read queued
    behind it.  That read starts after each of them called, so it sees every
    write they made before calling (a joiner finds itself in the list), and a
    burst of N joins to a room of N members costs a few reads, not N."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self._members = redis.register_script(_PRESENCE_MEMBERS)
        self._refresh = redis.register_script(_PRESENCE_REFRESH)
        self._reads: dict[str, _MemberRead] = {}

    @staticmethod
    def keys(room: str) -> tuple[str, str]:
        tag = "rt:room:{%s}:" % room
        return tag + "pres", tag + "who"

    _call = staticmethod(_redis)

    async def refresh(self, entries: list[tuple[str, str, str, str]], ttl: float, names: bool = False) -> set[str]:
        """Push the expiry of these entries to ``ttl`` from now: one script call per
        room (and per ``REFRESH_CHUNK`` entries), which also writes an entry back that
        another node had dropped as expired, and drops the room's expired entries.
        ``names``: write every entry's name too (a join, or a rename).  Returns the
        rooms whose member list changed."""
        now = time.time()
        until = now + ttl
        by_room: dict[str, list[str]] = {}
        for room, key, user_id, name in entries:
            by_room.setdefault(room, []).extend((key, user_id + "\x1f" + name))
        calls: list[str] = []

        def queue(pipe: Any) -> None:
            calls.clear()
            for room, args in by_room.items():
                keys = list(self.keys(room))
                for i in range(0, len(args), 2 * REFRESH_CHUNK):
                    pipe.evalsha(self._refresh.sha, 2, *keys, until, "1" if names else "0", now,
                                 *args[i:i + 2 * REFRESH_CHUNK])
                    calls.append(room)

        results = await _evalsha_all(self.redis, _PRESENCE_REFRESH, queue)
        return {room for room, changed in zip(calls, results) if changed}

    async def enter(self, room: str, key: str, user_id: str, name: str, ttl: float) -> None:
        await self.refresh([(room, key, user_id, name)], ttl, names=True)

    async def leave_all(self, entries: list[tuple[str, str]]) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for room, key in entries:
                pres, who = self.keys(room)
                pipe.zrem(pres, key)
                pipe.hdel(who, key)
            await self._call(pipe.execute())

    async def leave(self, room: str, key: str) -> None:
        await self.leave_all([(room, key)])

    async def members(self, room: str) -> dict[str, str]:
        slot = self._reads.get(room)
        if slot is None:
            slot = self._reads[room] = _MemberRead()
        if slot.running is None:
            slot.running = self._start_read(room)
            return dict(await asyncio.shield(slot.running))
        if slot.queued is None:
            slot.queued = asyncio.get_running_loop().create_future()
        return dict(await asyncio.shield(slot.queued))

    def _start_read(self, room: str) -> "asyncio.Future[dict[str, str]]":
        read = asyncio.ensure_future(self._read(room))
        read.add_done_callback(lambda done: self._next_read(room, done))
        return read

    def _next_read(self, room: str, done: "asyncio.Future[dict[str, str]]") -> None:
        if not done.cancelled():
            done.exception()  # its callers have it; never "exception was never retrieved"
        slot = self._reads.get(room)
        if slot is None:
            return
        queued, slot.queued = slot.queued, None
        if queued is None:
            del self._reads[room]
            return
        slot.running = self._start_read(room)

        def hand_on(read: "asyncio.Future[dict[str, str]]") -> None:
            if queued.done():
                return
            if read.cancelled():
                queued.cancel()
            elif read.exception() is not None:
                queued.set_exception(read.exception())  # type: ignore[arg-type]
                queued.exception()
            else:
                queued.set_result(read.result())

        slot.running.add_done_callback(hand_on)

    async def _read(self, room: str) -> dict[str, str]:
        values = await self._call(self._members(keys=list(self.keys(room)), args=[time.time()]))
        out: dict[str, str] = {}
        for value in values:
            user_id, _, name = _text(value).partition("\x1f")
            out.setdefault(user_id, name)
        return out


# -- sensors ---------------------------------------------------------------------------

SENSORS_KEY = "rt:sensors"


class RedisReadingStore:
    """Each device sensor: ``meta`` (a hash) and ``pts`` (a sorted set scored by
    time, trimmed to the window); the ids in ``rt:sensors``."""

    def __init__(self, redis: Any, node_id: str = "", channel: Callable[[str], str] | None = None) -> None:
        self.redis = redis
        self._n = 0
        self.node_id = node_id
        self._channel = channel
        self.broadcasts = channel is not None

    @staticmethod
    def keys(sensor_id: str) -> tuple[str, str]:
        tag = "rt:sensor:{%s}:" % sensor_id
        return tag + "meta", tag + "pts"

    _call = staticmethod(_redis)

    async def load(self, since: float, max_points: int) -> list[tuple[Any, list[tuple[float, float]]]]:
        from realtime.storage.base import SensorRow

        ids = sorted(_text(i) for i in await self._call(self.redis.smembers(SENSORS_KEY)))
        out = []
        for sid in ids:
            meta_key, pts_key = self.keys(sid)
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hmget(meta_key, "label", "unit", "rate_hz")
                pipe.zrevrangebyscore(pts_key, "+inf", since, start=0, num=max_points)
                (label, unit, rate), members = await self._call(pipe.execute())
            if label is None:
                continue
            points = [_point(m) for m in reversed(members)]
            out.append((SensorRow(sid, _text(label), _text(unit), float(rate)), points))
        return out

    def _members(self, points: list[tuple[float, float]]) -> dict[str, float]:
        out = {}
        for t, v in points:
            self._n += 1
            out["%r|%r|%s" % (t, v, secrets.token_hex(4))] = t
        return out

    async def append(self, meta: Any, points: list[tuple[float, float]], now: float,
                     notice: tuple[str, Any] | None = None) -> None:
        meta_key, pts_key = self.keys(meta.id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hsetnx(meta_key, "label", meta.label)
            pipe.hsetnx(meta_key, "unit", meta.unit)
            pipe.hsetnx(meta_key, "rate_hz", meta.rate_hz)
            pipe.hsetnx(meta_key, "created", now)
            pipe.zadd(pts_key, self._members(points))
            if notice is not None and self._channel is not None:
                # In the same MULTI: stored and sent to the other nodes, or neither.
                from realtime.hub import Envelope
                from realtime.protocol import Outgoing

                topic, message = notice
                pipe.publish(self._channel(topic), Envelope.of(self.node_id, topic, Outgoing(message)).pack())
            await self._call(pipe.execute())
        await self._call(self.redis.sadd(SENSORS_KEY, meta.id))

    async def set_meta(self, meta: Any, now: float) -> None:
        meta_key, _ = self.keys(meta.id)
        await self._call(self.redis.hset(meta_key, mapping={
            "label": meta.label, "unit": meta.unit, "rate_hz": meta.rate_hz, "updated": now}))
        await self._call(self.redis.sadd(SENSORS_KEY, meta.id))

    async def delete(self, sensor_id: str) -> None:
        await self._call(self.redis.delete(*self.keys(sensor_id)))
        await self._call(self.redis.srem(SENSORS_KEY, sensor_id))

    async def trim(self, sensor_ids: list[str], cutoff: float, max_points: int) -> int:
        n = 0
        for sid in sensor_ids:
            _, pts_key = self.keys(sid)
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.zremrangebyscore(pts_key, "-inf", "(%r" % cutoff)
                pipe.zremrangebyrank(pts_key, 0, -(max_points + 1))
                a, b = await self._call(pipe.execute())
            n += int(a) + int(b)
        return n


def _point(member: Any) -> tuple[float, float]:
    t, v, _ = _text(member).split("|", 2)
    return float(t), float(v)


# -- documents ----------------------------------------------------------------------

DOCS_KEY = "rt:docs"

_DOC_APPEND = """
local node = ARGV[#ARGV]
local turn = redis.call('GET', KEYS[4])
if turn and turn ~= node then
  return redis.error_reply('LOGGAP turn: another node is catching up')
end
local rev = tonumber(redis.call('HGET', KEYS[1], 'rev') or '-1')
local first = tonumber(ARGV[1])
if rev ~= first - 1 then
  -- Lost the race: the next append is ours (for a moment), so a node that
  -- keeps losing to a busier one is not starved.
  redis.call('SET', KEYS[4], node, 'NX', 'PX', 200)
  return redis.error_reply('LOGGAP stored rev ' .. rev .. ', writing ' .. first)
end
if turn then redis.call('DEL', KEYS[4]) end
local n = tonumber(ARGV[2])
for i = 0, n - 1 do
  redis.call('HSET', KEYS[2], first + i, ARGV[6 + i])
end
local last = first + n - 1
redis.call('HSET', KEYS[1], 'rev', last, 'length', ARGV[3], 'updated', ARGV[4])
local snaps = tonumber(ARGV[5])
local keep = tonumber(ARGV[6 + n])
local snap_rev = nil
for j = 0, snaps - 1 do
  snap_rev = tonumber(ARGV[7 + n + 2 * j])
  redis.call('HSET', KEYS[3], 'rev', snap_rev, 'format', 1, 'data', ARGV[8 + n + 2 * j])
end
if snap_rev then
  local cut = math.min(snap_rev, last - keep)
  local low = tonumber(redis.call('HGET', KEYS[1], 'low') or '1')
  for r = low, cut do redis.call('HDEL', KEYS[2], r) end
  if cut >= low then redis.call('HSET', KEYS[1], 'low', cut + 1) end
end
return last
"""

_DOC_SNAPSHOT = """
if tonumber(redis.call('HGET', KEYS[1], 'rev') or '-1') ~= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[3], 'rev', ARGV[1], 'format', 1, 'data', ARGV[2])
local cut = tonumber(ARGV[1]) - tonumber(ARGV[3])
local low = tonumber(redis.call('HGET', KEYS[1], 'low') or '1')
for r = low, cut do redis.call('HDEL', KEYS[2], r) end
if cut >= low then redis.call('HSET', KEYS[1], 'low', cut + 1) end
return 1
"""

_DOC_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'rev', 0, 'length', 0, 'created', ARGV[1], 'updated', ARGV[1], 'low', 1)
return 1
"""


class RedisDocumentLog:
    """Each document: ``meta`` (rev, length, created, updated, low), ``ops`` (a
    hash rev -> [op, client, seq, user]) and ``snap``; ids in ``rt:docs`` by
    last edit.  ``append`` is one compare-and-append script: it stores the ops
    for revision r only if the document holds exactly r - 1 (else LogGap), so
    every node appends to one order."""

    overloaded = False

    def __init__(self, redis: Any, node_id: str = "", pipe: RespPipe | None = None) -> None:
        self.redis = redis
        self.node_id = node_id or "n-" + secrets.token_hex(6)
        self.pipe = pipe  # appends' lean connection, if the URL allows one
        self._append = redis.register_script(_DOC_APPEND)
        self._snapshot = redis.register_script(_DOC_SNAPSHOT)
        self._create = redis.register_script(_DOC_CREATE)

    @staticmethod
    def keys(doc_id: str) -> list[str]:
        tag = "rt:doc:{%s}:" % doc_id
        return [tag + "meta", tag + "ops", tag + "snap"]

    _call = staticmethod(_redis)

    async def load(self, doc_id: str, *, create: bool, max_docs: int, keep: int) -> Loaded | None:
        meta_key, ops_key, snap_key = self.keys(doc_id)
        meta = await self._call(self.redis.hgetall(meta_key))
        if not meta:
            if not create:
                return None
            if max_docs > 0 and await self._call(self.redis.zcard(DOCS_KEY)) >= max_docs:
                raise TooManyDocuments()
            ts = int(time.time() * 1000)
            await self._call(self._create(keys=[meta_key], args=[ts]))
            await self._call(self.redis.zadd(DOCS_KEY, {doc_id: ts}, nx=True))
            meta = await self._call(self.redis.hgetall(meta_key))
        m = {_text(k): _text(v) for k, v in meta.items()}
        rev = int(m["rev"])
        snap = {_text(k): _text(v) for k, v in (await self._call(self.redis.hgetall(snap_key))).items()}
        snapshot = (int(snap["rev"]), int(snap["format"]), snap["data"]) if snap else None
        snap_rev = snapshot[0] if snapshot else 0
        start = max(int(m.get("low", 1)) - 1, min(snap_rev, rev) - keep)
        revs = list(range(start + 1, rev + 1))
        raw = await self._call(self.redis.hmget(ops_key, revs)) if revs else []
        ops = []
        for r, item in zip(revs, raw):
            if item is None:
                raise StorageError("document %s: op %d is missing from Redis" % (doc_id, r))
            op, client, seq, user = ujson.loads(_text(item))
            ops.append(StoredOp(r, op, client, seq, user))
        return Loaded(rev, int(m["updated"]), snapshot, ops)

    async def append(self, doc_id: str, ops: list[StoredOp], length: int, ts: int,
                     snapshots: list[tuple[int, str]], keep: int) -> None:
        args: list[Any] = [ops[0].rev, len(ops), length, ts, len(snapshots)]
        args += [ujson.dumps([o.op, o.client, o.seq, o.user_id], ensure_ascii=False) for o in ops]
        args.append(keep)
        for rev, data in snapshots:
            args += [rev, data]
        keys = self.keys(doc_id)
        args.append(self.node_id)  # last: whose turn it is, after a lost race
        keys = [*keys, keys[0][:-4] + "turn"]
        if self.pipe is None:
            await self._call(self._append(keys=keys, args=args))
            await self._call(self.redis.zadd(DOCS_KEY, {doc_id: ts}))
            return
        # One round trip: the compare-and-append, and the documents' order by last edit.
        commands = [["EVALSHA", self._append.sha, len(keys), *keys, *args], ["ZADD", DOCS_KEY, ts, doc_id]]
        replies = await self._call(self.pipe.execute(commands))
        if isinstance(replies[0], NoScriptError):  # Redis restarted: load the script, append again
            await self._call(self.redis.script_load(_DOC_APPEND))
            replies = await self._call(self.pipe.execute(commands[:1]))
        if isinstance(replies[0], Exception):
            raise _refused(replies[0])

    async def ops_since(self, doc_id: str, rev: int) -> list[StoredOp] | None:
        meta_key, ops_key, _ = self.keys(doc_id)
        last = await self._call(self.redis.hget(meta_key, "rev"))
        if last is None or int(last) < rev:
            return None
        revs = list(range(rev + 1, int(last) + 1))
        if not revs:
            return []
        out = []
        for r, item in zip(revs, await self._call(self.redis.hmget(ops_key, revs))):
            if item is None:
                return None  # trimmed
            op, client, seq, user = ujson.loads(_text(item))
            out.append(StoredOp(r, op, client, seq, user))
        return out

    async def save_snapshot(self, doc_id: str, rev: int, data: str, keep: int) -> bool:
        return bool(await self._call(self._snapshot(keys=self.keys(doc_id), args=[rev, data, keep])))

    async def drop_if_empty(self, doc_id: str) -> bool:
        """Kept: another node may have it open (``max_docs`` counts it)."""
        return False

    async def list(self, limit: int) -> list[tuple[str, int, int, int, int]]:
        ids = [_text(i) for i in await self._call(self.redis.zrevrange(DOCS_KEY, 0, limit - 1))]
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for i in ids:
                pipe.hmget(self.keys(i)[0], "rev", "length", "created", "updated")
            rows = await self._call(pipe.execute())
        return [(i, int(r[0]), int(r[1]), int(r[2]), int(r[3])) for i, r in zip(ids, rows) if r[0] is not None]


# -- leases ---------------------------------------------------------------------------

_LEASE = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisLease:
    """``rt:lease:<name>`` holds the id of the node that has the role; it is
    renewed every ``ttl / 3`` and expires ``ttl`` after the last renewal, so a
    node that dies is replaced within ``ttl``.  While Redis does not answer, a
    node assumes it does not hold the lease (better no simulated points for a
    moment than two nodes sending them)."""

    def __init__(self, redis: Any, name: str, node_id: str, ttl: float = 3.0) -> None:
        self.redis = redis
        self.key = "rt:lease:" + name
        self.node_id = node_id
        self.ttl = ttl
        self.held = False
        self._task: asyncio.Task[None] | None = None
        self._acquire = redis.register_script(_LEASE)
        self._release = redis.register_script(_RELEASE)

    async def renew(self) -> bool:
        try:
            self.held = bool(await self._acquire(keys=[self.key], args=[self.node_id, int(self.ttl * 1000)]))
        except (RedisError, OSError):
            self.held = False
        return self.held

    async def start(self) -> None:
        await self.renew()
        self._task = asyncio.ensure_future(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            await self.renew()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.held:
            self.held = False
            try:
                await asyncio.wait_for(self._release(keys=[self.key], args=[self.node_id]), 2.0)
            except (RedisError, OSError, asyncio.TimeoutError):
                pass


# -- the factory ------------------------------------------------------------------------


class RedisStorage:
    """Every app's repository on one Redis (cluster mode), beside the backplane
    that shares its connection and node id."""

    name = "redis"

    def __init__(self, backplane: Any) -> None:
        self.backplane = backplane
        self.redis = backplane.redis

    def chat_log(self, keep: int, topic: Callable[[str], str] | None = None) -> RedisChatLog:
        from realtime.backplane.redis import channel

        return RedisChatLog(self.redis, keep, node_id=self.backplane.node_id, channel=channel, topic=topic,
                            pipe=getattr(self.backplane, "pipe", None))

    def reading_store(self) -> RedisReadingStore:
        from realtime.backplane.redis import channel

        return RedisReadingStore(self.redis, self.backplane.node_id, channel)

    def document_log(self) -> RedisDocumentLog:
        return RedisDocumentLog(self.redis, self.backplane.node_id, pipe=getattr(self.backplane, "pipe", None))

    def presence_store(self) -> RedisPresenceStore:
        return RedisPresenceStore(self.redis)

    def lease(self, name: str, ttl: float = 3.0) -> RedisLease:
        return RedisLease(self.redis, name, self.backplane.node_id, ttl)

    async def open(self) -> None:
        pass  # the backplane connected (and checked) Redis

    async def close(self) -> None:
        pass  # the backplane owns the connection


def shared_secret(url: str, name: str, generate: Callable[[], str]) -> str:
    """The cluster's secret ``name``: generated once into Redis by the first
    node that asks, then the same for every node.  Raises ``ConnectionError``."""
    import redis as sync_redis

    key = "rt:secret:" + name
    try:
        client = sync_redis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=3.0)
        try:
            client.set(key, generate(), nx=True)
            value = client.get(key)
        finally:
            client.close()
    except (RedisError, OSError) as e:
        raise ConnectionError("cannot reach Redis at %s: %s" % (url, e)) from None
    return _text(value)
