"""One transaction, any node: one ordered log, each event delivered once to each hosting node."""

from __future__ import annotations

import anyio
import pytest

from haip_runtime.cluster import Bus, LogEntry, LogGap
from haip_runtime.cluster.replies import stream_rows, text
from haip_runtime.cluster.translog import ENDED_KEEP_BYTES
from haip_runtime.exceptions import ClusterError
from tests.cluster.conftest import BusFactory, Collector, until
from tests.support.netcut import netcut
from tests.support.redis import RedisServer, running_redis

pytestmark = pytest.mark.anyio


async def test_two_nodes_appending_at_once_see_one_log_in_tseq_order(redis_url: str, bus_at: BusFactory) -> None:
    async with bus_at(redis_url) as a, bus_at(redis_url) as b:
        seen_a, seen_b = Collector(), Collector()
        await a.feed.host("T", seen_a)
        await b.feed.host("T", seen_b)

        async def write(bus: Bus, name: str) -> None:
            for number in range(150):
                await bus.log.append("T", f"{name}{number}".encode())

        async with anyio.create_task_group() as tg:
            tg.start_soon(write, a, "a")
            tg.start_soon(write, b, "b")
        await seen_a.wait(300)
        await seen_b.wait(300)
        assert seen_a.tseqs == seen_b.tseqs == list(range(1, 301))
        assert seen_a.payloads == seen_b.payloads
        assert sorted(seen_a.payloads) == sorted(
            [f"a{n}".encode() for n in range(150)] + [f"b{n}".encode() for n in range(150)]
        )
        for name in (b"a", b"b"):  # each writer's events in the order it wrote them
            mine = [p for p in seen_a.payloads if p.startswith(name)]
            assert mine == sorted(mine, key=lambda p: int(p[1:]))
        assert [e.data for e in await a.log.read("T", 298)] == seen_a.payloads[298:]


async def test_hosting_late_delivers_what_came_before_then_follows(redis_url: str, bus_at: BusFactory) -> None:
    async with bus_at(redis_url) as a, bus_at(redis_url) as b:
        for number in range(5):
            await a.log.append("T", b"%d" % number)
        seen = Collector()
        await b.feed.host("T", seen, after=2)
        assert seen.tseqs == [3, 4, 5]
        await a.log.append_many("T", [b"x", b"y"])
        await seen.wait(5)
        assert seen.tseqs == [3, 4, 5, 6, 7] and seen.payloads[3:] == [b"x", b"y"]


async def test_a_floor_continues_a_transaction_loaded_from_the_store(redis_url: str, bus_at: BusFactory) -> None:
    async with bus_at(redis_url) as a:
        assert await a.log.append("T", b"first", floor=41) == 42
        assert await a.log.append("T", b"next", floor=10) == 43  # a floor behind the counter changes nothing
        assert await a.log.seed("U", 7) == 7 and await a.log.seed("U", 3) == 7
        assert await a.log.append("U", b"u") == 8
        assert await a.log.last_tseq("T") == 43


async def test_a_missed_message_is_filled_from_the_stream(redis_url: str, bus_at: BusFactory, prefix: str) -> None:
    async with bus_at(redis_url) as a, bus_at(redis_url) as b:
        seen = Collector()
        await b.feed.host("T", seen)
        await a.log.append("T", b"one")
        await seen.wait(1)
        # An event appended while its message was lost (as in a reconnect): in the stream, never published.
        await a.redis.incr(a.keys.sequence("T"))
        await a.redis.xadd(a.keys.log("T"), {"d": b"lost"}, id="2-0")
        await a.log.append("T", b"three")
        await seen.wait(3)
        assert seen.tseqs == [1, 2, 3] and seen.payloads == [b"one", b"lost", b"three"]


async def test_a_catch_up_that_failed_is_tried_again_though_other_conversations_keep_the_feed_busy(
    redis_url: str, bus_at: BusFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A catch-up that failed once was tried again only after a second with no message at all: on a node
    busy with other conversations its transaction got nothing until its next message (a reviewer)."""
    async with bus_at(redis_url) as a, bus_at(redis_url) as b:
        missed, busy = Collector(), Collector()
        await a.feed.host("T", missed)
        await a.feed.host("U", busy)
        read, failed = a.log.read, anyio.Event()

        async def failing_once(transaction: str, after: int, *, limit: int = 1000) -> list[LogEntry]:
            if transaction == "T" and not failed.is_set():
                failed.set()
                raise ClusterError("redis: the read timed out")
            return await read(transaction, after, limit=limit)

        monkeypatch.setattr(a.log, "read", failing_once)
        await b.log.append("T", b"past a hole", floor=5)  # tseq 6: node a reads the stream for 1..5, and fails
        async with anyio.create_task_group() as tg:

            async def other_conversations() -> None:  # a message for U every 0.2 s: never a quiet second
                for number in range(100):
                    await b.log.append("U", b"%d" % number)
                    await anyio.sleep(0.2)

            tg.start_soon(other_conversations)
            await missed.wait(2, timeout=8)
            tg.cancel_scope.cancel()
        assert failed.is_set() and missed.items == [LogGap("T", 1, 5), LogEntry("T", 6, b"past a hole")]
        assert len(busy.items) < 100  # (delivered while U's messages still came)


async def test_events_trimmed_from_redis_arrive_as_a_gap(redis_url: str, bus_at: BusFactory) -> None:
    async with bus_at(redis_url) as a, bus_at(redis_url) as b:
        for number in range(10):
            await a.log.append("T", b"%d" % number)
        await a.redis.xtrim(a.keys.log("T"), minid="6-0", approximate=False)  # as MAXLEN would after many more
        seen = Collector()
        await b.feed.host("T", seen, after=2)
        assert seen.items[0] == LogGap("T", 3, 5)
        assert seen.tseqs == [6, 7, 8, 9, 10]


async def test_a_killed_subscriber_connection_reconnects_and_misses_nothing(redis_url: str, bus_at: BusFactory) -> None:
    async with bus_at(redis_url) as a, bus_at(redis_url) as b:
        seen = Collector()
        await b.feed.host("T", seen)
        await a.log.append("T", b"before")
        await seen.wait(1)
        reconnects = b.feed.reconnects
        await a.redis.client_kill_filter(_type="pubsub")
        for number in range(3):  # published while b's feed is away: it reads them from the stream
            await a.log.append("T", b"%d" % number)
        await seen.wait(4)
        assert seen.tseqs == [1, 2, 3, 4] and seen.payloads == [b"before", b"0", b"1", b"2"]
        assert b.feed.reconnects > reconnects
        await a.log.append("T", b"after")
        await seen.wait(5)
        assert seen.tseqs == [1, 2, 3, 4, 5]


async def test_a_restarted_redis_is_reconnected_and_the_log_goes_on(bus_at: BusFactory) -> None:
    with running_redis(appendonly=True) as server:
        async with bus_at(server.url) as a, bus_at(server.url) as b:
            seen = Collector()
            await b.feed.host("T", seen)
            await a.log.append_many("T", [b"1", b"2"])
            await seen.wait(2)
            await anyio.to_thread.run_sync(server.restart)
            assert await a.log.append("T", b"3") == 3  # the counter survived (AOF); the client reconnected
            await a.log.append("T", b"4")
            await seen.wait(4)
            assert seen.tseqs == [1, 2, 3, 4]


async def test_after_redis_lost_everything_the_floor_keeps_tseqs_growing(bus_at: BusFactory) -> None:
    with running_redis() as server:
        async with bus_at(server.url) as a, bus_at(server.url) as b:
            seen = Collector()
            await b.feed.host("T", seen)
            await a.log.append_many("T", [b"1", b"2"])
            await seen.wait(2)
            await anyio.to_thread.run_sync(server.restart)  # no persistence: counter and stream are gone
            assert await a.log.append("T", b"3", floor=2) == 3
            await seen.wait(3)
            assert seen.tseqs == [1, 2, 3] and not any(isinstance(item, LogGap) for item in seen.items)


async def test_unhosting_stops_deliveries(redis_url: str, bus_at: BusFactory) -> None:
    async with bus_at(redis_url) as a, bus_at(redis_url) as b:
        gone, kept = Collector(), Collector()
        await b.feed.host("T", gone)
        await b.feed.host("U", kept)
        await b.feed.unhost("T")
        assert b.feed.hosted == {"U"}
        await a.log.append("T", b"t")
        await a.log.append("U", b"u")
        await kept.wait(1)
        assert gone.items == [] and kept.items == [LogEntry("U", 1, b"u")]
        with pytest.raises(ValueError, match="already hosted"):
            await b.feed.host("U", kept)


async def test_a_foreign_message_on_the_channel_is_skipped(
    redis_url: str, bus_at: BusFactory, caplog: pytest.LogCaptureFixture
) -> None:
    async with bus_at(redis_url) as a, bus_at(redis_url) as b:
        seen = Collector()
        await b.feed.host("T", seen)
        await a.redis.publish(a.keys.channel("T"), b"hello there")
        await a.log.append("T", b"ours")
        await seen.wait(1)
        assert seen.items == [LogEntry("T", 1, b"ours")]
        assert "is not a log message" in caplog.text


async def test_hosting_and_appending_through_repeated_connection_kills_loses_nothing(
    redis_url: str, bus_at: BusFactory
) -> None:
    async with bus_at(redis_url) as a, bus_at(redis_url) as b:
        seen = {name: Collector() for name in ("T0", "T1", "T2", "T3", "T4", "T5")}

        async def host_all() -> None:
            for name, collector in seen.items():
                await b.feed.host(name, collector)

        async def append_all() -> None:
            for round_ in range(20):
                for name in seen:
                    await a.log.append(name, b"%d" % round_)

        async def kill_some() -> None:
            for _ in range(10):
                await a.redis.client_kill_filter(_type="pubsub")
                for _ in range(20):
                    await anyio.lowlevel.checkpoint()  # let appends and reconnects run in between

        async with anyio.create_task_group() as tg:
            tg.start_soon(host_all)
            tg.start_soon(append_all)
            tg.start_soon(kill_some)
        assert b.feed.reconnects >= 1
        for collector in seen.values():
            await collector.wait(20, timeout=10)
            assert collector.tseqs == list(range(1, 21))
            assert collector.payloads == [b"%d" % n for n in range(20)]


async def test_the_feed_says_whether_its_subscription_is_up(redis_url: str, bus_at: BusFactory) -> None:
    """``feed.connected`` (what /health/ready and a stream's back-pressure read): down while the
    subscription cannot be made again, though commands on the other connections may answer."""
    host, port = redis_url.split("//")[1].split("/")[0].split(":")
    with netcut(int(port), host) as cut:
        async with bus_at(f"redis://{host}:{cut.port}/0") as node:
            assert node.feed.connected
            cut.cut()  # every connection reset, new ones refused

            async def down() -> bool:
                return not node.feed.connected

            await until(down)
            cut.heal()

            async def up() -> bool:
                return node.feed.connected

            await until(up)


async def test_every_append_refused_keeps_the_bus_unavailable_until_one_goes_through(
    own_redis: RedisServer, bus_at: BusFactory
) -> None:
    """Redis out of memory refuses the appends and answers the rest: the other commands' answers do not
    make the bus "ok" again (members would hear nothing while nothing moves); an append that goes through
    does. One transaction's own error (its counter spoiled) is not Redis refusing: not held (a reviewer)."""
    async with bus_at(own_redis.url) as bus:
        await bus.redis.set(bus.keys.sequence("spoiled"), "not a number")  # its script run fails, its own way
        [spoiled] = await bus.log.append_batches([("spoiled", [b"s"], 0)])
        assert isinstance(spoiled, ClusterError) and bus.health.state == "unavailable"
        assert await bus.leases.holder("anything") is None  # another command answers: ok again
        assert bus.health.state == "ok"
        await bus.redis.config_set("maxmemory", 1)  # past it already: every write that adds memory is refused
        try:
            [refused] = await bus.log.append_batches([("A", [b"a"], 0)])
            assert isinstance(refused, ClusterError) and bus.health.state == "unavailable"
            assert await bus.leases.holder("anything") is None  # another command answers meanwhile
            assert bus.health.state == "unavailable" and (bus.health.error or "").startswith("redis refuses appends")
        finally:
            await bus.redis.config_set("maxmemory", 0)
        assert await bus.log.append("A", b"a") == 1 and bus.health.state == "ok"  # (append_many's too)


async def test_appends_for_several_transactions_answer_each_alone(redis_url: str, bus_at: BusFactory) -> None:
    """One write for several transactions (the node's sender): a run Redis refuses fails that transaction
    alone, the others are appended, and the bus's health says Redis refused (a reviewer's finding: all
    refused kept it "ok")."""
    async with bus_at(redis_url) as bus:
        await bus.redis.set(bus.keys.sequence("spoiled"), "not a number")  # its script run fails
        results = await bus.log.append_batches([("A", [b"a1", b"a2"], 0), ("spoiled", [b"s"], 0), ("B", [b"b"], 5)])
        assert results[0] == (1, True) and results[2] == (6, True)  # published: not solo
        assert isinstance(results[1], ClusterError) and "spoiled" in results[1].message
        assert bus.health.state == "unavailable"
        assert [entry.data for entry in await bus.log.read("A", 0)] == [b"a1", b"a2"]
        assert [entry.tseq for entry in await bus.log.read("B", 0)] == [6]
        await bus.log.append("A", b"a3")
        assert bus.health.state == "ok"  # the next append answered


async def test_a_log_is_bounded_in_bytes_and_what_it_trimmed_arrives_as_a_gap(
    redis_url: str, bus_at: BusFactory
) -> None:
    """A prober's find: a log kept ``log_max_events`` events whatever their size (10,000 of 1 MiB), so one
    member's large frames could fill Redis and stop every node's appends."""
    cap = 1024 * 1024
    async with bus_at(redis_url, log_max_bytes=cap) as a, bus_at(redis_url) as b:
        big = b"y" * 100_000
        for _ in range(30):
            await a.log.append("T", big)
        await a.log.append("T", b"small")
        kept = stream_rows(await a.redis.xrange(a.keys.log("T")))
        assert sum(len(fields[b"d"]) for _, fields in kept) <= cap and len(kept) >= 7
        assert int(text(await a.redis.get(a.keys.log_bytes("T"))) or 0) <= cap
        seen = Collector()
        await b.feed.host("T", seen, after=0)
        gap = seen.items[0]
        assert isinstance(gap, LogGap) and gap.first == 1 and seen.tseqs[-1] == 31
        assert seen.tseqs == list(range(gap.last + 1, 32))


async def test_an_ended_transactions_log_keeps_only_its_newest_megabyte_for_its_last_minute(
    redis_url: str, bus_at: BusFactory
) -> None:
    """A re-tester's find: starting, filling (to the 16 MiB bound) and ending transactions over and over,
    one user held their send rate times a minute of Redis in ended logs."""
    async with bus_at(redis_url) as a:
        big = b"z" * 200_000
        for _ in range(20):  # 4 MB: under the live bound
            await a.log.append("T", big)
        live = stream_rows(await a.redis.xrange(a.keys.log("T")))
        [ended] = await a.log.append_batches([("T", [b"the end"], 0)], ended={"T"})
        kept = stream_rows(await a.redis.xrange(a.keys.log("T")))
    assert len(live) == 20 and not isinstance(ended, ClusterError)
    assert sum(len(fields[b"d"]) for _, fields in kept) <= ENDED_KEEP_BYTES and kept[-1][1][b"d"] == b"the end"
