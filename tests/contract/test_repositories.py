"""The storage contract of each app, held against every implementation."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from realtime.storage.base import (
    LogGap,
    NoSuchMessage,
    NotAMember,
    RoomExists,
    SensorRow,
    StoredOp,
    TooManyDocuments,
    TooManyRooms,
)
from tests.contract.conftest import run
from tests.waiting import until

# -- chat -----------------------------------------------------------------------------


def test_a_room_is_created_once_with_one_epoch(storage: Any) -> None:
    async def main() -> None:
        async with storage() as s:
            log = s.chat_log(keep=5)
            assert await log.find_room("r", 10) is None
            first = await log.open_room("r", 10)
            again = await log.open_room("r", 10)
            assert first.epoch == again.epoch and first.epoch
            assert (first.last_seq, first.oldest_seq, first.recent) == (0, 1, [])
            other = await log.open_room("s", 10)
            assert other.epoch != first.epoch
            assert sorted(await log.rooms(10)) == [("r", 0), ("s", 0)]

    run(main())


def test_rooms_are_listed_by_activity_and_capped(storage: Any) -> None:
    async def main() -> None:
        async with storage() as s:
            log = s.chat_log(keep=5)
            for room in ("a", "b", "c"):
                await log.open_room(room, 10, max_rooms=3)
                await asyncio.sleep(0.01)
            with pytest.raises(TooManyRooms):
                await log.open_room("d", 10, max_rooms=3)
            assert (await log.open_room("a", 10, max_rooms=3)).last_seq == 0  # an existing one still opens
            await log.append("a", "u", "n", "hi", int(time.time() * 1000) + 1000, None)
            assert [r for r, _ in await log.rooms(10)] == ["a", "c", "b"]
            # Empty rooms may be dropped (a shared store may keep them); a room with messages never is.
            assert await log.drop_if_empty("a") is False
            if await log.drop_if_empty("b"):
                assert await log.find_room("b", 10) is None
                assert [r for r, _ in await log.rooms(10)] == ["a", "c"]

    run(main())


def test_seqs_are_gap_free_under_concurrent_appends_and_cids_dedupe(storage: Any) -> None:
    async def main() -> None:
        async with storage() as s:
            log = s.chat_log(keep=100)
            await log.open_room("r", 10)
            results = await asyncio.gather(*[
                log.append("r", "u%d" % (i % 3), "n", "text %d" % i, 1000 + i, "c%d" % i) for i in range(40)])
            assert sorted(r.seq for r in results) == list(range(1, 41))
            assert not any(r.duplicate for r in results)
            retry = await log.append("r", "u0", "n", "text 0 again", 9999, "c0")
            first = next(r for r in results if r.seq == retry.seq)
            assert retry.duplicate and (retry.seq, retry.ts) == (first.seq, first.ts)
            # The same cid from another user, or with no cid, is a new message.
            assert (await log.append("r", "u9", "n", "x", 1, "c0")).seq == 41
            assert (await log.append("r", "u0", "n", "x", 1, None)).seq == 42
            record = await log.find_room("r", 3)
            assert record is not None and record.last_seq == 42
            assert [m["seq"] for m in record.recent] == [40, 41, 42]

    run(main())


def test_history_reads_after_a_seq_oldest_or_newest_first(storage: Any) -> None:
    async def main() -> None:
        async with storage() as s:
            log = s.chat_log(keep=1000)
            await log.open_room("r", 10)
            for i in range(1, 11):
                await log.append("r", "u1", "ann", "m%d" % i, 100 + i, None if i % 2 else "c%d" % i)
            oldest = await log.read("r", 3, 4, False)
            assert [m["seq"] for m in oldest] == [4, 5, 6, 7]
            newest = await log.read("r", 3, 4, True)
            assert [m["seq"] for m in newest] == [7, 8, 9, 10]
            assert await log.read("r", 10, 5, True) == []
            m = (await log.read("r", 1, 1, False))[0]
            assert m == {"type": "message", "room": "r", "seq": 2, "user": "u1", "name": "ann", "text": "m2",
                         "ts": 102, "cid": "c2"}
            assert "cid" not in (await log.read("r", 0, 1, False))[0]

    run(main())


def test_old_messages_are_trimmed_to_keep(storage: Any) -> None:
    async def main() -> None:
        async with storage() as s:
            log = s.chat_log(keep=5)
            await log.open_room("r", 10)
            for i in range(200):
                await log.append("r", "u", "n", "m", i, None)
            record = await log.find_room("r", 10)
            assert record is not None and record.last_seq == 200 and record.oldest_seq == 196
            assert [m["seq"] for m in record.recent] == list(range(196, 201))
            assert [m["seq"] for m in await log.read("r", 0, 100, False)] == list(range(196, 201))

    run(main())


def test_private_and_dm_rooms_are_created_with_their_members(storage: Any) -> None:
    async def main() -> None:
        async with storage() as s:
            log = s.chat_log(keep=50)
            await log.open_room("lobby", 10)
            ops = await log.create_room("ops", "private", "ann", ["bob", "ann"], 10)
            assert (ops.kind, ops.owner, ops.last_seq, ops.recent) == ("private", "ann", 0, [])
            assert ops.epoch
            assert await log.members("ops", 10) == [("ann", "owner"), ("bob", "member")]
            assert (await log.role("ops", "bob"), await log.role("ops", "carl")) == ("member", None)
            # A name is taken once, by a public room or a private one.
            with pytest.raises(RoomExists):
                await log.create_room("ops", "private", "carl", [], 10)
            with pytest.raises(RoomExists):
                await log.create_room("lobby", "private", "carl", [], 10)
            assert (await log.open_room("ops", 10)).kind == "private"  # joining does not make it public
            # A direct-message room asked for twice is the same room.
            dm = await log.create_room("dm-x", "dm", None, ["ann", "bob"], 10)
            again = await log.create_room("dm-x", "dm", None, ["ann", "bob"], 10)
            assert (dm.kind, dm.owner, again.epoch) == ("dm", None, dm.epoch)
            assert await log.members("dm-x", 10) == [("ann", "member"), ("bob", "member")]
            found = await log.find_room("dm-x", 0)
            assert found is not None and found.kind == "dm" and found.recent == []
            with pytest.raises(RoomExists):
                await log.create_room("ops", "dm", None, ["ann", "bob"], 10)
            # Each user lists the public rooms and the rooms it is a member of, nothing else.
            assert sorted(r for r, _ in await log.rooms(10, "bob")) == ["dm-x", "lobby", "ops"]
            assert sorted(r for r, _ in await log.rooms(10, "carl")) == ["lobby"]
            assert sorted(r for r, _ in await log.rooms(10)) == ["lobby"]
            # Private rooms are never dropped as empty.
            assert await log.drop_if_empty("ops") is False and await log.drop_if_empty("dm-x") is False
            assert (await log.find_room("ops", 1)) is not None

    run(main())


def test_only_members_write_to_private_rooms_and_a_ban_keeps_a_user_out_of_a_public_one(storage: Any) -> None:
    async def main() -> None:
        async with storage() as s:
            log = s.chat_log(keep=50)
            await log.create_room("ops", "private", "ann", ["bob"], 10)
            assert (await log.append("ops", "bob", "bob", "hi", 1, "b1")).seq == 1
            with pytest.raises(NotAMember):
                await log.append("ops", "carl", "carl", "let me in", 2, "c1")
            added = await log.set_member("ops", "carl", "member", "added", "ann", "Ann", 3)
            assert (added.seq, added.duplicate) == (2, False)
            assert (await log.append("ops", "carl", "carl", "thanks", 4, "c1")).seq == 3
            removed = await log.set_member("ops", "bob", None, "removed", "ann", "Ann", 5)
            assert removed.seq == 4 and await log.role("ops", "bob") is None
            with pytest.raises(NotAMember):
                await log.append("ops", "bob", "bob", "still here?", 6, "b2")
            # A retry of a message stored before the removal is still acknowledged, not refused.
            assert (await log.append("ops", "bob", "bob", "hi", 7, "b1")).duplicate
            entries = await log.read("ops", 0, 10, False)
            assert [(e["seq"], e["type"]) for e in entries] == [(1, "message"), (2, "member"), (3, "message"),
                                                                (4, "member")]
            assert entries[1] == {"type": "member", "room": "ops", "seq": 2, "event": "added", "user": "carl",
                                  "by": {"id": "ann", "name": "Ann"}, "ts": 3}
            assert entries[3]["event"] == "removed" and entries[3]["user"] == "bob"
            await log.open_room("lobby", 10)
            await log.set_member("lobby", "eve", "banned", "removed", "mod", "Mod", 8)
            assert await log.role("lobby", "eve") == "banned"
            with pytest.raises(NotAMember):
                await log.append("lobby", "eve", "eve", "spam", 9, None)
            await log.set_member("lobby", "eve", None, "added", "mod", "Mod", 10)
            assert (await log.append("lobby", "eve", "eve", "sorry", 11, None)).seq == 3

    run(main())


def test_a_deleted_message_is_a_tombstone_in_seq_order_and_its_text_is_gone(storage: Any) -> None:
    async def main() -> None:
        async with storage() as s:
            log = s.chat_log(keep=50)
            await log.open_room("r", 10)
            for i in range(1, 6):
                await log.append("r", "u1", "ann", "m%d" % i, 100 + i, "c%d" % i)
            first = await log.delete("r", 2, "mod", "Mod", 200)
            assert (first.seq, first.ts, first.duplicate) == (6, 200, False)
            again = await log.delete("r", 2, "mod2", "Other", 300)
            assert (again.seq, again.duplicate) == (6, True)  # retried: the same tombstone
            for bad in (6, 99, 0):  # a tombstone, a seq never used, nothing
                with pytest.raises(NoSuchMessage):
                    await log.delete("r", bad, "mod", "Mod", 301)
            entries = await log.read("r", 0, 10, False)
            assert [e["seq"] for e in entries] == [1, 2, 3, 4, 5, 6]
            assert entries[1] == {"type": "message", "room": "r", "seq": 2, "user": "u1", "name": "ann", "text": "",
                                  "ts": 102, "cid": "c2", "deleted": True}
            assert entries[5] == {"type": "deleted", "room": "r", "seq": 6, "target": 2,
                                  "by": {"id": "mod", "name": "Mod"}, "ts": 200}
            # Every read sees the same: newest first, from a seq, the room's recent entries.
            assert await log.read("r", 0, 3, True) == entries[3:]
            assert await log.read("r", 1, 2, False) == entries[1:3]
            assert await log.read("r", 2, 2, False) == entries[2:4]
            record = await log.find_room("r", 5)
            assert record is not None and record.recent == entries[1:] and record.oldest_seq == 1
            # Deleting the oldest message keeps the room's oldest seq where it was.
            await log.delete("r", 1, "mod", "Mod", 201)
            record = await log.find_room("r", 10)
            assert record is not None and record.oldest_seq == 1 and record.recent[0]["deleted"]
            # A retry of the deleted message's cid is a duplicate, not a new message.
            retry = await log.append("r", "u1", "ann", "m2", 400, "c2")
            assert (retry.seq, retry.duplicate) == (2, True)
            assert (await log.append("r", "u1", "ann", "m8", 401, None)).seq == 8

    run(main())


def test_deleted_messages_are_trimmed_like_the_others(storage: Any) -> None:
    async def main() -> None:
        async with storage() as s:
            log = s.chat_log(keep=5)
            await log.open_room("r", 10)
            for i in range(1, 96):
                await log.append("r", "u", "n", "m", i, "c%d" % i)
            await log.delete("r", 95, "mod", "Mod", 96)  # seq 96
            for i in range(97, 201):
                await log.append("r", "u", "n", "m", i, "c%d" % i)
            record = await log.find_room("r", 10)
            assert record is not None and record.oldest_seq == 196
            assert [e["seq"] for e in await log.read("r", 0, 100, False)] == list(range(196, 201))
            # The trimmed message's cid went with it: the same cid is a new message now.
            assert not (await log.append("r", "u", "n", "m", 300, "c95")).duplicate

    run(main())


# -- documents ----------------------------------------------------------------------------


def ops(first: int, n: int) -> list[StoredOp]:
    return [StoredOp(r, '[%d, "x"]' % (r - 1) if r > 1 else '["x"]', "c-abcd", r, "u1")
            for r in range(first, first + n)]


def test_documents_are_created_on_demand_up_to_max_docs(storage: Any) -> None:
    async def main() -> None:
        async with storage() as s:
            log = s.document_log()
            assert await log.load("a", create=False, max_docs=2, keep=10) is None
            a = await log.load("a", create=True, max_docs=2, keep=10)
            assert a is not None and (a.rev, a.snapshot, a.ops) == (0, None, [])
            await log.load("b", create=True, max_docs=2, keep=10)
            with pytest.raises(TooManyDocuments):
                await log.load("c", create=True, max_docs=2, keep=10)
            assert await log.load("a", create=True, max_docs=2, keep=10) is not None  # exists: fine
            assert sorted(r[0] for r in await log.list(10)) == ["a", "b"]

    run(main())


def test_append_is_compare_and_append(storage: Any) -> None:
    async def main() -> None:
        async with storage() as s:
            log = s.document_log()
            await log.load("d", create=True, max_docs=0, keep=10)
            await log.append("d", ops(1, 3), 3, 1, [], 10)
            with pytest.raises(LogGap):
                await log.append("d", ops(5, 1), 4, 2, [], 10)  # rev 4 missing
            with pytest.raises(LogGap):
                await log.append("d", ops(3, 1), 3, 2, [], 10)  # rev 3 is taken
            # Two writers racing for rev 4: exactly one wins.
            results = await asyncio.gather(log.append("d", ops(4, 1), 4, 3, [], 10),
                                           log.append("d", ops(4, 1), 4, 3, [], 10), return_exceptions=True)
            assert sorted(type(r).__name__ for r in results) == ["LogGap", "NoneType"]
            loaded = await log.load("d", create=False, max_docs=0, keep=10)
            assert loaded is not None and loaded.rev == 4 and [o.rev for o in loaded.ops] == [1, 2, 3, 4]
            assert loaded.ops[0] == StoredOp(1, '["x"]', "c-abcd", 1, "u1")
            listed = await log.list(10)
            assert [(r[0], r[1], r[2]) for r in listed] == [("d", 4, 4)]

    run(main())


def test_ops_since_reads_the_tail_of_the_log(storage: Any) -> None:
    async def main() -> None:
        async with storage() as s:
            log = s.document_log()
            assert await log.ops_since("nope", 0) is None
            await log.load("d", create=True, max_docs=0, keep=2)
            assert await log.ops_since("d", 0) == []
            await log.append("d", ops(1, 6), 6, 1, [(4, '{"rev": 4}')], 2)
            tail = await log.ops_since("d", 4)  # the log keeps 2 ops before rev 6 (and all after the snapshot)
            assert tail is not None and [o.rev for o in tail] == [5, 6]
            assert tail[0] == StoredOp(5, '[4, "x"]', "c-abcd", 5, "u1")
            assert await log.ops_since("d", 6) == []
            assert await log.ops_since("d", 3) is None  # trimmed
            assert await log.ops_since("d", 7) is None  # ahead of the log

    run(main())


def test_snapshots_bound_the_replay(storage: Any) -> None:
    async def main() -> None:
        async with storage() as s:
            log = s.document_log()
            await log.load("d", create=True, max_docs=0, keep=2)
            await log.append("d", ops(1, 5), 5, 1, [(5, '{"rev": 5}')], 2)
            await log.append("d", ops(6, 3), 8, 1, [], 2)
            loaded = await log.load("d", create=False, max_docs=0, keep=2)
            assert loaded is not None and loaded.snapshot == (5, 1, '{"rev": 5}')
            assert [o.rev for o in loaded.ops] == [4, 5, 6, 7, 8]  # 2 before the snapshot, all after
            assert not await log.save_snapshot("d", 7, "{}", 2)  # not the stored rev
            assert await log.save_snapshot("d", 8, '{"rev": 8}', 2)
            loaded = await log.load("d", create=False, max_docs=0, keep=2)
            assert loaded is not None and loaded.snapshot == (8, 1, '{"rev": 8}')
            assert [o.rev for o in loaded.ops] == [7, 8]

    run(main())


# -- sensors -------------------------------------------------------------------------------


def test_readings_round_trip_with_metadata(storage: Any) -> None:
    async def main() -> None:
        async with storage() as s:
            rs = s.reading_store()
            meta = SensorRow("boiler", "Boiler", "°C", 2.0)
            await rs.append(meta, [(100.0, 1.0), (101.0, 2.5)], 101.0)
            await rs.append(SensorRow("boiler", "ignored", "", 1.0), [(102.0, 3.0)], 102.0)  # meta kept
            await rs.append(SensorRow("fan", "fan", "", 1.0), [(50.0, 9.0)], 50.0)
            loaded = dict(await rs.load(since=0.0, max_points=100))
            assert loaded[meta] == [(100.0, 1.0), (101.0, 2.5), (102.0, 3.0)]
            assert list(dict(await rs.load(since=100.5, max_points=100))[meta]) == [(101.0, 2.5), (102.0, 3.0)]
            assert dict(await rs.load(since=0.0, max_points=1))[meta] == [(102.0, 3.0)]
            await rs.set_meta(SensorRow("boiler", "Boiler 2", "K", 4.0), 103.0)
            rows = [row for row, _ in await rs.load(0.0, 10)]
            assert SensorRow("boiler", "Boiler 2", "K", 4.0) in rows
            assert await rs.trim(["boiler", "fan"], cutoff=101.0, max_points=1) == 3
            loaded = {row.id: pts for row, pts in await rs.load(0.0, 100)}
            assert loaded == {"boiler": [(102.0, 3.0)], "fan": []}
            await rs.delete("fan")
            assert [row.id for row, _ in await rs.load(0.0, 100)] == ["boiler"]

    run(main())


# -- presence (cluster storages only: one process knows its members itself) -----------------


def test_presence_entries_count_a_user_once_and_expire_unless_refreshed(storage: Any) -> None:
    async def main() -> None:
        async with storage() as s:
            ps = s.presence_store()
            if ps is None:
                assert s.name == "sqlite"
                return
            await ps.enter("r", "n1|u1", "u1", "ann", 30)
            await ps.enter("r", "n2|u1", "u1", "ann", 30)  # the same user through another node
            entered = time.monotonic()
            await ps.enter("r", "n2|u2", "u2", "bob", 0.3)
            assert await ps.members("r") == {"u1": "ann", "u2": "bob"}
            await ps.leave("r", "n1|u1")
            assert await ps.members("r") == {"u1": "ann", "u2": "bob"}  # still there through n2

            async def bob_gone() -> bool:
                return await ps.members("r") == {"u1": "ann"}

            await until(bob_gone, interval=0.02)  # bob's node stopped refreshing
            assert time.monotonic() - entered >= 0.25, "gone before its ttl"
            await ps.refresh([("r", "n2|u2", "u2", "bob")], 30)
            assert await ps.members("r") == {"u1": "ann", "u2": "bob"}
            await ps.leave_all([("r", "n2|u1"), ("r", "n2|u2")])
            assert await ps.members("r") == {}
            assert await ps.members("other") == {}

    run(main())


def test_a_presence_refresh_drops_what_expired_and_says_which_rooms_changed(storage: Any) -> None:
    """The heartbeat re-reads only the rooms this names: where another node's
    entries expired (dropped by this refresh), or where ours had expired and
    came back."""
    async def main() -> None:
        async with storage() as s:
            ps = s.presence_store()
            if ps is None:
                return
            mine = [("r", "n1|u1", "u1", "ann"), ("q", "n1|u1", "u1", "ann")]
            await ps.enter("r", "n1|u1", "u1", "ann", 30)
            await ps.enter("q", "n1|u1", "u1", "ann", 30)
            await ps.enter("r", "n2|u2", "u2", "bob", 0.2)  # bob's node will die
            assert await ps.refresh(mine, 30) == set()  # nothing changed anywhere
            await asyncio.sleep(0.3)
            assert await ps.refresh(mine, 30) == {"r"}  # bob's entry expired: dropped now
            assert await ps.refresh(mine, 30) == set()
            assert await ps.members("r") == {"u1": "ann"}
            await ps.leave("q", "n1|u1")  # as if another node had dropped ours as expired
            assert await ps.refresh(mine, 30) == {"q"}  # written back
            assert await ps.members("q") == {"u1": "ann"}

    run(main())
