"""The bus's raw connections (``cluster.pipe``) against a real redis-server: pipelining, scripts Redis
forgot, a Redis that hangs or dies, passwords and databases, and the subscriber's messages."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from haip_runtime.cluster.dialing import command_client, reach
from haip_runtime.cluster.health import BusHealth
from haip_runtime.cluster.pipe import Pipe, Subscriber
from haip_runtime.exceptions import ClusterError
from tests.support.netcut import NetCut, netcut
from tests.support.ports import free_port
from tests.support.redis import RedisServer, running_redis

pytestmark = pytest.mark.anyio

COUNT = "return redis.call('INCRBY', KEYS[1], ARGV[1])"


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with running_redis() as server:
        yield server


#: The password of ``locked``'s Redis.
PASSWORD = "pw"


@pytest.fixture
def locked(redis: RedisServer) -> RedisServer:
    """The test's Redis, asking for ``PASSWORD``."""
    with Redis(port=redis.port) as client:
        client.config_set("requirepass", PASSWORD)
    return redis


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
        writes = pipe.writes
        assert await pipe.calls(("SET", "a", 1), ("INCR", "a"), ("GET", "a")) == [b"OK", 2, b"2"]
        assert pipe.writes == writes + 1  # one write, run in order
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await pipe.calls(("INCR", "a"), ("LPUSH", "a", "x"), ("INCR", "a"))
        assert await pipe.call("GET", "a") == b"4"  # the error was its own: both INCRs ran
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
        replies = await pipe.scripts(COUNT, [(["n"], [1]), (["n"], ["not a number"]), (["n"], [1])], settle=True)
        assert replies[0::2] == [10, 11] and isinstance(replies[1], ResponseError)  # each its own reply
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


async def test_password_and_database_from_the_url(locked: RedisServer) -> None:
    wrong = pipe_to(f"redis://:nope@127.0.0.1:{locked.port}/0")
    with pytest.raises(ResponseError, match="WRONGPASS|invalid"):
        await wrong.call("PING")
    await wrong.aclose()
    pipe = pipe_to(f"redis://:{PASSWORD}@127.0.0.1:{locked.port}/3")
    await pipe.call("SET", "where", "three")
    assert await pipe.call("GET", "where") == b"three"
    await pipe.call("SELECT", 0)
    assert await pipe.call("GET", "where") is None  # it was in database 3
    await pipe.aclose()
    subscriber = Subscriber(f"redis://:{PASSWORD}@127.0.0.1:{locked.port}/3", connect_timeout=2)
    await subscriber.connect()
    subscriber.subscribe("ch")
    assert await subscriber.messages(timeout=2) == [[b"subscribe", b"ch", 1]]
    subscriber.close()


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


async def test_the_subscriber_with_a_password_waits_quietly_for_its_first_message(locked: RedisServer) -> None:
    """AUTH's and SELECT's answers are not messages: ``messages`` keeps waiting through them."""
    for _ in range(20):  # whether AUTH's answer comes in a read of its own varies: try it often
        subscriber = Subscriber(f"redis://:{PASSWORD}@127.0.0.1:{locked.port}/2", connect_timeout=2)
        await subscriber.connect()
        assert await subscriber.messages(timeout=0.01) == []
        subscriber.subscribe("x")
        with anyio.fail_after(5):
            got = await subscriber.messages(timeout=5)
        assert got == [[b"subscribe", b"x", 1]]
        subscriber.close()
    refused = Subscriber(f"redis://:wrong@127.0.0.1:{locked.port}/0", connect_timeout=2)
    await refused.connect()
    with anyio.fail_after(5), pytest.raises(ResponseError):
        await refused.messages(timeout=5)
    refused.close()


async def test_a_password_for_a_redis_that_has_none_is_ignored_as_redis_py_ignores_it(redis: RedisServer) -> None:
    """A tester's find: ``check --connect`` (redis-py, ``HELLO 3 AUTH``) said Redis answered; ``serve`` (this
    pipe, ``AUTH``: "called without any password configured") then failed to start, with a traceback."""
    url = f"redis://:not-needed@127.0.0.1:{redis.port}/1"
    client = command_client(url)
    await reach(client, BusHealth(), 5)  # what check --connect does
    await client.aclose()
    pipe, subscriber = pipe_to(url), Subscriber(url, connect_timeout=2)
    try:
        await subscriber.connect()
        subscriber.subscribe("x")
        with anyio.fail_after(5):
            assert await subscriber.messages(timeout=5) == [[b"subscribe", b"x", 1]]
        assert await pipe.call("PUBLISH", "x", "hello") == 1
        await pipe.call("SET", "in-db-1", "yes")  # SELECT came after the AUTH Redis did not need
        with Redis(port=redis.port, db=1) as check:
            assert check.get("in-db-1") == b"yes"
    finally:
        subscriber.close()
        await pipe.aclose()


async def test_a_caller_cancelled_while_connecting_does_not_fail_the_others(locked: RedisServer) -> None:
    with netcut(locked.port) as cut:
        pipe = pipe_to(f"redis://:{PASSWORD}@127.0.0.1:{cut.port}/0")
        cut.cut("hang")  # connections are accepted, nothing answers: the connect waits on AUTH
        answers: list[object] = []

        async def second() -> None:
            answers.append(await pipe.call("PING"))

        async with anyio.create_task_group() as tg:
            with anyio.CancelScope() as first:
                tg.start_soon(second)
                await anyio.to_thread.run_sync(cut.wait_until, accepted)  # the connect is under way
                first.cancel()
                await pipe.call("PING")  # the first caller, cancelled while AUTH waits
            cut.heal()
        assert answers == [b"PONG"]
        await pipe.aclose()
        with pytest.raises(RedisConnectionError, match="closed"):
            await pipe.call("PING")


async def test_a_pipe_closed_while_it_connects_stays_closed(redis: RedisServer) -> None:
    with netcut(redis.port) as cut:
        cut.cut("hang")
        pipe = Pipe(f"redis://:pw@127.0.0.1:{cut.port}/0", timeout=2, connect_timeout=5)
        outcome: list[BaseException] = []

        async def caller() -> None:
            try:
                await pipe.call("PING")
            except RedisConnectionError as exc:
                outcome.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(caller)
            await anyio.to_thread.run_sync(cut.wait_until, accepted)
            await pipe.aclose()
        assert len(outcome) == 1
        cut.heal()
        with pytest.raises(RedisConnectionError, match="closed"):
            await pipe.call("PING")
        cut.wait_until(lambda c: c.active == 0)


def accepted(cut: NetCut) -> bool:
    return cut.accepted > 0


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, as PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    key_file.write_bytes(pem)
    return cert_file, key_file


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[int, Path, Path]]:
    """A redis-server speaking only TLS (Redis asks clients for a certificate by default): port, cert, key."""
    cert, key = make_certificate(tmp_path)
    port = free_port()
    tls = ["--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path)]
    tls += ["--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert)]
    process = subprocess.Popen(["redis-server", *tls], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert process.stdout is not None
    try:
        for line in process.stdout:  # its log says when it listens
            if b"Ready to accept connections" in line:
                break
        yield port, cert, key
    finally:
        process.terminate()
        process.wait(timeout=10)
        process.stdout.close()


async def test_rediss_urls_mean_what_they_mean_to_redis_py(tls_redis: tuple[int, Path, Path]) -> None:
    """TLS as redis-py makes it of the same URL: a CA file, a client certificate, or no verification."""
    port, cert, key = tls_redis
    base = f"rediss://127.0.0.1:{port}/0"
    client = f"ssl_certfile={cert}&ssl_keyfile={key}"
    for query in [f"ssl_ca_certs={cert}&{client}", f"ssl_cert_reqs=none&{client}"]:
        pipe = pipe_to(f"{base}?{query}")
        assert await pipe.call("PING") == b"PONG"
        subscriber = Subscriber(f"{base}?{query}", connect_timeout=2)
        await subscriber.connect()
        subscriber.subscribe("t")
        with anyio.fail_after(5):
            assert await subscriber.messages(timeout=5) == [[b"subscribe", b"t", 1]]
        subscriber.close()
        await pipe.aclose()
    unverified = pipe_to(f"{base}?{client}")  # the system's CAs do not know this certificate
    with pytest.raises(RedisConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        await unverified.call("PING")
    await unverified.aclose()
    commands = command_client(f"{base}?{client}")
    try:  # reaching Redis at start says so at once (no retry makes it trusted), and what to add
        with pytest.raises(ClusterError, match=r"certificate was refused .*self.signed.*\?ssl_ca_certs="):
            await reach(commands, BusHealth(), timeout=30)
    finally:
        await commands.aclose()
