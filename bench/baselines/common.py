"""The chat-protocol subset every baseline speaks, built the same way for each.

One load generator drives every server, so the baselines answer the same frames as
``server.py`` does for the part a benchmark exercises:

- on connect: ``{"type":"welcome","user":{"id":..,"name":..}}``
- ``{"type":"join","room":R}`` -> ``{"type":"joined","room":R,"seq":N,"members":[],"messages":[]}``
- ``{"type":"say","room":R,"text":T,"cid":C}`` -> ``{"type":"ack","cid":C,"seq":N}`` to the
  sender, then ``{"type":"message",...}`` to every member of R, the sender included.

Baselines keep rooms as ``room -> set of connections`` and a sequence number per room;
they store nothing, track no presence and send no history. Frames are JSON built with
the standard library, as the Tornado and websockets tutorials do.
"""

from __future__ import annotations

import argparse
import itertools
import resource
import time
from typing import Any, Generic, TypeVar

Conn = TypeVar("Conn")


def raise_nofile_limit() -> int:
    """Lift the soft open-files limit to the hard limit; 10,000 sockets need it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def parse_args(description: str, extra: dict[str, dict[str, Any]] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--backlog", type=int, default=16384,
                        help="listen backlog (the kernel caps it at net.core.somaxconn)")
    for name, kwargs in (extra or {}).items():
        parser.add_argument(name, **kwargs)
    return parser.parse_args()


class Rooms(Generic[Conn]):
    """room name -> members, and the next sequence number of each room."""

    def __init__(self) -> None:
        self.members: dict[str, set[Conn]] = {}
        self.seq: dict[str, int] = {}
        self._ids = itertools.count(1)

    def new_user_id(self) -> str:
        return f"u{next(self._ids)}"

    def join(self, room: str, conn: Conn) -> int:
        self.members.setdefault(room, set()).add(conn)
        return self.seq.get(room, 0)

    def leave_all(self, conn: Conn, rooms: set[str]) -> None:
        for room in rooms:
            members = self.members.get(room)
            if members is not None:
                members.discard(conn)
                if not members:
                    del self.members[room]

    def next_seq(self, room: str) -> int:
        seq = self.seq.get(room, 0) + 1
        self.seq[room] = seq
        return seq


def welcome(user_id: str, name: str) -> dict[str, Any]:
    return {"type": "welcome", "user": {"id": user_id, "name": name}}


def joined(room: str, seq: int) -> dict[str, Any]:
    return {"type": "joined", "room": room, "seq": seq, "members": [], "messages": []}


def ack(cid: Any, seq: int) -> dict[str, Any]:
    return {"type": "ack", "cid": cid, "seq": seq}


def chat_message(room: str, seq: int, user_id: str, name: str, text: str, cid: Any) -> dict[str, Any]:
    return {"type": "message", "room": room, "seq": seq, "user": user_id, "name": name,
            "text": text, "ts": time.time(), "cid": cid}


def error(message: str) -> dict[str, Any]:
    return {"type": "error", "code": "bad_message", "message": message}
