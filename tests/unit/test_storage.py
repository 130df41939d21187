"""The SQLite store: group commit, ordering, per-write rollback, migrations."""

import asyncio
import sqlite3

import pytest

from realtime.storage.sqlite import Schema, SQLiteStore

SCHEMA = Schema("t", ["CREATE TABLE items(id INTEGER PRIMARY KEY, v TEXT UNIQUE)"])


def run(coro):
    return asyncio.run(coro)


def test_burst_costs_few_commits_and_resolves_in_order(tmp_path):
    async def main():
        store = SQLiteStore(str(tmp_path / "db"))
        await store.open([SCHEMA])
        order = []
        futs = []
        for i in range(500):
            def ins(conn, i=i):
                conn.execute("INSERT INTO items(v) VALUES (?)", (str(i),))
                return i
            f = store.write(ins)
            f.add_done_callback(lambda f: order.append(f.result()))
            futs.append(f)
        await asyncio.gather(*futs)
        await asyncio.sleep(0)
        commits = store.commits
        n = await store.read(lambda c: c.execute("SELECT COUNT(*) FROM items").fetchone()[0])
        await store.close()
        return order, commits, n

    order, commits, n = run(main())
    assert order == list(range(500))
    assert n == 500
    assert commits <= 20, commits  # group commit: far fewer commits than writes


def test_a_failing_write_rolls_back_alone(tmp_path):
    async def main():
        store = SQLiteStore(str(tmp_path / "db"))
        await store.open([SCHEMA])
        a = store.write(lambda c: c.execute("INSERT INTO items(v) VALUES ('a')"))
        def bad(c):
            c.execute("INSERT INTO items(v) VALUES ('b')")
            c.execute("INSERT INTO items(v) VALUES ('a')")  # unique violation
        b = store.write(bad)
        c_ = store.write(lambda c: c.execute("INSERT INTO items(v) VALUES ('c')"))
        results = await asyncio.gather(a, b, c_, return_exceptions=True)
        rows = await store.read(lambda c: [r[0] for r in c.execute("SELECT v FROM items ORDER BY v")])
        await store.close()
        return results, rows

    results, rows = run(main())
    assert isinstance(results[1], sqlite3.IntegrityError)
    assert rows == ["a", "c"]  # 'b' was rolled back with its write


def test_close_flushes_queued_writes(tmp_path):
    path = str(tmp_path / "db")

    async def write_then_close():
        store = SQLiteStore(path)
        await store.open([SCHEMA])
        for i in range(50):
            store.write(lambda c, i=i: c.execute("INSERT INTO items(v) VALUES (?)", (str(i),)))
        await store.close()

    run(write_then_close())
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT COUNT(*) FROM items").fetchone()[0] == 50


def test_migrations_apply_once_and_refuse_newer_data(tmp_path):
    path = str(tmp_path / "db")
    v2 = Schema("t", SCHEMA.migrations + ["ALTER TABLE items ADD COLUMN w TEXT"])

    async def open_with(schema):
        store = SQLiteStore(path)
        await store.open([schema])
        await store.close()

    run(open_with(SCHEMA))
    run(open_with(v2))
    run(open_with(v2))  # idempotent
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT version FROM schema_versions WHERE component='t'").fetchone()[0] == 2
    conn.close()
    with pytest.raises(RuntimeError, match="newer version"):
        run(open_with(SCHEMA))


def test_a_chat_database_of_schema_2_is_migrated_with_its_rooms_public(tmp_path):
    """Rooms and messages written before private rooms existed stay readable and public."""
    from realtime.storage.sqlite_repos import CHAT_SCHEMA, SQLiteChatLog

    path = str(tmp_path / "db")
    old = Schema("chat", CHAT_SCHEMA.migrations[:2])

    async def write_old():
        store = SQLiteStore(path)
        await store.open([old])

        def fill(conn):
            conn.execute("INSERT INTO rooms(name, epoch, last_seq, created, active) VALUES ('lobby', 'e1', 1, 1, 1)")
            conn.execute("INSERT INTO messages(room, seq, user_id, name, text, ts, cid)"
                         " VALUES ('lobby', 1, 'u', 'ann', 'old', 5, 'c1')")

        await store.write(fill)
        await store.close()

    async def read_new():
        store = SQLiteStore(path)
        await store.open([CHAT_SCHEMA])
        log = SQLiteChatLog(store, keep=10)
        try:
            record = await log.find_room("lobby", 10)
            assert record is not None and (record.kind, record.epoch, record.last_seq) == ("public", "e1", 1)
            assert record.recent[0]["text"] == "old" and record.recent[0]["cid"] == "c1"
            assert await log.rooms(10, "anyone") == [("lobby", 1)]
            assert (await log.append("lobby", "u2", "bob", "new", 6, None)).seq == 2
            assert (await log.delete("lobby", 1, "m", "Mod", 7)).seq == 3
        finally:
            await store.close()

    run(write_old())
    run(read_new())
