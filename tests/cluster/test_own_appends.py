"""A node's own appends, delivered at their answer (``Feed.appended``): in tseq order with every other
node's, each once, and published only when another node listens (``solo``)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import anyio
import pytest

from haip_runtime.cluster import Appended, Bus, BusHealth, Feed, LogEntry, LogGap
from haip_runtime.cluster import feed as feed_module
from haip_runtime.cluster.keyspace import Keyspace
from tests.cluster.conftest import BusFactory, Collector

pytestmark = pytest.mark.anyio


async def append_here(bus: Bus, transaction: str, *payloads: bytes) -> Appended:
    """Append as the relay's sender does: solo when the feed allows it, then delivered at the answer."""
    solo = {transaction} if bus.feed.solo(transaction) else set()
    [answer] = await bus.log.append_batches([(transaction, list(payloads), 0)], solo=solo)
    assert isinstance(answer, Appended)
    bus.feed.appended(transaction, answer.first, payloads)
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


async def test_an_append_whose_answer_was_lost_is_read_from_the_stream(
    redis_url: str, bus_at: BusFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An append that ran but whose answer never came (the connection lost after it) is published to
    nobody when solo; the next answer, past it, waits ``HELD_WAIT`` and the stream fills the hole in
    order, though the feed is quiet (a reviewer's finding: the listener's quiet wait, ``BEHIND_RETRY``,
    was not cut short)."""
    monkeypatch.setattr(feed_module, "BEHIND_RETRY", 60.0)
    async with bus_at(redis_url) as a:
        here = Collector()
        await a.feed.host("T", here)
        assert a.feed.solo("T")
        await a.log.append_batches([("T", [b"lost answer"], 0)], solo={"T"})  # its answer is not handed over
        assert await append_here(a, "T", b"next") == Appended(2, False)
        assert here.items == []  # held: 1 comes first
        await here.wait(2)
        assert here.items == [LogEntry("T", 1, b"lost answer"), LogEntry("T", 2, b"next")]


async def test_a_node_whose_subscription_redis_dropped_has_its_appends_published(
    redis_url: str, bus_at: BusFactory
) -> None:
    """A solo append run after Redis dropped this node's subscription, before the node saw it go: the
    transaction's channel has one subscriber, the other node, and the script publishes because the node's
    own channel has none (a reviewer's finding: with the channel alone counted, the other node never heard it)."""
    async with bus_at(redis_url) as a, bus_at(redis_url) as b:
        here, there = Collector(), Collector()
        await a.feed.host("T", here)
        await b.feed.host("T", there)
        assert a.feed.solo("T")  # asked while the subscription was up
        await kill_connection(a, a.feed.connection_name)
        [answer] = await a.log.append_batches([("T", [b"heard"], 0)], solo={"T"})
        assert answer == Appended(1, True)
        a.feed.appended("T", answer.first, [b"heard"])
        await there.wait(1)
        assert there.items == here.items == [LogEntry("T", 1, b"heard")]


async def test_an_answer_ahead_of_the_feed_waits_for_what_comes_before_it(
    redis_url: str, bus_at: BusFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another node's event numbered before this node's append, its message still on its way when the
    answer comes: the answer is held, and delivered after it as soon as the message arrives."""
    monkeypatch.setattr(feed_module, "HELD_WAIT", 60.0)  # only the message can release it within the test
    async with bus_at(redis_url) as a:
        here = Collector()
        await a.feed.host("T", here)
        await a.redis.incr(a.keys.sequence("T"))  # tseq 1, appended elsewhere: its message comes below
        await a.redis.xadd(a.keys.log("T"), {"d": b"theirs"}, id="1-0")
        assert await append_here(a, "T", b"mine") == Appended(2, False)
        assert here.items == []
        await a.redis.publish(a.keys.channel("T"), b"1 6:theirs")
        await here.wait(2)
        assert here.items == [LogEntry("T", 1, b"theirs"), LogEntry("T", 2, b"mine")]


async def test_held_events_of_this_node_are_delivered_between_the_gaps_of_a_trimmed_stream(
    redis_url: str, bus_at: BusFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream trimmed past what the feed expects while this node's own answer was held: what the stream
    lost is a gap (read from the store), but this node's own events, known here, are delivered in their
    place and not given up to the gap (a reviewer's finding: nobody else may have stored them)."""
    monkeypatch.setattr(feed_module, "HELD_WAIT", 60.0)
    async with bus_at(redis_url) as a:
        here = Collector()
        await a.feed.host("T", here)
        for tseq in (1, 2):  # appended elsewhere, never heard here
            await a.redis.incr(a.keys.sequence("T"))
            await a.redis.xadd(a.keys.log("T"), {"d": b"lost"}, id=f"{tseq}-0")
        assert await append_here(a, "T", b"mine") == Appended(3, False)
        await a.redis.incr(a.keys.sequence("T"))
        await a.redis.xadd(a.keys.log("T"), {"d": b"later"}, id="4-0")
        await a.redis.xtrim(a.keys.log("T"), minid="4-0", approximate=False)
        await a.redis.publish(a.keys.channel("T"), b"4 5:later")  # past the expected 1: the stream is read
        await here.wait(3)
        assert here.items == [LogGap("T", 1, 2), LogEntry("T", 3, b"mine"), LogEntry("T", 4, b"later")]


class ScriptedSubscription:
    """The feed's pub/sub connection with Redis's replies given by the test, one batch at a time."""

    def __init__(self) -> None:
        self.written: list[tuple[str, tuple[str | bytes, ...]]] = []
        self._send, self._receive = anyio.create_memory_object_stream[list[list[Any]]]()
        self._asked = anyio.Event()

    def subscribe(self, *channels: str | bytes) -> None:
        self.written.append(("SUBSCRIBE", channels))

    def unsubscribe(self, *channels: str | bytes) -> None:
        self.written.append(("UNSUBSCRIBE", channels))

    def wake(self) -> None:
        pass

    def close(self) -> None:
        self._send.close()
        self._receive.close()

    async def messages(self, timeout: float) -> list[list[Any]]:
        self._asked.set()
        return await self._receive.receive()

    async def reply(self, *replies: list[Any]) -> None:
        """Hand the listener ``replies`` and return once it has dealt with them (it asks for more)."""
        self._asked = anyio.Event()
        await self._send.send(list(replies))
        with anyio.fail_after(5):
            await self._asked.wait()


async def test_a_confirmation_of_an_earlier_subscription_is_not_taken_for_the_latest() -> None:
    """Hosted, let go and hosted again before Redis confirmed the first ``SUBSCRIBE``: that confirmation
    arrives after the ``UNSUBSCRIBE`` went, so it does not mean the channel is followed now, and no solo
    append may be asked until the last ``SUBSCRIBE`` is confirmed (a reviewer's finding: the other
    nodes would never have heard the appends made between)."""
    requests: list[bytes] = []

    async def publish(channel: str, data: bytes) -> None:
        requests.append(data)

    async def read(transaction: str, after: int, *, limit: int) -> list[LogEntry]:
        return []  # the stream holds nothing yet

    keys = Keyspace("scripted")
    commands, log = SimpleNamespace(publish=publish), SimpleNamespace(read=read)
    feed = Feed("redis://127.0.0.1:1/0", commands, log, keys, BusHealth(), "n1")  # type: ignore[arg-type]
    node, channel = keys.node_channel("n1").encode(), keys.channel("T").encode()
    subscription = ScriptedSubscription()
    async with anyio.create_task_group() as tg:
        tg.start_soon(feed._listen, subscription)  # type: ignore[arg-type]
        await subscription.reply([b"subscribe", node, 1])
        assert feed.connected
        tg.start_soon(feed.host, "T", Collector())
        await subscription.reply([b"message", node, b"host T"])  # the listener writes SUBSCRIBE
        await feed.unhost("T")
        await subscription.reply([b"message", node, b"unhost T"])  # ... then UNSUBSCRIBE
        tg.start_soon(feed.host, "T", Collector())
        await subscription.reply([b"subscribe", channel, 1])  # the first SUBSCRIBE's confirmation
        assert not feed.solo("T")
        await subscription.reply([b"message", node, b"host T"])  # ... then SUBSCRIBE again
        await subscription.reply([b"unsubscribe", channel, 0], [b"subscribe", channel, 1])
        assert feed.solo("T")
        assert [verb for verb, channels in subscription.written if channels == (keys.channel("T"),)] == [
            "SUBSCRIBE",
            "UNSUBSCRIBE",
            "SUBSCRIBE",
        ]
        tg.cancel_scope.cancel()
    subscription.close()


async def test_a_redis_refusing_to_name_connections_still_serves_the_feed(redis_url: str, bus_at: BusFactory) -> None:
    """The feed names its subscription (``CLIENT SETNAME``); a Redis user whose ACL refuses it still gets one."""
    async with bus_at(redis_url) as admin:
        user = f"unnamed-{admin.node_id}"
        await admin.redis.acl_setuser(
            user, enabled=True, passwords=["+secret"], keys=["*"], channels=["*"], commands=["+@all", "-client"]
        )
        try:
            async with bus_at(redis_url.replace("redis://", f"redis://{user}:secret@")) as node:
                here = Collector()
                await node.feed.host("T", here)
                assert node.feed.connected and node.feed.solo("T")
                assert await append_here(node, "T", b"one") == Appended(1, False)
                assert here.tseqs == [1]
        finally:
            await admin.redis.acl_deluser(user)


async def test_own_events_held_past_the_bound_are_delivered_and_what_they_waited_for_is_a_gap(
    redis_url: str, bus_at: BusFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Held answers are bounded: past ``MAX_HELD`` events the wait for what comes before them (a stream that
    cannot give it) is given up for a gap the store fills, and the held events are delivered."""
    monkeypatch.setattr(feed_module, "HELD_WAIT", 60.0)
    monkeypatch.setattr(feed_module, "MAX_HELD", 3)
    async with bus_at(redis_url) as a:
        here = Collector()
        await a.feed.host("T", here)
        await a.redis.incr(a.keys.sequence("T"))  # tseq 1, never in the stream nor on the channel
        for number in range(3):
            await append_here(a, "T", b"%d" % number)
        assert here.items == []  # 3 held: at the bound
        await append_here(a, "T", b"3")
        assert here.items == [LogGap("T", 1, 1), *(LogEntry("T", n + 2, b"%d" % n) for n in range(4))]
        await append_here(a, "T", b"4")
        assert here.tseqs[-1] == 6  # and on as before
