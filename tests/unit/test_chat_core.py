"""The pure parts of chat: resume decisions, the join seam, presence coalescing."""

import pytest

from realtime.auth import Identity
from realtime.chat import (
    Presence,
    PresenceBatch,
    RoomState,
    RoomSubscription,
    check_text,
    resume_plan,
    valid_room,
)
from realtime.protocol import Outgoing, ProtocolError
from tests.waiting import until

PLAN = dict(epoch="e1", history_size=50, resume_max=1000)


def test_resume_without_since_gives_recent_history():
    p = resume_plan(last_seq=120, oldest_seq=1, since=None, client_epoch=None, **PLAN)
    assert (p.recovered, p.after, p.limit) == (False, 70, 50)


def test_resume_same_epoch_gets_exactly_the_gap():
    p = resume_plan(last_seq=120, oldest_seq=1, since=100, client_epoch="e1", **PLAN)
    assert (p.recovered, p.after, p.limit) == (True, 100, 20)


def test_resume_up_to_date_is_recovered_and_empty():
    p = resume_plan(last_seq=120, oldest_seq=1, since=120, client_epoch="e1", **PLAN)
    assert p.recovered and p.limit == 0


@pytest.mark.parametrize("since,epoch,oldest", [
    (100, "other", 1),     # the store was reset
    (121, "e1", 1),        # client claims the future
    (10, "e1", 50),        # messages 11..49 were trimmed
])
def test_resume_falls_back_to_recent(since, epoch, oldest):
    p = resume_plan(last_seq=120, oldest_seq=oldest, since=since, client_epoch=epoch, **PLAN)
    assert not p.recovered and p.after == 70


def test_resume_at_edge_of_kept_history_is_recovered():
    p = resume_plan(last_seq=120, oldest_seq=50, since=49, client_epoch="e1", **PLAN)
    assert p.recovered and p.after == 49


def test_resume_gap_bigger_than_resume_max_is_not_recovered():
    p = resume_plan(last_seq=5000, oldest_seq=1, since=1, client_epoch="e1", epoch="e1",
                    history_size=50, resume_max=1000)
    assert not p.recovered


def _msg(seq):
    return {"type": "message", "room": "r", "seq": seq, "text": str(seq)}


class Sink:
    def __init__(self):
        self.got = []
        self.user = Identity("u1", "ann")

    def deliver(self, out):
        self.got.append(out.obj)

    def send(self, obj):
        self.got.append(obj)

    def seqs(self):
        return [m["seq"] for m in self.got if m.get("type") == "message"]


def test_seam_drops_what_history_had_and_keeps_order():
    sink = Sink()
    sub = RoomSubscription(sink, "r")
    for seq in (4, 5, 6):  # live messages arrive while history is read
        sub.deliver(Outgoing(_msg(seq), seq=seq))
    sub.deliver(Outgoing({"type": "presence", "room": "r"}))
    assert sink.got == []
    sub.release(5)  # history covered up to 5
    assert [m.get("seq") for m in sink.got] == [6, None]
    sub.deliver(Outgoing(_msg(6), seq=6))  # a duplicate never shows twice
    sub.deliver(Outgoing(_msg(7), seq=7))
    assert [m.get("seq") for m in sink.got] == [6, None, 7]


def test_room_cache_serves_gaps_only_when_complete():
    room = RoomState("r", "e", last_seq=0, oldest_seq=1, cache_size=3)
    for seq in range(1, 6):
        room.committed(_msg(seq), keep=1000)
    assert room.last_seq == 5
    assert [m["seq"] for m in room.cached_after(3, 10)] == [4, 5]
    assert room.cached_after(5, 10) == []
    assert room.cached_after(1, 10) is None  # 2 is no longer cached
    assert [m["seq"] for m in room.cached_after(2, 1)] == [5]


def test_presence_counts_a_user_once_across_tabs():
    p = Presence()
    ann = Identity("u1", "ann")
    assert p.add("r", ann) is True
    assert p.add("r", ann) is False  # second tab
    assert p.count("r") == 1
    assert p.remove("r", ann) is False
    assert p.remove("r", ann) is True
    assert p.count("r") == 0 and p.rooms() == []
    assert p.remove("r", ann) is False


def test_presence_batch_shapes():
    one = PresenceBatch()
    one.join({"id": "a", "name": "A"})
    assert one.message("r", 1, list, 50)["event"] == "join"
    flap = PresenceBatch()
    flap.join({"id": "a", "name": "A"})
    flap.leave({"id": "a", "name": "A"})
    assert flap.message("r", 0, list, 50) is None  # joined and left within the window
    few = PresenceBatch()
    for i in range(3):
        few.join({"id": str(i), "name": str(i)})
    few.leave({"id": "x", "name": "X"})
    msg = few.message("r", 3, list, 50)
    assert msg["event"] == "diff" and len(msg["joined"]) == 3 and len(msg["left"]) == 1
    many = PresenceBatch()
    for i in range(100):
        many.join({"id": str(i), "name": str(i)})
    msg = many.message("r", 100, lambda: [{"id": "0", "name": "0"}], 50)
    assert msg["event"] == "sync" and msg["member_count"] == 100 and len(msg["members"]) == 1


@pytest.mark.parametrize("text,code", [
    ("", "bad_message"), ("   \n", "bad_message"), (5, "bad_message"), (None, "bad_message"),
    ("x" * 11, "too_large"), ("a\x00b", "bad_message"), ("\x1b[31m", "bad_message"),
])
def test_check_text_rejects(text, code):
    with pytest.raises(ProtocolError) as e:
        check_text(text, 10)
    assert e.value.code == code


def test_check_text_keeps_newlines_and_emoji():
    assert check_text("a\nb 😀", 10) == "a\nb 😀"


@pytest.mark.parametrize("name,ok", [
    ("lobby", True), ("a", True), ("Room_1.x-y", True), ("x" * 64, True),
    ("", False), ("x" * 65, False), ("-lead", False), ("sp ace", False), ("é", False), (5, False),
])
def test_room_names(name, ok):
    assert valid_room(name) is ok


def test_rename_within_the_window_is_announced():
    batch = PresenceBatch()
    batch.leave({"id": "a", "name": "old"})
    batch.join({"id": "a", "name": "new"})
    msg = batch.message("r", 1, list, 50)
    assert msg["event"] == "join" and msg["user"] == {"id": "a", "name": "new"}
    p = Presence()
    assert p.add("r", Identity("a", "old")) is True
    assert p.add("r", Identity("a", "new")) is True  # second tab under a new name
    assert p.members("r", 10) == [{"id": "a", "name": "new"}]


# -- the room relay: what arrives from other nodes ---------------------------------


def _relay_case(tmp_path, body):
    """Run ``body(svc, log, hub, sink, subs)`` with ann joined to room r, over
    SQLite and the in-memory hub."""
    import asyncio

    from realtime.backplane.memory import MemoryBackplane
    from realtime.chat import ChatService
    from realtime.hub import Hub
    from realtime.storage.sqlite import SQLiteStore
    from realtime.storage.sqlite_repos import SQLiteStorage

    async def main():
        storage = SQLiteStorage(SQLiteStore(str(tmp_path / "db")))
        log = storage.chat_log(keep=1000)
        await storage.open()
        hub = Hub(MemoryBackplane())
        svc = ChatService(log, hub, presence_window=0.001)
        sink = Sink()
        sink.user = Identity("u-ann", "ann")
        subs = {}
        try:
            reply = await svc.join(sink, subs, "r", None, None)
            subs["r"].release(reply["seq"])
            await body(svc, log, hub, sink, subs)
        finally:
            svc.leave_all(sink, subs)
            await storage.close()

    asyncio.run(asyncio.wait_for(main(), 10))


async def _stored(log, n, start=1):
    """n messages written to the log as another node would: (seq, Outgoing) pairs."""
    out = []
    for i in range(n):
        a = await log.append("r", "u-bob", "bob", "m%d" % (start + i), 1, None)
        msg = {"type": "message", "room": "r", "seq": a.seq, "user": "u-bob", "name": "bob",
               "text": "m%d" % (start + i), "ts": 1}
        out.append(Outgoing(msg, seq=a.seq))
    return out


def test_relay_passes_messages_on_once_in_seq_order_and_fills_gaps(tmp_path):

    async def body(svc, log, hub, sink, subs):
        msgs = await _stored(log, 6)
        hub.dispatch("chat:r", msgs[0])
        hub.dispatch("chat:r", msgs[0])  # a duplicate
        hub.dispatch("chat:r", msgs[3])  # 2 and 3 were lost in transit
        hub.dispatch("chat:r", msgs[1])  # arrives late, while the gap is filled
        hub.dispatch("chat:r", msgs[5])
        await until(lambda: len(sink.seqs()) >= 6)
        assert sink.seqs() == [1, 2, 3, 4, 5, 6]  # 5 came from the log too
        assert svc.gaps_filled >= 1
        state = await svc.room("r")
        assert state.last_seq == 6 and [m["seq"] for m in state.recent] == [1, 2, 3, 4, 5, 6]
        # A member who joins now gets the relayed messages from memory, in order.
        other = Sink()
        other.user = Identity("u-cy", "cy")
        mine = {}
        reply = await svc.join(other, mine, "r", 2, state.epoch)
        assert reply["recovered"] and [m["seq"] for m in reply["messages"]] == [3, 4, 5, 6]
        svc.leave_all(other, mine)

    _relay_case(tmp_path, body)


def test_relay_with_no_local_members_is_gone_and_http_reads_the_log(tmp_path):
    import asyncio

    async def body(svc, log, hub, sink, subs):
        svc.leave_all(sink, subs)
        assert hub.subscribers("chat:r") == 0
        await _stored(log, 3)  # said through another node: nothing arrives here
        page = await svc.messages_since("r", None, 10)
        assert page["seq"] == 3 and [m["seq"] for m in page["messages"]] == [1, 2, 3]
        await asyncio.sleep(0)

    _relay_case(tmp_path, body)


def test_may_create_is_asked_only_when_a_room_is_really_created(tmp_path):
    import pytest

    from realtime.protocol import ProtocolError

    async def body(svc, log, hub, sink, subs):
        asked: list[bool] = []

        def budget(answer):
            def may_create():
                asked.append(answer)
                return answer
            return may_create

        other = Sink()
        other.user = Identity("u-cy", "cy")
        mine: dict = {}
        assert (await svc.join(other, mine, "r", None, None, budget(False)))["room"] == "r"  # exists
        with pytest.raises(ProtocolError) as refused:
            await svc.join(other, mine, "new", None, None, budget(False))
        assert refused.value.code == "rate_limited" and "new" not in mine
        assert await log.find_room("new", 0) is None  # refused: nothing stored
        assert (await svc.join(other, mine, "new", None, None, budget(True)))["room"] == "new"
        with pytest.raises(ProtocolError) as taken:
            await svc.create_private(other.user, "r", [], budget(False))
        assert taken.value.code == "conflict"
        with pytest.raises(ProtocolError) as refused:
            await svc.create_private(other.user, "priv", [], budget(False))
        assert refused.value.code == "rate_limited" and await log.find_room("priv", 0) is None
        dm = await svc.join_dm(other, mine, "u-ann", None, None, budget(True))
        ann_side = await svc.join_dm(sink, subs, "u-cy", None, None, budget(False))  # exists: not asked
        assert ann_side["room"] == dm["room"]
        assert asked == [False, True, False, True]
        svc.leave_all(other, mine)

    _relay_case(tmp_path, body)
