"""Pure pieces of chat authorization: who may read, direct-message names, tombstones in the cache."""

from realtime.chat import RoomState, dm_room, valid_room
from realtime.storage.base import may_read, redacted, tombstone_json


def test_may_read_is_one_rule_for_every_kind_of_room():
    assert may_read("public", None) and may_read("public", "member") and not may_read("public", "banned")
    for kind in ("private", "dm"):
        assert may_read(kind, "owner") and may_read(kind, "member")
        assert not may_read(kind, None) and not may_read(kind, "banned")


def test_a_dm_room_name_is_the_same_either_way_valid_and_distinct():
    assert dm_room("ann", "bob") == dm_room("bob", "ann")
    assert dm_room("ann", "bob") != dm_room("ann", "bobby") != dm_room("an", "nbob")
    long_ids = dm_room("a" * 64, "b:" + "c" * 62)
    assert valid_room(long_ids) and long_ids.startswith("dm-") and len(long_ids) == 35
    # Ids that would collide if simply joined do not.
    assert dm_room("a\nb", "c") != dm_room("a", "b\nc")


def msg(seq, text="t"):
    return {"type": "message", "room": "r", "seq": seq, "user": "u", "name": "n", "text": text, "ts": seq}


def test_a_tombstone_redacts_the_cached_message_as_the_store_does():
    room = RoomState("r", "e", last_seq=0, oldest_seq=1, cache_size=10)
    for i in range(1, 4):
        room.committed(msg(i, "m%d" % i), keep=100)
    room.committed(tombstone_json("r", 4, 2, "mod", "Mod", 9), keep=100)
    assert room.cached_after(0, 10) == [msg(1, "m1"), redacted(msg(2, "m2")), msg(3, "m3"),
                                        tombstone_json("r", 4, 2, "mod", "Mod", 9)]
    assert room.recent[1]["text"] == "" and room.recent[1]["deleted"] is True
    # A target older than the cache, or not a message, changes nothing.
    room.committed(tombstone_json("r", 5, 4, "mod", "Mod", 9), keep=100)
    small = RoomState("r", "e", last_seq=0, oldest_seq=1, cache_size=2)
    for i in range(1, 4):
        small.committed(msg(i), keep=100)
    small.committed(tombstone_json("r", 4, 1, "mod", "Mod", 9), keep=100)
    assert [m["seq"] for m in small.recent] == [3, 4] and small.recent[0]["text"] == "t"
