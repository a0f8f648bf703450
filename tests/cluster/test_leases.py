"""Leases: one holder at a time; a holder that stops renewing loses it; nobody frees another's lease."""

from __future__ import annotations

import anyio
import pytest

from haip_runtime.cluster import HeldLease
from tests.cluster.conftest import BusFactory, until
from tests.support.redis import RedisServer

pytestmark = pytest.mark.anyio


async def test_one_holder_at_a_time_and_release_frees_it(redis_url: str, bus_at: BusFactory) -> None:
    async with bus_at(redis_url) as a, bus_at(redis_url) as b:
        token = await a.leases.acquire("run:T", 10)
        assert token is not None and await b.leases.acquire("run:T", 10) is None
        assert await a.leases.holder("run:T") == token
        assert await a.leases.release("run:T", token)
        again = await b.leases.acquire("run:T", 10)
        assert again is not None and int(again.split(":")[0]) > int(token.split(":")[0])  # fences grow


async def test_a_holder_that_stops_renewing_loses_the_lease_to_a_waiting_node(
    redis_url: str, bus_at: BusFactory
) -> None:
    async with bus_at(redis_url) as a, bus_at(redis_url) as b:
        stale = await a.leases.acquire("run:T", 0.2)  # and never renewed: a node that died
        assert stale is not None
        with anyio.fail_after(5):
            token = await b.leases.wait_acquire("run:T", 10)
        assert await b.leases.holder("run:T") == token
        # The old holder can neither extend nor delete what is now another's (compare-and-set).
        assert not await a.leases.renew("run:T", stale)
        assert not await a.leases.release("run:T", stale)
        assert await b.leases.holder("run:T") == token


async def test_a_held_lease_is_renewed_past_its_ttl_and_released_at_the_end(redis_url: str, bus_at: BusFactory) -> None:
    async with bus_at(redis_url) as a, bus_at(redis_url) as b:
        async with a.leases.hold("run:T", 0.3) as lease:
            assert lease is not None
            for _ in range(3):  # each renewal pushes the expiry on: past three times the ttl, still held
                before = await a.redis.pexpiretime(a.keys.lease("run:T"))

                async def renewed() -> bool:
                    return bool(await a.redis.pexpiretime(a.keys.lease("run:T")) > before)  # noqa: B023

                await until(renewed)
            assert await a.leases.holder("run:T") == lease.token
            async with b.leases.hold("run:T", 0.3) as other:
                assert other is None
            assert not lease.lost.is_set()
        assert await a.leases.holder("run:T") is None


async def test_a_holder_is_told_when_its_lease_was_taken(redis_url: str, bus_at: BusFactory) -> None:
    lost: list[HeldLease] = []
    async with bus_at(redis_url) as a, bus_at(redis_url) as b:
        async with a.leases.hold("run:T", 0.3, on_lost=lost.append) as lease:
            assert lease is not None
            await b.redis.delete(b.keys.lease("run:T"))  # it expired while this node was paused...
            taken = await b.leases.acquire("run:T", 10)  # ...and another node took it
            with anyio.fail_after(5):
                await lease.lost.wait()
            assert lost == [lease]
        assert await b.leases.holder("run:T") == taken  # leaving the block did not release b's lease


async def test_an_error_in_the_block_comes_out_as_itself_and_the_lease_is_released(
    redis_url: str, bus_at: BusFactory
) -> None:
    async with bus_at(redis_url) as a:
        with pytest.raises(KeyError):
            async with a.leases.hold("run:T", 10):
                raise KeyError("x")
        assert await a.leases.holder("run:T") is None


async def test_a_holder_cut_off_from_redis_counts_its_lease_lost_when_it_would_have_expired(
    own_redis: RedisServer, bus_at: BusFactory
) -> None:
    async with bus_at(own_redis.url) as a:
        async with a.leases.hold("run:T", 0.4) as lease:
            assert lease is not None
            await anyio.to_thread.run_sync(own_redis.stop)
            with anyio.fail_after(5):
                await lease.lost.wait()  # it cannot know whether another took it: it must stop
        await anyio.to_thread.run_sync(own_redis.start)
