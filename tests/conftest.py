from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.serving import LiveServer, live_server, make_config


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    """The runtime with the echo and storyteller agents, on a real uvicorn."""
    with live_server(make_config()) as live:
        yield live
