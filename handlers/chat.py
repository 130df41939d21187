"""``/ws/chat``: a thin adapter from the socket to :class:`realtime.chat.ChatService`."""

from __future__ import annotations

import time
from functools import partial
from typing import Any

from handlers.base import BaseSocketHandler
from realtime.chat import ChatService, RoomSubscription, valid_room
from realtime.protocol import ProtocolError, get_int, get_str, get_str_list


class ChatSocketHandler(BaseSocketHandler):
    app_name = "chat"

    _typing_at: dict[str, float] | None = None

    def initialize(self, ctx: Any) -> None:  # type: ignore[override]
        super().initialize(ctx)
        self.rooms: dict[str, RoomSubscription] = {}

    @property
    def chat(self) -> ChatService:
        return self.rt.ctx.chat

    def opened(self, *args: str) -> None:
        assert self.user is not None
        self.send({
            "type": "welcome",
            "user": self.user.to_json(),
            "session": self.session_token(),
            "limits": {
                "max_text": self.chat.max_text,
                "max_rooms": self.chat.max_rooms,
                "max_message_bytes": self.cfg.max_message_size,
                "rate": self.cfg.rate_limit,
                "burst": self.cfg.rate_burst,
            },
        })

    def closed(self) -> None:
        self.chat.leave_all(self, self.rooms)

    def _may_create(self) -> bool:
        """Charge one room creation to this client's address (``--room_creates_per_minute``)."""
        return self.ctx.room_creations.take(self.ip)

    def _room(self, msg: dict[str, Any], *, joined: bool = True) -> str:
        room = get_str(msg, "room", max_len=64)
        if not valid_room(room):
            raise ProtocolError("bad_message", "room names are 1-64 letters, digits, '_', '.' or '-'")
        assert room is not None
        if joined and room not in self.rooms:
            raise ProtocolError("not_found", "join room %s first" % room)
        return room

    async def msg_join(self, msg: dict[str, Any]) -> None:
        since = get_int(msg, "since", required=False, minimum=0)
        epoch = get_str(msg, "epoch", max_len=64, required=False)
        other = get_str(msg, "with", max_len=64, required=False)
        if other is not None:  # the direct-message room with that user
            reply = await self.chat.join_dm(self, self.rooms, other, since, epoch, self._may_create)
            room = reply["room"]
        else:
            room = self._room(msg, joined=False)
            reply = await self.chat.join(self, self.rooms, room, since, epoch, self._may_create)
        sub = self.rooms.get(room)
        if sub is None or self._closing:
            return  # left or disconnected while history was read
        self.reply(msg, reply)
        sub.release(reply["seq"])

    def msg_leave(self, msg: dict[str, Any]) -> None:
        room = self._room(msg)
        self.chat.leave(self, self.rooms, room)
        if self._typing_at:
            self._typing_at.pop(room, None)
        self.send({"type": "left", "room": room})

    async def msg_say(self, msg: dict[str, Any]) -> None:
        assert self.user is not None
        room = self._room(msg)
        await self.chat.say(self.user, room, msg.get("text"), msg.get("cid"), self.send)

    async def msg_create(self, msg: dict[str, Any]) -> None:
        """A private room, owned by this user (see the roles in docs/PROTOCOL.md)."""
        assert self.user is not None
        room = self._room(msg, joined=False)
        members = get_str_list(msg, "members", max_items=self.chat.max_private_members, max_len=64) \
            if msg.get("members") is not None else []
        self.reply(msg, await self.chat.create_private(self.user, room, members, self._may_create))

    async def msg_add_member(self, msg: dict[str, Any]) -> None:
        assert self.user is not None
        target = get_str(msg, "user", max_len=64)
        assert target is not None
        await self.chat.add_member(self.user, self._room(msg, joined=False), target, partial(self.reply, msg))

    async def msg_remove_member(self, msg: dict[str, Any]) -> None:
        assert self.user is not None
        target = get_str(msg, "user", max_len=64)
        assert target is not None
        await self.chat.remove_member(self.user, self._room(msg, joined=False), target, partial(self.reply, msg))

    async def msg_delete(self, msg: dict[str, Any]) -> None:
        assert self.user is not None
        await self.chat.delete_message(self.user, self._room(msg, joined=False), msg.get("seq"),
                                       partial(self.reply, msg))

    async def msg_members(self, msg: dict[str, Any]) -> None:
        self.reply(msg, await self.chat.member_list(self.user, self._room(msg, joined=False)))

    def msg_typing(self, msg: dict[str, Any]) -> None:
        """Not stored.  At most one per ``typing_interval`` per room is relayed;
        the rest are dropped quietly (typing is a hint, not data)."""
        assert self.user is not None
        room = self._room(msg)
        now = time.monotonic()
        if self._typing_at is None:
            self._typing_at = {}
        if now - self._typing_at.get(room, -1e9) < self.chat.typing_interval:
            return
        self._typing_at[room] = now
        self.chat.typing(self.user, room)
