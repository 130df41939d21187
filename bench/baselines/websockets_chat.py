"""Baselines (b) and (c): a ``websockets`` chat written the way its tutorial shows.

A global registry of connected clients (here one set per room), and either

- ``--fanout=loop``: the tutorial loop, ``await websocket.send(message)`` to each
  member in turn. ``send`` waits for the write buffer to drain, so one client that
  stops reading stalls every message after it; or
- ``--fanout=broadcast``: the library's ``broadcast()``, which writes to every open
  connection without waiting and without backpressure (a slow client's buffer grows
  until its ping times out).

Everything else is the library's defaults.

    python bench/baselines/websockets_chat.py --port=8002 --fanout=broadcast
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench.baselines import common


class Chat:
    def __init__(self, fanout: str) -> None:
        self.rooms: common.Rooms[ServerConnection] = common.Rooms()
        self.fanout = fanout

    async def handler(self, websocket: ServerConnection) -> None:
        user_id = self.rooms.new_user_id()
        query = parse_qs(urlsplit(websocket.request.path).query) if websocket.request else {}
        name = query.get("name", ["guest"])[0]
        joined_rooms: set[str] = set()
        await websocket.send(json.dumps(common.welcome(user_id, name)))
        try:
            async for message in websocket:
                try:
                    msg = json.loads(message)
                    kind = msg["type"]
                    room = msg["room"]
                except (ValueError, KeyError, TypeError):
                    await websocket.send(json.dumps(common.error("expected a JSON object with type and room")))
                    continue
                if kind == "join":
                    joined_rooms.add(room)
                    await websocket.send(json.dumps(common.joined(room, self.rooms.join(room, websocket))))
                elif kind == "say":
                    seq = self.rooms.next_seq(room)
                    cid = msg.get("cid")
                    await websocket.send(json.dumps(common.ack(cid, seq)))
                    chat = json.dumps(common.chat_message(room, seq, user_id, name, msg.get("text", ""), cid))
                    await self.send_to_room(room, chat)
        finally:
            self.rooms.leave_all(websocket, joined_rooms)

    async def send_to_room(self, room: str, message: str) -> None:
        members = self.rooms.members.get(room, set())
        if self.fanout == "broadcast":
            broadcast(members, message)
            return
        for websocket in members.copy():
            try:
                await websocket.send(message)
            except ConnectionClosed:
                pass


async def main() -> None:
    args = common.parse_args(__doc__.splitlines()[0], {
        "--fanout": {"choices": ["loop", "broadcast"], "default": "loop",
                     "help": "await send() per member in turn, or the library's broadcast()"},
    })
    common.raise_nofile_limit()
    logging.basicConfig(level=logging.WARNING)
    chat = Chat(args.fanout)
    async with serve(chat.handler, args.address, args.port, backlog=args.backlog):
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
