"""Issue 21, per-user limits: two runtimes (two ``live_server``s) on one real redis-server count a user's
sessions and message rate together; open transactions are counted by the PostgreSQL they share.

A session refused on B while the user is at the limit on A, admitted once A frees a slot; a dead
node's slots free themselves within ``slot_ttl_seconds``; a clean stop frees them at once; the
message rate over both nodes within ``user_message_burst + user_messages_per_second × elapsed``;
Redis gone: sessions admitted on the per-process limit (fail-open), ``/health`` degraded, and the
sessions counted again once Redis is back.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx2
import pytest

from haip_runtime.client import ClientError, HaipClient
from haip_runtime.cluster import Bus
from haip_runtime.config.clustering import ClusterConfig
from haip_runtime.config.models import HaipConfig
from haip_runtime.hub.lifecycle import REPLACED
from haip_runtime.protocol.events import ALL_EVENTS
from tests.support.logwait import waiting_for_log
from tests.support.raw import RawPeer, raw_peer
from tests.support.redis import RedisServer
from tests.support.serving import ROOT, LiveServer, live_server, make_config

pytestmark = pytest.mark.anyio

FAST = {"heartbeat_seconds": 0.1, "node_ttl_seconds": 1, "connect_timeout_seconds": 5, "slot_ttl_seconds": 1}


def node_config(
    url: str, database: str, prefix: str, limits: dict[str, Any] | None = None, **session: Any
) -> HaipConfig:
    """A runtime that is a node of the cluster on the Redis at ``url`` (keys under ``prefix``) and the
    PostgreSQL ``database``."""
    return make_config(
        {
            "cluster": {"redis_url": url, "key_prefix": prefix, **FAST},
            "storage": {"backend": "postgres", "url": database, "flush_interval_seconds": 0.01},
            "limits": {"sessions_per_user": 2, **(limits or {})},
            "session": session,
        }
    )


@asynccontextmanager
async def probe(url: str, prefix: str, **options: Any) -> AsyncIterator[Bus]:
    """A bus of the test's own on the same keys, to read (or, as a node that dies, hold) slots."""
    async with Bus(ClusterConfig(redis_url=url, key_prefix=prefix, **{**FAST, **options})) as bus:
        yield bus


async def until(condition: Callable[[], Awaitable[bool]], timeout: float = 10) -> None:
    """Poll ``condition`` until true: for what expires by Redis's clock, or is seen in another thread."""
    with anyio.fail_after(timeout):
        while True:
            if await condition():
                return
            await anyio.sleep(0.02)


def counted(bus: Bus, user: str, expected: int) -> Callable[[], Awaitable[bool]]:
    """Whether ``user`` holds ``expected`` session slots over the cluster."""

    async def check() -> bool:
        return await bus.quotas.count(user, "sessions") == expected

    return check


def seen(predicate: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return predicate()

    return check


async def ready(peer: RawPeer, token: str) -> dict[str, Any]:
    await peer.hai(token)
    return await peer.receive_type("INFO")


async def refused(live: LiveServer, user: str) -> tuple[dict[str, Any], int | None]:
    """A handshake of ``user`` on ``live`` that must be refused: the ERROR and the close code."""
    async with raw_peer(live.ws_url) as peer:
        await peer.hai(live.token(user))
        error = await peer.receive_type("ERROR")
        return error, await peer.closed()


async def admitted(live: LiveServer, user: str) -> bool:
    """Whether a handshake of ``user`` on ``live`` is admitted now (the connection closes after)."""
    async with raw_peer(live.ws_url) as peer:
        await peer.hai(live.token(user))
        answer = await peer.receive()
        while answer["type"] not in ("INFO", "ERROR"):
            answer = await peer.receive()
        return bool(answer["type"] == "INFO")


async def test_a_user_at_the_limit_on_one_node_is_refused_on_another_until_a_slot_frees(
    redis_url: str, prefix: str, postgres_url: str
) -> None:
    config = node_config(redis_url, postgres_url, prefix, resume_timeout_seconds=0.3)
    with live_server(config) as a, live_server(config) as b:
        async with probe(redis_url, prefix) as bus:
            async with raw_peer(a.ws_url) as first:
                await ready(first, a.token("ann"))
                async with raw_peer(a.ws_url) as second:
                    await ready(second, a.token("ann"))
                    error, code = await refused(b, "ann")
                    async with raw_peer(b.ws_url) as other:
                        await ready(other, b.token("bob"))  # other users are not affected
                # The second session ended on A (it expired there): B has room again.
                await until(counted(bus, "ann", 1))
                async with raw_peer(b.ws_url) as third:
                    info = await ready(third, b.token("ann"))
                    assert await bus.quotas.count("ann", "sessions") == 2
    assert error["payload"]["code"] == "RATE_LIMITED" and code == 1008
    assert "in the cluster (limits.sessions_per_user)" in error["payload"]["message"]
    assert info["payload"]["user"] == "ann"


async def test_a_new_session_on_a_node_without_the_users_sessions_takes_the_room_of_one_left_elsewhere(
    redis_url: str, prefix: str, postgres_url: str
) -> None:
    """An operator's find: with a user's disconnected sessions all on other nodes (a node just restarted,
    or the balancer's pick), every new session of theirs was refused there for as long as those waited
    for their clients, though one node alone makes room by dropping the oldest."""
    config = node_config(redis_url, postgres_url, prefix, resume_timeout_seconds=60)
    with live_server(config) as a, live_server(config) as b:
        async with probe(redis_url, prefix) as bus:
            for _ in range(2):  # the limit, both left waiting for their clients on A
                async with raw_peer(a.ws_url) as left:
                    await ready(left, a.token("ann"))
            await until(seen(lambda: all(s.outbox is None for s in a.runtime.hub.sessions.sessions.values())))
            async with raw_peer(b.ws_url) as new:
                info = await ready(new, b.token("ann"))
                assert await bus.quotas.count("ann", "sessions") == 2
            async with raw_peer(a.ws_url) as first, raw_peer(a.ws_url) as second:  # connected: no room made
                await ready(first, a.token("ann"))
                await ready(second, a.token("ann"))
                error, code = await refused(b, "ann")
    assert info["payload"]["user"] == "ann" and len(a.runtime.hub.sessions) <= 2
    assert error["payload"]["code"] == "RATE_LIMITED" and code == 1008


async def test_a_dead_nodes_slots_free_themselves_within_the_slot_ttl(
    redis_url: str, prefix: str, postgres_url: str
) -> None:
    with live_server(node_config(redis_url, postgres_url, prefix)) as b:
        async with probe(redis_url, prefix) as counter:
            async with probe(redis_url, prefix) as dead:
                for session in ("s1", "s2"):
                    assert await dead.quotas.acquire_slot("ann", "sessions", session, 2)
                # Leaves without releasing its slots (as a crash would) and its heartbeat stops.
            refusal, _ = await refused(b, "ann")
            left = time.monotonic()
            await until(counted(counter, "ann", 0), timeout=FAST["slot_ttl_seconds"] + 2)
            freed_after = time.monotonic() - left
            assert await admitted(b, "ann")
    assert refusal["payload"]["code"] == "RATE_LIMITED"
    assert freed_after <= FAST["slot_ttl_seconds"] + 0.5


async def test_a_node_that_stops_cleanly_frees_its_slots_at_once(
    redis_url: str, prefix: str, postgres_url: str
) -> None:
    async with probe(redis_url, prefix) as counter:
        with live_server(node_config(redis_url, postgres_url, prefix, resume_timeout_seconds=60)) as a:
            async with raw_peer(a.ws_url) as first, raw_peer(a.ws_url) as second:
                await ready(first, a.token("ann"))
                await ready(second, a.token("ann"))
                held = await counter.quotas.count("ann", "sessions")
        # Both sessions were still resumable on A when it stopped: their slots went with it.
        assert held == 2 and await counter.quotas.count("ann", "sessions") == 0


async def pings(live: LiveServer, user: str, count: int) -> int:
    """``count`` PINGs from one session of ``user``, sent at once; how many were answered with PONG."""
    async with raw_peer(live.ws_url) as peer:
        await ready(peer, live.token(user))
        for number in range(count):
            await peer.send("PING", {"nonce": str(number)})
        answers = [await peer.receive() for _ in range(count)]
    return sum(answer["type"] == "PONG" for answer in answers)


async def test_a_users_message_rate_over_two_nodes_stays_within_the_stated_tolerance(
    redis_url: str, prefix: str, postgres_url: str
) -> None:
    limits = {"user_messages_per_second": 1, "user_message_burst": 10, "messages_per_second": 1000}
    config = node_config(redis_url, postgres_url, prefix, {**limits, "message_burst": 1000})
    with live_server(config) as a, live_server(config) as b:
        nodes = [live.runtime.hub.sessions.quotas for live in (a, b)]
        await until(seen(lambda: all(quotas.nodes == 2 for quotas in nodes)))
        answered: dict[str, int] = {}

        async def flood(name: str, live: LiveServer) -> None:
            answered[name] = await pings(live, "ann", 30)

        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(flood, "a", a)
            tg.start_soon(flood, "b", b)
        elapsed = time.monotonic() - started
    # Each node allows half the burst (5) and half the rate: together at most burst + rate × elapsed,
    # where two nodes each allowing the whole burst would have answered 20.
    assert answered["a"] >= 5 and answered["b"] >= 5
    assert answered["a"] + answered["b"] <= 10 + 1 * elapsed


async def health(http: httpx2.AsyncClient) -> dict[str, Any]:
    return dict((await http.get("/health")).json())


async def test_without_redis_sessions_are_admitted_on_the_local_limit_and_counted_once_it_is_back(
    own_redis: RedisServer, prefix: str, postgres_url: str
) -> None:
    with live_server(node_config(own_redis.url, postgres_url, prefix, {"sessions_per_user": 1})) as a:
        async with httpx2.AsyncClient(base_url=a.http_url) as http:
            assert (await health(http))["cluster"]["state"] == "ok"
            assert "haip_cluster_up 1.0" in (await http.get("/metrics")).text
            own_redis.kill()

            async def down() -> bool:
                return bool((await health(http))["status"] == "degraded")

            await until(down)
            async with raw_peer(a.ws_url) as peer:
                info = await ready(peer, a.token("ann"))  # fail-open: admitted without Redis
                during = await health(http)
                metrics = (await http.get("/metrics")).text
                local_refusal, _ = await refused(a, "ann")  # the per-process limit still holds
                own_redis.start()  # empty: what it held is gone

                async def recorded() -> bool:
                    cluster = (await health(http))["cluster"]
                    return bool(cluster["state"] == "ok" and cluster["unrecordedSessions"] == 0)

                await until(recorded)
                async with probe(own_redis.url, prefix) as counter:
                    assert await counter.quotas.count("ann", "sessions") == 1
                after = await health(http)
    assert info["payload"]["user"] == "ann" and local_refusal["payload"]["code"] == "RATE_LIMITED"
    assert during["degraded"]["cluster"].startswith("unavailable") and during["cluster"]["unrecordedSessions"] == 1
    assert "haip_cluster_up 0.0" in metrics
    assert after["status"] == "ok" and after["cluster"]["sessionSlots"] == 1


async def test_open_transactions_per_user_are_counted_by_the_shared_postgres(postgres_url: str) -> None:
    storage = {"backend": "postgres", "url": postgres_url, "flush_interval_seconds": 0.01}
    config = make_config({"storage": storage, "limits": {"transactions_per_user": 1}})
    with live_server(config) as a, live_server(config) as b:
        async with HaipClient(a.ws_url, token=a.token("owner")) as on_a:
            await on_a.start_transaction("echo")
            await until(seen(lambda: a.runtime.store.pending == 0))  # stored: the other process reads it
            whole = [kind for kind in ALL_EVENTS if kind not in ("MESSAGE_START", "MESSAGE_PART", "MESSAGE_END")]
        async with HaipClient(b.ws_url, token=b.token("owner"), accept_events=whole) as on_b:
            await on_b.send("TRANSACTION_START", {"toolName": "echo"}, transaction="second")
            refusal = await on_b.wait_for("ERROR")
    assert refusal.get("code") == "RATE_LIMITED"
    assert refusal.get("detail") == {"limit": "limits.transactions_per_user"}


def one_each(url: str, database: str, prefix: str, **sections: Any) -> HaipConfig:
    """Nodes where a user may own one open transaction, idle after 0.3 s; ``sections`` added."""
    return make_config(
        {
            "cluster": {"redis_url": url, "key_prefix": prefix, **FAST},
            "storage": {"backend": "postgres", "url": database, "flush_interval_seconds": 0.01},
            "limits": {"transactions_per_user": 1},
            "transactions": {"idle_seconds": 0.3},
            **sections,
        }
    )


async def test_a_transaction_idle_on_another_node_ends_to_make_room_for_its_owners_new_one(
    redis_url: str, postgres_url: str, prefix: str
) -> None:
    """At the limit, a node ends the owner's transaction another node held, once nothing happened in it
    for ``transactions.idle_seconds`` (with the members' sessions gone there, it left that node's memory)."""
    config = one_each(redis_url, postgres_url, prefix, session={"resume_timeout_seconds": 0.2})
    with live_server(config) as a, live_server(config) as b:
        with waiting_for_log("left memory (idle)") as evicted:
            async with HaipClient(a.ws_url, token=a.token("owner")) as on_a:
                first = await on_a.start_transaction("echo")
            await evicted.wait(1)
        whole = [kind for kind in ALL_EVENTS if kind not in ("MESSAGE_START", "MESSAGE_PART", "MESSAGE_END")]
        async with HaipClient(b.ws_url, token=b.token("owner"), accept_events=whole) as on_b:
            with anyio.fail_after(15):
                while True:  # refused until idle_seconds have passed since A saved it (as it left memory)
                    try:
                        second = await on_b.start_transaction("echo")
                        break
                    except ClientError as refused:
                        assert refused.code == "RATE_LIMITED"
                    await anyio.sleep(0.1)
            await on_b.send_text(second, "still here")
            echoed = await on_b.wait_for(lambda e: e.type == "MESSAGE" and e.payload == "you said: still here")
        async with httpx2.AsyncClient(headers={"authorization": f"Bearer {a.token('owner')}"}) as http:

            async def ended() -> bool:  # (each node writes to the store in batches)
                listed = (await http.get(f"{a.http_url}/haip/transactions")).json()["transactions"]
                return any(t["id"] == first and t["end_reason"] == REPLACED for t in listed)

            await until(ended)
    assert echoed.transaction == second


async def test_a_transaction_whose_turn_runs_on_another_node_is_not_ended_to_make_room(
    redis_url: str, postgres_url: str, prefix: str
) -> None:
    """A reviewer's finding: the store's updated_at (saved at a run's end, not its start) said idle, and a
    start on A ended the transaction whose member on B was hearing a story. Now a transaction another
    node hosts (holds its lease) is never taken."""
    storyteller = {"plugin": "haip_runtime.demo.storyteller:Storyteller", "options": {"words_per_second": 8}}
    config = one_each(redis_url, postgres_url, prefix, agents={"storyteller": storyteller})
    with live_server(config) as a, live_server(config) as b:
        async with HaipClient(b.ws_url, token=b.token("owner")) as on_b:
            story = await on_b.start_transaction("storyteller")
            await on_b.send_text(story, "dragons")
            # Three words in: stored, and past idle_seconds since its last save (at its start), mid-turn.
            await on_b.wait_for(lambda _: sum(e.type == "MESSAGE_PART" for e in on_b.received) >= 3)
            async with HaipClient(a.ws_url, token=a.token("owner")) as on_a:
                with pytest.raises(ClientError) as refused:
                    await on_a.start_transaction("echo")
            finished = await on_b.wait_for(lambda e: e.type == "RUN_FINISHED" and e.transaction == story, timeout=30)
    assert refused.value.code == "RATE_LIMITED" and "none can end to make room" in str(refused.value)
    assert finished.get("status") == "OK"
    assert not [e for e in on_b.received if e.type == "TRANSACTION_END"]


async def test_a_transaction_a_member_sits_in_silently_on_another_node_is_not_ended_to_make_room(
    redis_url: str, postgres_url: str, prefix: str
) -> None:
    """Nothing in the log says the owner is still there on B (a start is not a join, and nothing runs):
    B holding the transaction's lease does."""
    config = one_each(redis_url, postgres_url, prefix, session={"heartbeat_interval_seconds": 0.5})
    with live_server(config) as a, live_server(config) as b:
        async with HaipClient(b.ws_url, token=b.token("owner")) as on_b:
            chat = await on_b.start_transaction("echo")
            await on_b.send_text(chat, "hi")
            await on_b.wait_for(lambda e: e.type == "RUN_FINISHED" and e.transaction == chat)
            await on_b.wait_for("PING")  # silent past idle_seconds since its last save (the run's end)
            async with HaipClient(a.ws_url, token=a.token("owner")) as on_a:
                with pytest.raises(ClientError) as refused:
                    await on_a.start_transaction("echo")
            await on_b.send_text(chat, "still here")
            echoed = await on_b.wait_for(lambda e: e.type == "RUN_FINISHED" and e.transaction == chat)
    assert refused.value.code == "RATE_LIMITED"
    assert echoed.get("status") == "OK" and not [e for e in on_b.received if e.type == "TRANSACTION_END"]


NO_REDIS = """
import sys
sys.modules["redis"] = None  # any import of redis now fails
import anyio
from haip_runtime.server.app import Runtime
from tests.support.serving import make_config

async def main():
    async with Runtime(make_config()) as runtime:
        print(runtime.fleet, "cluster" in runtime.health())

anyio.run(main)
"""


def test_without_a_cluster_section_redis_is_never_imported() -> None:
    done = subprocess.run([sys.executable, "-c", NO_REDIS], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["None", "False"]
