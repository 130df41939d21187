"""realtime.storage.resp: the lean connection chat says use, against a real redis-server."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis as sync_redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from realtime.storage.resp import RespPipe, pack, supports
from tests.redis_server import RedisServer
from tests.servers import free_port


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_it_speaks_plain_redis_urls_only() -> None:
    assert supports("redis://127.0.0.1:6379/0") and supports("redis://:secret@host/2")
    assert not supports("rediss://host:6380/0")
    assert not supports("unix:///run/redis.sock")
    assert not supports("redis://host:notaport/0")
    assert pack(["SET", "k", "é", 3, 1.5, b"\x00"]) == (
        b"*6\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n\xc3\xa9\r\n$1\r\n3\r\n$3\r\n1.5\r\n$1\r\n\x00\r\n")
    with pytest.raises(TypeError):
        pack(["SET", "k", None])


def test_a_pipeline_gets_every_reply_in_order_with_errors_in_their_place(redis_url: str) -> None:
    async def main() -> None:
        pipe = RespPipe(redis_url)
        try:
            got = await pipe.execute([["DEL", "t:a", "t:n"], ["SET", "t:a", "héllo 😀"], ["GET", "t:a"],
                                      ["INCR", "t:a"], ["INCRBYFLOAT", "t:n", 1.5], ["RPUSH", "t:l", 1, 2],
                                      ["LRANGE", "t:l", 0, -1], ["EVALSHA", "0" * 40, 0]])
            assert got[1] == b"OK" and got[2] == "héllo 😀".encode()
            assert isinstance(got[3], ResponseError) and "not an integer" in str(got[3])
            assert got[4] == b"1.5" and got[5] == 2 and got[6] == [b"1", b"2"]
            assert isinstance(got[7], NoScriptError)
            # Many batches in flight at once are answered each with its own replies.
            many = await asyncio.gather(*(pipe.execute([["INCR", "t:c"], ["GET", "t:c"]]) for _ in range(50)))
            assert sorted(r[0] for r in many) == list(range(1, 51))
            assert all(r[1] == str(r[0]).encode() for r in many)
        finally:
            await pipe.close()

    run(main())


def test_it_connects_again_after_the_connection_is_lost(redis_url: str) -> None:
    async def main() -> None:
        pipe = RespPipe(redis_url, timeout=0.3)
        try:
            assert await pipe.execute([["QUIT"]]) == [b"OK"]  # the server closes the connection
            await asyncio.sleep(0.05)
            assert await pipe.execute([["PING"]]) == [b"PONG"]
            # No answer in time: the command fails, the connection is dropped, the next one works.
            with pytest.raises(RedisConnectionError, match="did not answer"):
                await pipe.execute([["BLPOP", "t:never", 2]])
            assert await pipe.execute([["PING"]]) == [b"PONG"]
        finally:
            await pipe.close()

    run(main())


def test_an_unreachable_redis_is_a_connection_error() -> None:
    async def main() -> None:
        pipe = RespPipe("redis://127.0.0.1:%d/0" % free_port(), connect_timeout=1.0)
        with pytest.raises(RedisConnectionError, match="cannot reach Redis"):
            await pipe.execute([["PING"]])

    run(main())


def test_password_and_database_from_the_url(tmp_path: Any) -> None:
    server = RedisServer(str(tmp_path / "redis")).start()
    try:
        admin = sync_redis.Redis(port=server.port)
        admin.config_set("requirepass", "s3cr t")
        url = "redis://:s3cr%%20t@127.0.0.1:%d/3" % server.port

        async def main() -> None:
            pipe = RespPipe(url)
            try:
                assert await pipe.execute([["SET", "t:db", "three"]]) == [b"OK"]
            finally:
                await pipe.close()
            wrong = RespPipe("redis://:nope@127.0.0.1:%d/0" % server.port)
            with pytest.raises(RedisConnectionError, match="refused"):
                await wrong.execute([["PING"]])

        run(main())
        assert sync_redis.Redis(port=server.port, password="s3cr t", db=3).get("t:db") == b"three"
        assert sync_redis.Redis(port=server.port, password="s3cr t", db=0).get("t:db") is None
    finally:
        server.stop()
