"""Baseline (a): a minimal Tornado chat that broadcasts the way Tornado's demos do.

Like ``demos/chat`` and ``demos/websocket``, each chat message is handed to every
member with ``write_message(dict)``, so Tornado JSON-encodes it once per recipient and
queues it on that recipient's IOStream without bound. ``--encode=once`` encodes the
frame text once and passes the same string to every ``write_message`` instead, to show
how much of the cost is the per-recipient encoding.

    python bench/baselines/tornado_chat.py --port=8001
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from typing import Any

import tornado.escape
import tornado.httpserver
import tornado.netutil
import tornado.web
import tornado.websocket

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench.baselines import common


class ChatSocketHandler(tornado.websocket.WebSocketHandler):
    def initialize(self, rooms: common.Rooms[ChatSocketHandler], encode_once: bool) -> None:
        self.rooms = rooms
        self.encode_once = encode_once
        self.joined_rooms: set[str] = set()

    def open(self) -> None:
        self.user_id = self.rooms.new_user_id()
        self.name = self.get_argument("name", "guest")
        self.write_message(common.welcome(self.user_id, self.name))

    def on_message(self, message: str | bytes) -> None:
        try:
            msg = tornado.escape.json_decode(message)
            kind = msg["type"]
            room = msg["room"]
        except (ValueError, KeyError, TypeError):
            self.write_message(common.error("expected a JSON object with type and room"))
            return
        if kind == "join":
            self.joined_rooms.add(room)
            self.write_message(common.joined(room, self.rooms.join(room, self)))
        elif kind == "say":
            seq = self.rooms.next_seq(room)
            cid = msg.get("cid")
            self.write_message(common.ack(cid, seq))
            chat = common.chat_message(room, seq, self.user_id, self.name, msg.get("text", ""), cid)
            self.send_updates(room, chat)

    def send_updates(self, room: str, chat: dict[str, Any]) -> None:
        payload: dict[str, Any] | str = json.dumps(chat) if self.encode_once else chat
        for waiter in self.rooms.members.get(room, ()):
            try:
                waiter.write_message(payload)
            except tornado.websocket.WebSocketClosedError:
                pass
            except Exception:
                logging.getLogger(__name__).exception("Error sending message")

    def on_close(self) -> None:
        self.rooms.leave_all(self, self.joined_rooms)


async def main() -> None:
    args = common.parse_args(__doc__.splitlines()[0], {
        "--encode": {"choices": ["each", "once"], "default": "each",
                     "help": "encode per recipient (the demos' way) or once per message"},
    })
    common.raise_nofile_limit()
    logging.basicConfig(level=logging.WARNING)
    rooms: common.Rooms[ChatSocketHandler] = common.Rooms()
    app = tornado.web.Application([
        (r"/ws/chat", ChatSocketHandler, {"rooms": rooms, "encode_once": args.encode == "once"}),
    ])
    server = tornado.httpserver.HTTPServer(app)
    server.add_sockets(tornado.netutil.bind_sockets(args.port, args.address, backlog=args.backlog))
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
