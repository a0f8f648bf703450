"""The bus's raw connections (``cluster.pipe``) against a real redis-server: pipelining, scripts Redis
forgot, a Redis that hangs or dies, passwords and databases, and the subscriber's messages."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from haip_runtime.cluster.pipe import Pipe, Subscriber
from tests.support.netcut import netcut
from tests.support.redis import RedisServer, running_redis

pytestmark = pytest.mark.anyio

COUNT = "return redis.call('INCRBY', KEYS[1], ARGV[1])"


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with running_redis() as server:
        yield server


def pipe_to(url: str, timeout: float = 2.0) -> Pipe:
    return Pipe(url, timeout=timeout, connect_timeout=2.0)


async def test_commands_issued_together_leave_in_one_write_and_answer_in_order(redis: RedisServer) -> None:
    pipe = pipe_to(redis.url)
    try:
        await pipe.call("SET", "k", 0)
        writes = pipe.writes
        results: dict[int, int] = {}

        async def bump(i: int) -> None:
            results[i] = await pipe.call("INCR", "k")

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(bump, i)
        assert sorted(results.values()) == list(range(1, 51))
        assert [results[i] for i in range(50)] == list(range(1, 51))  # in the order issued
        assert pipe.writes - writes < 50  # the tasks' commands shared writes
        assert await pipe.call("GET", "k") == b"50"
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await pipe.call("LPUSH", "k", "x")
        assert await pipe.call("GET", "k") == b"50"  # an error reply costs only its own command
    finally:
        await pipe.aclose()


async def test_a_script_redis_forgot_is_sent_again_with_its_source(redis: RedisServer) -> None:
    pipe = pipe_to(redis.url)
    try:
        assert await pipe.script(COUNT, ["n"], [2]) == 2
        assert await pipe.script(COUNT, ["n"], [3]) == 5  # by its SHA1 now
        await pipe.call("SCRIPT", "FLUSH")
        assert await pipe.script(COUNT, ["n"], [1]) == 6
        await pipe.call("SCRIPT", "FLUSH")
        assert await pipe.scripts(COUNT, [(["n"], [1]), (["m"], [7]), (["n"], [1])]) == [7, 7, 8]
        with pytest.raises(ResponseError):
            await pipe.scripts(COUNT, [(["n"], [1]), (["n"], ["not a number"])])
        assert await pipe.call("GET", "n") == b"9"  # the first of that batch ran; the error was its own
    finally:
        await pipe.aclose()


async def test_a_redis_that_hangs_fails_what_waits_after_the_timeout_and_the_pipe_recovers(
    redis: RedisServer,
) -> None:
    with netcut(redis.port) as cut:
        pipe = pipe_to(f"redis://127.0.0.1:{cut.port}/0", timeout=0.5)
        try:
            assert await pipe.call("PING") == b"PONG"
            cut.cut("hang")
            started = time.monotonic()
            with pytest.raises(RedisTimeoutError):
                await pipe.call("INCR", "hung")
            assert 0.4 < time.monotonic() - started < 2.0
            cut.heal()
            assert await pipe.call("PING") == b"PONG"  # a new connection
        finally:
            await pipe.aclose()


async def test_a_dead_redis_fails_at_once_and_a_restarted_one_is_used_again(redis: RedisServer) -> None:
    pipe = pipe_to(redis.url)
    try:
        assert await pipe.script(COUNT, ["c"], [1]) == 1
        redis.kill()
        with pytest.raises((RedisConnectionError, RedisTimeoutError)):
            await pipe.call("PING")
        with pytest.raises(RedisConnectionError):
            await pipe.call("PING")  # refused: nothing listens
        redis.start()
        assert await pipe.script(COUNT, ["c"], [1]) == 1  # a new Redis without the script nor the key
    finally:
        await pipe.aclose()


async def test_password_and_database_from_the_url(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    try:
        open_pipe = pipe_to(server.url)
        await open_pipe.call("CONFIG", "SET", "requirepass", "s3cret")
        await open_pipe.aclose()
        wrong = pipe_to(f"redis://:nope@127.0.0.1:{server.port}/0")
        with pytest.raises(ResponseError, match="WRONGPASS|invalid"):
            await wrong.call("PING")
        await wrong.aclose()
        pipe = pipe_to(f"redis://:s3cret@127.0.0.1:{server.port}/3")
        await pipe.call("SET", "where", "three")
        assert await pipe.call("GET", "where") == b"three"
        await pipe.call("SELECT", 0)
        assert await pipe.call("GET", "where") is None  # it was in database 3
        await pipe.aclose()
        subscriber = Subscriber(f"redis://:s3cret@127.0.0.1:{server.port}/3", connect_timeout=2)
        await subscriber.connect()
        subscriber.subscribe("ch")
        assert await subscriber.messages(timeout=2) == [[b"subscribe", b"ch", 1]]
        subscriber.close()
    finally:
        server.stop()


async def test_the_subscriber_gets_messages_in_order_and_hears_its_connection_die(redis: RedisServer) -> None:
    pipe = pipe_to(redis.url)
    subscriber = Subscriber(redis.url, connect_timeout=2)
    try:
        await subscriber.connect()
        subscriber.subscribe("a", "b")
        got: list[list[object]] = []
        with anyio.fail_after(5):
            while len(got) < 2:
                got += await subscriber.messages(timeout=1)
        assert got == [[b"subscribe", b"a", 1], [b"subscribe", b"b", 2]]
        for i in range(100):
            await pipe.call("PUBLISH", "a" if i % 2 else "b", str(i))
        got = []
        with anyio.fail_after(5):
            while len(got) < 100:
                got += await subscriber.messages(timeout=1)
        assert [data for _, _, data in got] == [str(i).encode() for i in range(100)]
        assert await subscriber.messages(timeout=0.05) == []  # quiet: nothing, after the timeout
        await pipe.call("CLIENT", "KILL", "TYPE", "pubsub")
        with anyio.fail_after(5), pytest.raises(RedisConnectionError):
            while True:
                await subscriber.messages(timeout=1)
    finally:
        subscriber.close()
        await pipe.aclose()
