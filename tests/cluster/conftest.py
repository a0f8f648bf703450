"""The cluster tests' Redis (a real redis-server), nodes on it, and waiting on deliveries."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio
import pytest

from haip_runtime.cluster import Bus, LogEntry, LogGap
from haip_runtime.config.clustering import ClusterConfig

#: Short timings so that expiries and heartbeats happen within a test.
FAST: dict[str, Any] = {"heartbeat_seconds": 0.1, "node_ttl_seconds": 1, "connect_timeout_seconds": 5}

BusFactory = Callable[..., AbstractAsyncContextManager[Bus]]


def make_config(url: str, prefix: str, **options: Any) -> ClusterConfig:
    return ClusterConfig(redis_url=url, key_prefix=prefix, **{**FAST, **options})


@pytest.fixture
def bus_at(prefix: str) -> BusFactory:
    """``async with bus_at(url, **options) as bus``: a node on the Redis at ``url``, under the test's prefix."""

    @asynccontextmanager
    async def make(url: str, **options: Any) -> AsyncIterator[Bus]:
        async with Bus(make_config(url, prefix, **options)) as bus:
            yield bus

    return make


class Collector:
    """A ``Deliver`` that keeps what it is given; ``wait(n)`` returns once it holds ``n`` items."""

    def __init__(self) -> None:
        self.items: list[LogEntry | LogGap] = []
        self._grew = anyio.Event()

    def __call__(self, items: Sequence[LogEntry | LogGap]) -> None:
        self.items.extend(items)
        self._grew.set()
        self._grew = anyio.Event()

    async def wait(self, count: int, timeout: float = 5) -> list[LogEntry | LogGap]:
        with anyio.fail_after(timeout):
            while len(self.items) < count:
                await self._grew.wait()
        return self.items

    @property
    def tseqs(self) -> list[int]:
        return [item.tseq for item in self.items if isinstance(item, LogEntry)]

    @property
    def payloads(self) -> list[bytes]:
        return [item.data for item in self.items if isinstance(item, LogEntry)]


async def until(condition: Callable[[], Awaitable[bool]], timeout: float = 5) -> None:
    """Poll ``condition`` until true: only for what Redis lets expire by its clock (no event tells us)."""
    with anyio.fail_after(timeout):
        while True:
            if await condition():
                return
            await anyio.sleep(0.02)
