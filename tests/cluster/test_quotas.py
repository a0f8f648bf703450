"""Per-user limits count across nodes; a dead node's slots free themselves."""

from __future__ import annotations

import pytest

from tests.cluster.conftest import BusFactory, until

pytestmark = pytest.mark.anyio


async def test_slots_are_counted_over_every_node(redis_url: str, bus_at: BusFactory) -> None:
    async with bus_at(redis_url) as a, bus_at(redis_url) as b:
        assert await a.quotas.acquire_slot("ann", "sessions", "s1", limit=2)
        assert await b.quotas.acquire_slot("ann", "sessions", "s2", limit=2)
        assert not await a.quotas.acquire_slot("ann", "sessions", "s3", limit=2)
        assert await a.quotas.acquire_slot("ann", "sessions", "s1", limit=2)  # one already held is refreshed
        assert await a.quotas.acquire_slot("bob", "sessions", "s3", limit=2)  # another user's own count
        assert await a.quotas.count("ann", "sessions") == 2
        await b.quotas.release_slot("ann", "sessions", "s2")
        assert await a.quotas.acquire_slot("ann", "sessions", "s3", limit=2)
        assert a.quotas.held == 3 and b.quotas.held == 0


async def test_a_dead_nodes_slots_expire_and_a_live_nodes_do_not(redis_url: str, bus_at: BusFactory) -> None:
    async with bus_at(redis_url, slot_ttl_seconds=0.4) as a:
        async with bus_at(redis_url, slot_ttl_seconds=0.4) as dying:
            assert await dying.quotas.acquire_slot("ann", "transactions", "t1", limit=2)
        # `dying` is gone without releasing (as a crash would); `a` keeps its slot alive by its heartbeat.
        assert await a.quotas.acquire_slot("ann", "transactions", "t2", limit=2)
        assert not await a.quotas.acquire_slot("ann", "transactions", "t3", limit=2)

        async def freed() -> bool:
            return await a.quotas.count("ann", "transactions") == 1

        await until(freed)
        assert await a.quotas.acquire_slot("ann", "transactions", "t3", limit=2)
        seconds, _ = await a.redis.time()
        members: list[tuple[bytes, float]] = await a.redis.zrange(  # type: ignore[assignment]
            a.keys.slots("ann", "transactions"), 0, -1, withscores=True
        )
        assert sorted(m for m, _ in members) == [b"t2", b"t3"]
        assert all(score > int(seconds) * 1000 for _, score in members)


async def test_a_rate_counts_every_nodes_hits(redis_url: str, bus_at: BusFactory) -> None:
    async with bus_at(redis_url) as a, bus_at(redis_url) as b:
        hits = [await a.quotas.hit("ann", "messages", 5, 3600) for _ in range(3)]
        hits += [await b.quotas.hit("ann", "messages", 5, 3600) for _ in range(2)]
        assert hits == [True] * 5
        assert not await a.quotas.hit("ann", "messages", 5, 3600)
        assert not await b.quotas.hit("ann", "messages", 5, 3600)
        assert await b.quotas.hit("bob", "messages", 5, 3600)


async def test_a_slot_redis_lost_is_written_again_by_its_nodes_next_heartbeat(
    redis_url: str, bus_at: BusFactory
) -> None:
    async with bus_at(redis_url) as a:
        assert await a.quotas.acquire_slot("ann", "sessions", "s1", limit=2)
        await a.redis.delete(a.keys.slots("ann", "sessions"))  # as a restart without persistence loses it

        async def counted_again() -> bool:
            return await a.quotas.count("ann", "sessions") == 1

        await until(counted_again)  # the node still holds the session: it counts again
        await a.quotas.release_slot("ann", "sessions", "s1")
        await a.quotas.refresh()
        released = await a.quotas.count("ann", "sessions")
    assert released == 0  # a released slot is not written again
