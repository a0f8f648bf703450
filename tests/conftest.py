from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from tests.support.postgres import PostgresServer
from tests.support.redis import RedisServer, running_redis, shared_redis_url
from tests.support.serving import LiveServer, live_server, make_config


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    """The runtime with the echo and storyteller agents, on a real uvicorn."""
    with live_server(make_config()) as live:
        yield live


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL for the session, started when a test first asks for it: the tests' own cluster
    (stopped and deleted at the end, pass or fail), or the one HAIP_TEST_POSTGRES_URL names."""
    server = PostgresServer.create()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh empty database for one test (a superuser's URL); dropped after it."""
    postgres_server.ensure_running()  # an earlier test may have stopped or crashed the cluster
    name = f"t_{secrets.token_hex(6)}"
    url = postgres_server.create_database(name)
    try:
        yield url
    finally:
        postgres_server.ensure_running()
        postgres_server.drop_database(name)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The test session's Redis (shared: each test uses keys of its own prefix)."""
    with shared_redis_url() as url:
        yield url


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis for this test alone, which it may stop, kill and restart."""
    with running_redis() as server:
        yield server


@pytest.fixture
def prefix() -> str:
    """Redis keys of this test's own (``cluster.key_prefix``), on a Redis shared by the session."""
    return f"t{secrets.token_hex(4)}"
