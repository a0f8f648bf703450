"""Leases: one holder at a time; a holder that stops renewing loses it; nobody frees another's lease."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

import anyio
import anyio.to_thread
import pytest

from haip_runtime.cluster import Bus, HeldLease
from haip_runtime.cluster.health import BusState
from tests.cluster.conftest import BusFactory, make_config, until
from tests.support.netcut import netcut
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


async def expiry(bus: Bus, name: str) -> int:
    """When Redis lets the lease on ``name`` expire (ms since the epoch)."""
    return int(await bus.redis.pexpiretime(bus.keys.lease(name)))


async def renewed(bus: Bus, names: list[str]) -> None:
    """Until Redis has extended each lease in ``names`` past where it stood."""
    before = {name: await expiry(bus, name) for name in names}

    async def all_later() -> bool:
        return all([await expiry(bus, name) > when for name, when in before.items()])

    await until(all_later)


async def test_the_leases_a_node_holds_are_renewed_together_in_one_write(redis_url: str, bus_at: BusFactory) -> None:
    names = [f"run:T{i}" for i in range(20)]
    async with bus_at(redis_url) as a, AsyncExitStack() as stack:
        leases = [await stack.enter_async_context(a.leases.hold(name, 0.9)) for name in names]
        assert a.leases.held == len(names)
        commands, writes = a.pipe.commands, a.pipe.writes  # the leases alone use the pipe here

        async def two_rounds() -> bool:
            return a.pipe.commands - commands >= 2 * len(names)

        await until(two_rounds)
        renewals, rounds = a.pipe.commands - commands, a.pipe.writes - writes
        assert renewals % len(names) == 0 and rounds <= renewals // len(names)  # each write renewed them all
        await renewed(a, names)
        assert all(lease is not None and not lease.lost.is_set() for lease in leases)


async def test_a_lease_taken_between_renewals_of_a_longer_one_is_renewed_within_its_own_ttl(
    redis_url: str, bus_at: BusFactory
) -> None:
    # (TTLs with room for a loaded machine: a renewal late by more than two thirds of 0.3 s lost the lease.)
    async with bus_at(redis_url) as a:
        async with a.leases.hold("run:long", 6) as long:
            commands = a.pipe.commands

            async def long_renewed() -> bool:
                return a.pipe.commands > commands

            await until(long_renewed)  # just renewed: its next renewal is two seconds away
            async with a.leases.hold("run:short", 1.2) as short:
                assert long is not None and short is not None
                for _ in range(3):  # renewed three times before the long one's next renewal: it never waited for it
                    await renewed(a, ["run:short"])
                assert await a.leases.holder("run:short") == short.token and not short.lost.is_set()
            assert not long.lost.is_set()


async def test_one_lease_taken_over_does_not_stop_the_others_being_renewed(redis_url: str, bus_at: BusFactory) -> None:
    lost: list[HeldLease] = []
    async with bus_at(redis_url) as a, bus_at(redis_url) as b:
        async with AsyncExitStack() as stack:
            held = [
                await stack.enter_async_context(a.leases.hold(f"run:T{i}", 0.6, on_lost=lost.append)) for i in range(3)
            ]
            await b.redis.delete(b.keys.lease("run:T1"))  # it expired while this node was paused...
            taken = await b.leases.acquire("run:T1", 10)  # ...and another node took it
            assert held[1] is not None
            with anyio.fail_after(5):
                await held[1].lost.wait()
            assert lost == [held[1]] and a.leases.held == 2
            await renewed(a, ["run:T0", "run:T2"])
            assert [lease is not None and lease.lost.is_set() for lease in held] == [False, True, False]
        assert await b.leases.holder("run:T1") == taken  # leaving the blocks did not release b's lease


async def test_a_lease_whose_renewal_fails_alone_is_lost_in_time_and_the_others_are_renewed(
    redis_url: str, bus_at: BusFactory
) -> None:
    async with bus_at(redis_url) as a, AsyncExitStack() as stack:
        held = [await stack.enter_async_context(a.leases.hold(f"run:T{i}", 0.6)) for i in range(3)]
        assert held[1] is not None
        key = a.keys.lease("run:T1")
        await a.redis.delete(key)
        await a.redis.hset(key, "not", "a lease")  # its renewal's GET now answers WRONGTYPE
        with anyio.fail_after(5):
            await held[1].lost.wait()  # it could not be renewed: by its deadline, it counts as lost
        await renewed(a, ["run:T0", "run:T2"])
        assert [lease is not None and lease.lost.is_set() for lease in held] == [False, True, False]


async def test_redis_away_and_back_within_the_ttl_keeps_every_lease(own_redis: RedisServer, bus_at: BusFactory) -> None:
    names = ["run:T0", "run:T1", "run:T2"]
    with netcut(own_redis.port) as line:
        async with bus_at(own_redis.url) as watcher, bus_at(f"redis://127.0.0.1:{line.port}/0") as a:
            async with AsyncExitStack() as stack:
                held = [await stack.enter_async_context(a.leases.hold(name, 3)) for name in names]
                await renewed(watcher, names)
                await anyio.to_thread.run_sync(line.cut)

                async def past_due() -> bool:  # a third of the ttl and more since the last renewal: due, and failed
                    left = [await watcher.leases.left(name) for name in names]
                    return max(left) < 1.8

                await until(past_due)
                await anyio.to_thread.run_sync(line.heal)
                await renewed(watcher, names)
                assert all(lease is not None and not lease.lost.is_set() for lease in held)
                assert [await watcher.leases.holder(name) for name in names] == [
                    lease and lease.token for lease in held
                ]


async def test_cancelling_keep_stops_renewing_and_leaves_the_lease_to_expire(
    redis_url: str, bus_at: BusFactory
) -> None:
    async with bus_at(redis_url) as a:
        token = await a.leases.acquire("run:T", 0.3)
        assert token is not None
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(a.leases.keep, "run:T", token, 0.3)
                await renewed(a, ["run:T"])
                assert a.leases.held == 1
                scope.cancel()
        assert a.leases.held == 0

        async def expired() -> bool:
            return await a.leases.holder("run:T") is None

        await until(expired)  # not renewed since, and not released either: it ran out by itself


async def test_keep_needs_a_running_bus_and_a_bus_that_stops_loses_what_it_kept(
    redis_url: str, bus_at: BusFactory, prefix: str
) -> None:
    idle = Bus(make_config(redis_url, prefix))  # never entered: nothing would renew
    with anyio.fail_after(5), pytest.raises(RuntimeError, match="bus"):
        await idle.leases.keep("run:T", "1:x", 10)
    lost = anyio.Event()

    async def keep(bus: Bus, token: str) -> None:
        await bus.leases.keep("run:T", token, 10)
        lost.set()

    async with anyio.create_task_group() as tg:
        async with bus_at(redis_url) as a:
            token = await a.leases.acquire("run:T", 10)
            assert token is not None
            tg.start_soon(keep, a, token)
            await anyio.wait_all_tasks_blocked()
            assert a.leases.held == 1
        with anyio.fail_after(5):
            await lost.wait()  # nobody renews it any more: the holder must stop


async def test_a_redis_that_serves_no_writes_marks_the_bus_unavailable_until_it_does(
    own_redis: RedisServer, bus_at: BusFactory
) -> None:
    """Renewals refused by Redis itself (here a replica's READONLY; LOADING, OOM...) are the bus failing,
    not one lease's trouble: the bus says so, and the leases go on once Redis serves again."""
    # (A TTL with room for a loaded machine: the lease must outlive the refused renewals.)
    beats = {"heartbeat_seconds": 600, "node_ttl_seconds": 1200, "slot_ttl_seconds": 1200}
    async with bus_at(own_redis.url, **beats) as a, a.leases.hold("run:T0", 9) as lease:
        assert lease is not None
        await a.redis.replicaof("127.0.0.1", 1)  # a replica now: writes answer READONLY

        async def refused_renewals() -> bool:  # the renewals' own verdict (the heartbeat's is a ReadOnlyError)
            return (a.health.error or "").startswith("ResponseError: READONLY")

        await until(refused_renewals, timeout=10)
        assert a.health.state is BusState.UNAVAILABLE
        await a.redis.replicaof("NO", "ONE")
        with anyio.fail_after(10):
            await a.health.wait_for(BusState.OK)
        await renewed(a, ["run:T0"])
        assert not lease.lost.is_set()


async def test_leases_kept_when_redis_is_lost_are_in_doubt_until_renewed_or_lost(
    own_redis: RedisServer, bus_at: BusFactory
) -> None:
    """After the feed loses Redis, whether a kept lease is still this node's is not known until a renewal
    begun after the loss answers: a Redis restarted without its data lost it (another node may hold it
    already). In doubt, the runs' owner answers nobody's message (a tester saw two nodes answer one)."""

    def doubting(bus: Bus, *names: str) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return all(bus.leases.doubting(name) for name in names)

        return check

    async with bus_at(own_redis.url) as a:
        confirmed: list[str] = []
        told = anyio.Event()

        def on_confirmed(name: str) -> None:
            confirmed.append(name)
            told.set()

        a.leases.on_confirmed.append(on_confirmed)
        async with a.leases.hold("run:kept", 3) as kept, a.leases.hold("run:gone", 3) as gone:
            assert kept is not None and gone is not None
            assert not a.leases.doubting("run:kept")
            await anyio.to_thread.run_sync(own_redis.stop)  # without its data: both leases are gone
            await until(doubting(a, "run:kept", "run:gone"))
            await anyio.to_thread.run_sync(own_redis.start)
            with anyio.fail_after(10):
                await kept.lost.wait()
                await gone.lost.wait()
            assert not a.leases.doubting("run:kept") and confirmed == []  # lost, never confirmed
        async with a.leases.hold("run:again", 3) as again:  # a blip that kept Redis's data
            assert again is not None
            a.leases.doubt()
            assert a.leases.doubting("run:again")
            with anyio.fail_after(5):
                await told.wait()
            assert confirmed == ["run:again"] and not a.leases.doubting("run:again") and not again.lost.is_set()


async def test_leases_lost_together_are_said_in_one_line(
    redis_url: str, bus_at: BusFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A Redis restarted without its data loses every lease a node holds: a warning each (and two more per
    transaction from the relay) was a screenful per restart (a tester: 127 lines for 40 transactions)."""
    caplog.set_level(logging.DEBUG, logger="haip_runtime.cluster.leases")
    async with bus_at(redis_url) as a, AsyncExitStack() as stack:
        held = [await stack.enter_async_context(a.leases.hold(f"run:T{i}", 0.6)) for i in range(5)]
        await a.redis.delete(*(a.keys.lease(f"run:T{i}") for i in range(5)))  # gone, as with a restart
        with anyio.fail_after(5):
            for lease in held:
                assert lease is not None
                await lease.lost.wait()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "lost" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("5 lease(s) lost (another holder has them, or redis lost")
    assert warnings[0].endswith(", ...")  # three names, then the rest left out
