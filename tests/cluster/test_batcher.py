"""Streamed parts cross the bus in batches, and never overtake or fall behind other events."""

from __future__ import annotations

import anyio
import pytest

from haip_runtime.exceptions import ClusterError
from tests.cluster.conftest import BusFactory, Collector
from tests.support.redis import running_redis

pytestmark = pytest.mark.anyio


async def test_parts_wait_for_the_next_event_and_go_ahead_of_it_in_one_message(
    redis_url: str, bus_at: BusFactory
) -> None:
    async with bus_at(redis_url, part_batch_ms=60_000) as a, bus_at(redis_url) as b:
        seen = Collector()
        await b.feed.host("T", seen)
        for number in range(10):
            await a.batcher.part("T", b"p%d" % number)
        assert seen.items == [] and a.batcher.batches == 0
        assert await a.batcher.event("T", b"end") == 11
        await seen.wait(11)
        assert seen.payloads == [b"p%d" % n for n in range(10)] + [b"end"]
        assert seen.tseqs == list(range(1, 12)) and a.batcher.batches == 1 and a.batcher.events == 11


async def test_parts_go_when_their_bytes_fill_a_batch(redis_url: str, bus_at: BusFactory) -> None:
    async with bus_at(redis_url, part_batch_ms=60_000, part_batch_bytes=12) as a, bus_at(redis_url) as b:
        seen = Collector()
        await b.feed.host("T", seen)
        for number in range(9):
            await a.batcher.part("T", b"pt%d" % number)  # 3 bytes each: a batch every 4 parts
        await seen.wait(8)
        assert a.batcher.batches == 2 and seen.payloads == [b"pt%d" % n for n in range(8)]
        await a.batcher.flush("T")
        await seen.wait(9)
        assert seen.tseqs == list(range(1, 10))


async def test_parts_go_by_themselves_after_the_batch_delay(redis_url: str, bus_at: BusFactory) -> None:
    async with bus_at(redis_url, part_batch_ms=2) as a, bus_at(redis_url) as b:
        seen = Collector()
        await b.feed.host("T", seen)
        await a.batcher.part("T", b"alone")
        await a.batcher.part("U", b"other")
        await seen.wait(1)
        assert seen.payloads == [b"alone"]


async def test_parts_left_at_the_end_are_flushed_when_the_bus_closes(redis_url: str, bus_at: BusFactory) -> None:
    async with bus_at(redis_url) as b:
        seen = Collector()
        await b.feed.host("T", seen)
        async with bus_at(redis_url, part_batch_ms=60_000) as a:
            await a.batcher.part("T", b"last words")
        await seen.wait(1)
        assert seen.payloads == [b"last words"]


async def test_parts_whose_append_fails_are_counted_as_lost(bus_at: BusFactory) -> None:
    with running_redis() as server:
        async with bus_at(server.url, part_batch_ms=60_000) as a:
            await a.batcher.part("T", b"p1")
            await a.batcher.part("T", b"p2")
            await anyio.to_thread.run_sync(server.stop)
            with pytest.raises(ClusterError):
                await a.batcher.event("T", b"end")
            await a.batcher.part("T", b"p3")
            await a.batcher.flush("T")
            assert a.batcher.parts_lost == 3 and a.batcher.batches == 0
            await anyio.to_thread.run_sync(server.start)
