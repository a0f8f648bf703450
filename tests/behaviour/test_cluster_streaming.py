"""A streamed answer over two nodes: two runtimes on one real Redis and one real PostgreSQL.

Every member, on either node, gets the whole text once and in order (the parts that crossed the bus
together reach a node's members as one part; the log and the store keep each part); and a streaming
agent whose parts are held back on their way back to its own node waits for them (back-pressure
across the bus) instead of running ahead of its members, then finishes with nothing lost or reordered.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import anyio
import pytest

from haip_runtime.client import HaipClient
from tests.support.serving import LiveServer, live_server, make_config

pytestmark = pytest.mark.anyio

FAST = {"heartbeat_seconds": 0.2, "node_ttl_seconds": 2, "connect_timeout_seconds": 5, "lease_seconds": 1.5}
#: Words a second the storyteller streams: its story below takes about 0.8 s.
PACE = 400
#: What the storyteller is asked to tell: it says it twice, so about 300 parts.
SUBJECT = " ".join(f"w{index}" for index in range(150))
STORY = (
    f"Once upon a time, someone said {SUBJECT!r}. "
    f"The words travelled far, and everyone who heard {SUBJECT!r} smiled. The end."
)


@contextmanager
def two_nodes(redis: str, database: str, prefix: str) -> Iterator[tuple[LiveServer, LiveServer]]:
    config = make_config(
        {
            "cluster": {"redis_url": redis, "key_prefix": prefix, **FAST},
            "storage": {"backend": "postgres", "url": database, "flush_interval_seconds": 0.01},
            "roles": {"user": {}, "support": {"may_join_others": True}},
            "agents": {
                "storyteller": {
                    "plugin": "haip_runtime.demo.storyteller:Storyteller",
                    "options": {"words_per_second": PACE},
                }
            },
        }
    )
    with live_server(config) as a, live_server(config) as b:
        yield a, b


def parts(client: HaipClient, tx: str) -> list[tuple[int, str]]:
    """(tseq, text) of each MESSAGE_PART ``client`` got of ``tx``, in the order it got them."""
    return [
        (int(e.raw["tseq"]), str(e.payload["text"]))
        for e in client.received
        if e.transaction == tx and e.type == "MESSAGE_PART"
    ]


def told_whole(client: HaipClient, tx: str) -> None:
    got = parts(client, tx)
    assert "".join(text for _, text in got) == STORY  # every word once, in order
    tseqs = [tseq for tseq, _ in got]
    assert tseqs == sorted(set(tseqs))


class HeldFeed:
    """Stands for one node's feed delivery of one transaction: holds what comes while ``held``, then
    delivers it all, in order, at ``release`` (run in the server's event loop)."""

    def __init__(self, deliver: Callable[[Sequence[Any]], None]) -> None:
        self.deliver = deliver
        self.items: list[Any] = []
        self.held = True
        self.loop: asyncio.AbstractEventLoop | None = None

    def __call__(self, items: Sequence[Any]) -> None:
        self.loop = asyncio.get_running_loop()
        if self.held:
            self.items.extend(items)
        else:
            self.deliver(items)

    def release(self) -> None:
        self.held = False
        items, self.items = self.items, []
        if items:
            self.deliver(items)


@asynccontextmanager
async def alice_and_sam(a: LiveServer, b: LiveServer) -> AsyncIterator[tuple[HaipClient, HaipClient, str]]:
    """alice on ``a`` starts a storyteller transaction; sam on ``b`` joins it (alice has seen him join)."""
    async with (
        HaipClient(a.ws_url, token=a.token("alice"), timeout=15) as alice,
        HaipClient(b.ws_url, token=b.token("sam", roles=["support"]), timeout=15) as sam,
    ):
        tx = await alice.start_transaction("storyteller")
        await sam.join(tx, since=0)
        await alice.wait_for(lambda e: e.type == "TRANSACTION_JOIN" and e.get("joined") == "sam")
        yield alice, sam, tx


async def test_members_on_both_nodes_get_a_stream_whole_once_and_in_order_and_the_log_keeps_each_part(
    redis_url: str, postgres_url: str, prefix: str
) -> None:
    with two_nodes(redis_url, postgres_url, prefix) as (a, b):
        async with alice_and_sam(a, b) as (alice, sam, tx):
            await alice.send_text(tx, SUBJECT)
            for client in (alice, sam):
                await client.wait_for(lambda e: e.type == "RUN_FINISHED" and e.transaction == tx)
                told_whole(client, tx)
            async with HaipClient(b.ws_url, token=b.token("lee", roles=["support"]), timeout=15) as lee:
                await lee.join(tx, since=0)  # the history: each part as the log numbered it
                await lee.wait_for(lambda e: e.type == "RUN_FINISHED" and e.transaction == tx)
                told_whole(lee, tx)
                assert len(parts(lee, tx)) == len(STORY.split(" "))


async def test_a_stream_whose_parts_are_held_back_on_the_bus_waits_for_them_and_loses_nothing(
    redis_url: str, postgres_url: str, prefix: str
) -> None:
    with two_nodes(redis_url, postgres_url, prefix) as (a, b):
        async with alice_and_sam(a, b) as (alice, sam, tx):
            relay = a.runtime.hub.transactions.relay
            assert relay is not None
            hosted = relay.bus.feed._hosted[tx]
            held = hosted.deliver = HeldFeed(hosted.deliver)  # node A's feed of the transaction stops here
            await alice.send_text(tx, SUBJECT)
            await sam.wait_for(lambda e: e.type == "MESSAGE_PART" and e.transaction == tx)
            await anyio.sleep(0.6)  # without back-pressure, about 240 more words would be written meanwhile
            # node B delivers what was appended, what the agent wrote (parts merged as they crossed together)
            published = len("".join(text for _, text in parts(sam, tx)).split())
            assert held.loop is not None
            held.loop.call_soon_threadsafe(held.release)
            for client in (alice, sam):
                await client.wait_for(lambda e: e.type == "RUN_FINISHED" and e.transaction == tx)
                told_whole(client, tx)
    assert published < 40, f"the agent wrote {published} words while its own were held back"
