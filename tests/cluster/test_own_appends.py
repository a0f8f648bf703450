"""A node's own appends, delivered at their answer (``Feed.appended``): in tseq order with every other
node's, each once, and published only when another node listens (``solo``)."""

from __future__ import annotations

import anyio
import pytest

from haip_runtime.cluster import Appended, Bus, LogEntry
from tests.cluster.conftest import BusFactory, Collector, until

pytestmark = pytest.mark.anyio


async def append_here(bus: Bus, transaction: str, *payloads: bytes) -> Appended:
    """Append as the relay's sender does: solo when the feed allows it, then delivered at the answer."""
    solo = {transaction} if bus.feed.solo(transaction) else set()
    [answer] = await bus.log.append_batches([(transaction, list(payloads), 0)], solo=solo)
    assert isinstance(answer, Appended)
    bus.feed.appended(transaction, answer.first, payloads, published=answer.published)
    return answer


async def kill_connection(bus: Bus, name: str) -> None:
    """Close the Redis connection called ``name`` (``CLIENT SETNAME``), as a network fault would."""
    [client] = [client for client in await bus.redis.client_list() if client["name"] == name]
    await bus.redis.client_kill_filter(_id=client["id"])


async def test_an_append_no_other_node_listens_to_is_delivered_here_and_not_published(
    redis_url: str, bus_at: BusFactory
) -> None:
    async with bus_at(redis_url) as a, bus_at(redis_url) as b:
        here, there = Collector(), Collector()
        await a.feed.host("T", here)
        first = await append_here(a, "T", b"one", b"two")
        assert first == Appended(1, False)  # nobody else listened: no message on the channel
        assert here.items == [LogEntry("T", 1, b"one"), LogEntry("T", 2, b"two")]  # at the answer, no wait
        await b.feed.host("T", there)  # a node coming later reads the stream
        assert there.tseqs == [1, 2]
        assert await append_here(a, "T", b"three") == Appended(3, True)  # now someone listens
        await there.wait(3)
        assert here.tseqs == there.tseqs == [1, 2, 3]


async def test_two_nodes_appending_at_once_see_one_order_each_event_once(redis_url: str, bus_at: BusFactory) -> None:
    """Answers overtake the other node's messages (another connection): an answer past the next tseq waits
    for what comes before it, and what comes back on the channel is not delivered twice."""
    async with bus_at(redis_url) as a, bus_at(redis_url) as b:
        seen = {"a": Collector(), "b": Collector()}
        await a.feed.host("T", seen["a"])
        await b.feed.host("T", seen["b"])

        async def appending(node: Bus, name: str) -> None:
            for number in range(40):
                await append_here(node, "T", b"%s%d" % (name.encode(), number), b"+")

        async with anyio.create_task_group() as tg:
            tg.start_soon(appending, a, "a")
            tg.start_soon(appending, b, "b")
        for collector in seen.values():
            await collector.wait(160)
        assert seen["a"].items == seen["b"].items
        assert seen["a"].tseqs == list(range(1, 161))
        for name in ("a", "b"):
            mine = [data for data in seen["a"].payloads if data.startswith(name.encode())]
            assert mine == [b"%s%d" % (name.encode(), number) for number in range(40)]


async def test_an_append_whose_answer_was_lost_is_read_from_the_stream(redis_url: str, bus_at: BusFactory) -> None:
    """An append that ran but whose answer never came (the connection lost after it) is published to
    nobody when solo; the next answer, past it, waits a moment and the stream fills the hole in order."""
    async with bus_at(redis_url) as a:
        here = Collector()
        await a.feed.host("T", here)
        assert a.feed.solo("T")
        await a.log.append_batches([("T", [b"lost answer"], 0)], solo={"T"})  # its answer is not handed over
        assert await append_here(a, "T", b"next") == Appended(2, False)
        assert here.items == []  # held: 1 comes first
        await here.wait(2)
        assert here.items == [LogEntry("T", 1, b"lost answer"), LogEntry("T", 2, b"next")]


async def test_a_node_deaf_without_knowing_it_nudges_the_others_once_it_hears_again(
    redis_url: str, bus_at: BusFactory
) -> None:
    """A solo append that ran while this node's subscription was gone (its loss not seen yet) saw one
    listener, the other node, and was published to nobody: the reconnect tells the other node to read
    the stream."""
    async with bus_at(redis_url) as a, bus_at(redis_url) as b:
        here, there = Collector(), Collector()
        await a.feed.host("T", here)
        await b.feed.host("T", there)
        reconnects = a.feed.reconnects
        assert a.feed.solo("T")  # asked while the subscription was up
        await kill_connection(a, a.feed.connection_name)
        [answer] = await a.log.append_batches([("T", [b"unheard"], 0)], solo={"T"})
        assert answer == Appended(1, False)  # b alone listened: Redis took it for this node
        a.feed.appended("T", 1, [b"unheard"], published=False)
        assert here.tseqs == [1]
        await there.wait(1)  # a's reconnect nudged b
        assert there.items == [LogEntry("T", 1, b"unheard")]
        assert a.feed.reconnects > reconnects and b.feed.reconnects == 0


async def test_an_answer_coming_after_the_reconnect_nudges_too(redis_url: str, bus_at: BusFactory) -> None:
    """The same, when the unpublished append's answer comes after the reconnect (whose nudges had gone
    out): the answer itself has the other nodes nudged."""
    async with bus_at(redis_url) as a, bus_at(redis_url) as b:
        here, there = Collector(), Collector()
        await a.feed.host("T", here)
        await b.feed.host("T", there)
        reconnects = a.feed.reconnects
        assert a.feed.solo("T")
        await kill_connection(a, a.feed.connection_name)
        [answer] = await a.log.append_batches([("T", [b"late"], 0)], solo={"T"})
        assert answer == Appended(1, False)

        async def heard_again() -> bool:
            return a.feed.connected and a.feed.reconnects > reconnects

        await until(heard_again)  # (no event says the feed subscribed again)
        assert there.items == []  # nothing told b yet
        a.feed.appended("T", 1, [b"late"], published=False)
        await there.wait(1)
        assert there.items == here.items == [LogEntry("T", 1, b"late")]
