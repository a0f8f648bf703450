"""The PostgreSQL the store tests run against (tests.support.postgres) and the proxy that cuts it off
(tests.support.netcut): each does what the store tests will count on."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import anyio
import asyncpg
import pytest

from tests.support.netcut import netcut
from tests.support.postgres import PostgresServer, with_port

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def connected(url: str, **options: Any) -> AsyncIterator[Any]:
    connection = await asyncpg.connect(url, **options)
    try:
        yield connection
    finally:
        await connection.close(timeout=5)


async def test_a_query_works_through_asyncpg(postgres_url: str) -> None:
    async with connected(postgres_url) as db:
        await db.execute("CREATE TABLE notes (id serial PRIMARY KEY, text text NOT NULL)")
        await db.execute("INSERT INTO notes (text) VALUES ($1), ($2)", "one", "two")
        assert [row["text"] for row in await db.fetch("SELECT text FROM notes ORDER BY id")] == ["one", "two"]
        assert await db.fetchval("SELECT current_user") == urlsplit(postgres_url).username


async def test_each_test_gets_an_empty_database_of_its_own(postgres_server: PostgresServer, postgres_url: str) -> None:
    other = postgres_server.create_database()
    async with connected(postgres_url) as db, connected(other) as db2:
        await db.execute("CREATE TABLE mine (x int)")
        assert await db2.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == 0
        assert await db.fetchval("SELECT current_database()") != await db2.fetchval("SELECT current_database()")
    postgres_server.drop_database(urlsplit(other).path.lstrip("/"))


async def test_the_password_is_checked(postgres_server: PostgresServer, postgres_url: str) -> None:
    if not postgres_server.owned:
        pytest.skip("an external server's authentication is its own")
    parts = urlsplit(postgres_url)
    wrong = postgres_url.replace(f":{parts.password}@", ":not-the-password@", 1)
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(wrong)


async def test_a_restart_keeps_the_data_and_the_port(postgres_server: PostgresServer, postgres_url: str) -> None:
    async with connected(postgres_url) as db:
        await db.execute("CREATE TABLE kept (x int); INSERT INTO kept VALUES (42)")
    port = postgres_server.port
    postgres_server.restart()
    assert postgres_server.port == port
    async with connected(postgres_url) as db:
        assert await db.fetchval("SELECT x FROM kept") == 42


async def test_a_crash_cuts_sessions_and_recovery_keeps_every_commit(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    async with connected(postgres_url) as survivor:
        await survivor.execute("CREATE TABLE kept (x int)")
        for x in range(100):
            await survivor.execute("INSERT INTO kept VALUES ($1)", x)
        postgres_server.crash()
        with pytest.raises((asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError)):
            await survivor.fetchval("SELECT 1", timeout=10)
    postgres_server.start()
    assert "was not properly shut down" in postgres_server.log_text()  # it really ran crash recovery
    async with connected(postgres_url) as db:
        assert await db.fetchval("SELECT count(*) FROM kept") == 100


async def test_a_cluster_of_our_own_takes_settings_over_the_test_ones(postgres_server: PostgresServer) -> None:
    if not postgres_server.owned:
        pytest.skip("starting a second cluster needs PostgreSQL installed here, not only HAIP_TEST_POSTGRES_URL")
    durable = PostgresServer(settings={"fsync": "on", "full_page_writes": "on"})
    try:
        durable.start()
        async with connected(durable.url) as db:
            assert await db.fetchval("SHOW fsync") == "on"
            assert await db.fetchval("SHOW full_page_writes") == "on"
            assert await db.fetchval("SHOW max_connections") == "200"  # the other test settings stay
    finally:
        durable.close()
    async with connected(postgres_server.url) as db:  # the session's cluster keeps the test settings
        assert await db.fetchval("SHOW fsync") == "off"


async def test_stop_and_start_are_skipped_for_an_external_server() -> None:
    external = PostgresServer(external_url="postgresql://haip:secret@127.0.0.1:1/haip")
    assert not external.owned and external.running
    with pytest.raises(pytest.skip.Exception, match="HAIP_TEST_POSTGRES_URL"):
        external.crash()
    with pytest.raises(pytest.skip.Exception, match="HAIP_TEST_POSTGRES_URL"):
        external.start()


async def test_a_reset_cut_breaks_the_session_and_refuses_new_ones_until_healed(postgres_url: str) -> None:
    port = urlsplit(postgres_url).port
    assert port is not None
    with netcut(port) as line:
        through = with_port(postgres_url, line.port)
        async with connected(through) as db:
            assert await db.fetchval("SELECT 1") == 1
            line.cut()
            assert line.active == 0
            with pytest.raises((asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError)):
                await db.fetchval("SELECT 1", timeout=10)
        with pytest.raises(OSError):  # ConnectionRefusedError
            await asyncpg.connect(through, timeout=10)
        line.heal()
        async with connected(through) as db:
            assert await db.fetchval("SELECT 2") == 2


async def test_a_hanging_cut_holds_the_bytes_until_healed(postgres_url: str) -> None:
    port = urlsplit(postgres_url).port
    assert port is not None
    with netcut(port) as line:
        through = with_port(postgres_url, line.port)
        async with connected(through) as db:
            line.cut("hang")
            with pytest.raises(TimeoutError):  # a new connection gets no answer at all
                await asyncpg.connect(through, timeout=0.5)
            answers: list[int] = []
            async with anyio.create_task_group() as group:

                async def ask() -> None:
                    answers.append(await db.fetchval("SELECT 3", timeout=10))

                group.start_soon(ask)
                await line.until(lambda proxy: proxy.held >= 1)  # the query waits at the proxy
                assert answers == []
                line.heal()
            assert answers == [3]
