"""One conversation over two nodes: two runtimes on one real Redis and one real PostgreSQL, members
on each, one ordered log; approvals and input answers from the node that does not run the turns;
an end asked from either node; Redis restarted mid-conversation."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import httpx2
import pytest
import redis as redis_py

from haip_runtime.client import HaipClient, Received
from haip_runtime.cluster.translog import ENDED_KEEP_SECONDS
from haip_runtime.protocol.events import ALL_EVENTS
from tests.cluster.conftest import until
from tests.support.netcut import netcut
from tests.support.redis import RedisServer
from tests.support.serving import LiveServer, live_server, make_config

pytestmark = pytest.mark.anyio

ROLES = {"user": {}, "support": {"may_join_others": True}}
FAST = {"heartbeat_seconds": 0.2, "node_ttl_seconds": 2, "connect_timeout_seconds": 5, "lease_seconds": 1.5}
#: Whole messages, not streamed parts: one MESSAGE per answer is easy to count.
WHOLE = [kind for kind in ALL_EVENTS if kind not in ("MESSAGE_START", "MESSAGE_PART", "MESSAGE_END")]
TEAM = {"transport": "python", "server": "haip_runtime.demo.team_tools:server", "require_approval": ["word_count"]}


def node_config(redis: str, database: str, prefix: str) -> Any:
    return make_config(
        {
            "cluster": {"redis_url": redis, "key_prefix": prefix, **FAST},
            "storage": {"backend": "postgres", "url": database, "flush_interval_seconds": 0.01},
            "roles": ROLES,
            "agents": {"operator": {"plugin": "operator", "mcp_servers": ["team"]}},
            "mcp": {"servers": {"team": TEAM}},
        }
    )


@contextmanager
def two_nodes(redis: str, database: str, prefix: str) -> Iterator[tuple[LiveServer, LiveServer]]:
    config = node_config(redis, database, prefix)
    with live_server(config) as a, live_server(config) as b:
        yield a, b


def logged(client: HaipClient, tx: str) -> list[tuple[int, str]]:
    """(tseq, event id) of what ``client`` got of ``tx``'s log, in the order it got them."""
    return [(int(e.raw["tseq"]), str(e.raw["id"])) for e in client.received if e.transaction == tx and "tseq" in e.raw]


def answers(client: HaipClient, tx: str) -> list[str]:
    return [
        str(e.payload)
        for e in client.received
        if e.transaction == tx and e.type == "MESSAGE" and e.raw["channel"] == "AGENT"
    ]


def all_answered(client: HaipClient, tx: str, count: int) -> Callable[[Received], bool]:
    return lambda _: len(answers(client, tx)) >= count


async def test_members_on_two_nodes_see_one_ordered_log_and_each_is_answered_once(
    redis_url: str, postgres_url: str, prefix: str
) -> None:
    with two_nodes(redis_url, postgres_url, prefix) as (a, b):
        async with (
            HaipClient(a.ws_url, token=a.token("alice"), accept_events=WHOLE, timeout=15) as alice,
            HaipClient(b.ws_url, token=b.token("sam", roles=["support"]), accept_events=WHOLE, timeout=15) as sam,
        ):
            tx = await alice.start_transaction("echo")
            await sam.join(tx, since=0)
            await alice.wait_for(lambda e: e.type == "TRANSACTION_JOIN" and e.get("joined") == "sam")

            async def say(client: HaipClient, who: str) -> None:
                for n in range(5):
                    await client.send_text(tx, f"{who} {n}")

            async with anyio.create_task_group() as tg:
                tg.start_soon(say, alice, "alice")
                tg.start_soon(say, sam, "sam")
            for client in (alice, sam):
                await client.wait_for(all_answered(client, tx, 10))
            on_a, on_b = logged(alice, tx), logged(sam, tx)
            counts = [node.runtime.fleet.status()["transactions"] for node in (a, b) if node.runtime.fleet]
    expected = {f"you said: {who} {n}" for who in ("alice", "sam") for n in range(5)}
    for client in (alice, sam):
        assert sorted(answers(client, tx)) == sorted(expected)  # each message answered once, seen by both
    for log in (on_a, on_b):
        assert [tseq for tseq, _ in log] == sorted({tseq for tseq, _ in log})  # in tseq order, no repeats
    both = dict(on_a).keys() & dict(on_b).keys()
    assert len(both) > 20 and all(dict(on_a)[tseq] == dict(on_b)[tseq] for tseq in both)  # one log
    assert [(c["hosted"], c["runsHere"]) for c in counts] == [(1, 1), (1, 0)]  # hosted on both, run on A
    announced = [sorted(e.get("members")) for e in alice.received if e.type == "TRANSACTION_JOIN" and e.get("joined")]
    assert announced == [["alice", "sam"]]  # the member list counts the member on the other node


async def test_an_approval_and_an_input_answer_from_the_other_node_reach_the_run(
    redis_url: str, postgres_url: str, prefix: str
) -> None:
    with two_nodes(redis_url, postgres_url, prefix) as (a, b):
        async with (
            HaipClient(a.ws_url, token=a.token("alice"), timeout=20) as alice,
            HaipClient(b.ws_url, token=b.token("sam", roles=["support"]), timeout=20) as sam,
        ):
            tx = await alice.start_transaction("operator")  # its turns run on A, where it started
            await sam.join(tx)
            await alice.send_text(tx, '/call team.word_count {"text": "one two three"}')
            asked = await sam.wait_for(lambda e: e.type == "TOOL_UPDATE" and e.get("status") == "AWAITING_APPROVAL")
            # A call of sam's own under the waiting call's id is refused on his node (a prober's find: taken,
            # it waited for the same approval, and the approval ran sam's call instead of the agent's).
            reuse = {"call_id": asked.get("call_id"), "tool": "team.word_count", "params": {"text": "mine"}}
            reused = await sam.send("TOOL_CALL", reuse, transaction=tx)
            taken = await sam.wait_for(lambda e: e.type == "ERROR" and e.get("related_id") == reused)
            # Answers the run cannot take are refused on sam's node, and the call goes on waiting: the
            # node running the turns only logged them, and sam heard nothing (found reading the code).
            declined = {"call_id": asked.get("call_id"), "decision": "decline"}  # (for input requests only)
            bad = await sam.send("TOOL_UPDATE", declined, transaction=tx)
            no_decision = await sam.wait_for(lambda e: e.type == "ERROR" and e.get("related_id") == bad)
            await sam.send("TOOL_UPDATE", {"call_id": asked.get("call_id"), "decision": "approve"}, transaction=tx)
            counted = await alice.wait_for(lambda e: e.type == "TOOL_DONE" and e.get("call_id") == asked.get("call_id"))

            await alice.send_text(tx, '/call team.book_meeting {"topic": "roadmap"}')
            asking = await sam.wait_for(lambda e: e.type == "TOOL_UPDATE" and e.get("status") == "INPUT_REQUIRED")
            misfit = {"call_id": asking.get("call_id"), "input": {"day": "Tuesday", "room": 7}}
            bad = await sam.send("TOOL_UPDATE", misfit, transaction=tx)
            no_fit = await sam.wait_for(lambda e: e.type == "ERROR" and e.get("related_id") == bad)
            bad = await sam.send(
                "TOOL_UPDATE", {"call_id": asking.get("call_id"), "decision": "approve"}, transaction=tx
            )
            no_input = await sam.wait_for(lambda e: e.type == "ERROR" and e.get("related_id") == bad)  # (not a decline)
            reply = {"call_id": asking.get("call_id"), "input": {"day": "Tuesday", "room": "Lovelace"}}
            await sam.send("TOOL_UPDATE", reply, transaction=tx)
            booked = await alice.wait_for(lambda e: e.type == "TOOL_DONE" and e.get("call_id") == asking.get("call_id"))

            await sam.send("TOOL_UPDATE", {"call_id": "no-such-call", "decision": "approve"}, transaction=tx)
            refused = await sam.wait_for("ERROR")
    assert (taken.get("code"), taken.get("detail")) == ("INVALID_PAYLOAD", {"where": "/payload/call_id"})
    assert counted.get("status") == "OK" and json.loads(counted.get("result")["content"][0]["text"]) == 3
    assert booked.get("result")["content"][0]["text"] == "booked 'roadmap' on Tuesday in Lovelace"
    assert refused.get("code") == "INVALID_PAYLOAD"  # checked on the member's own node, as on one node
    assert (no_decision.get("code"), no_decision.get("detail")) == ("INVALID_PAYLOAD", {"where": "/payload/decision"})
    assert (no_fit.get("code"), no_fit.get("detail")) == ("INVALID_PAYLOAD", {"where": "/payload/input/room"})
    assert (no_input.get("code"), no_input.get("detail")) == ("INVALID_PAYLOAD", {"where": "/payload/input"})


async def test_a_cancel_and_an_end_from_the_other_node_are_carried_out_where_the_turn_runs(
    redis_url: str, postgres_url: str, prefix: str
) -> None:
    config = node_config(redis_url, postgres_url, prefix)
    agents = {"waiting": {"plugin": "tests.support.agents:WaitingAgent"}}
    config = config.model_copy(update={"agents": {**config.agents, **make_config({"agents": agents}).agents}})
    with live_server(config) as a, live_server(config) as b:
        async with (
            HaipClient(a.ws_url, token=a.token("alice"), timeout=15) as alice,
            HaipClient(b.ws_url, token=b.token("sam", roles=["support"]), timeout=15) as sam,
        ):
            tx = await alice.start_transaction("waiting")
            await sam.join(tx)
            await sam.send_text(tx, "think")  # answered on A, where the turn runs
            started = await sam.wait_for("RUN_STARTED")
            await sam.send("RUN_CANCEL", {"run_id": started.get("run_id")}, transaction=tx)
            finished = await alice.wait_for("RUN_FINISHED")
            # "stop" naming the message (no run id known yet), from the node that does not run the turn
            await sam.send("MESSAGE", {"text": "think again", "message_id": "m-think"}, transaction=tx)
            again = await alice.wait_for(lambda e: e.type == "RUN_STARTED" and e.get("message_id") == "m-think")
            await sam.wait_for(lambda e: e.type == "RUN_STARTED" and e.run_id == again.get("run_id"))
            await sam.send("RUN_CANCEL", {"run_id": "m-think"}, transaction=tx)
            stopped = await alice.wait_for(lambda e: e.type == "RUN_FINISHED" and e.run_id == again.get("run_id"))
            typo = {"text": "helo", "message_id": "m-typo"}
            await sam.send("MESSAGE", typo, transaction=tx)
            await sam.send("MESSAGE_UPDATE", {"message_id": "m-typo", "text": "hello"}, transaction=tx)
            edited = await alice.wait_for("MESSAGE_UPDATE")
            await sam.end_transaction(tx, "done here")
            ended = [await client.wait_for("TRANSACTION_END") for client in (alice, sam)]
            # Its log leaves Redis soon after, not a day after its last append (a prober's find).
            with redis_py.Redis.from_url(redis_url) as admin:

                async def let_go() -> bool:
                    return 0 < int(admin.pttl(f"{prefix}:{{t:{tx}}}:log")) <= ENDED_KEEP_SECONDS * 1000

                await until(let_go)
    assert finished.get("status") == "CANCELLED" and finished.run_id == started.get("run_id")
    assert stopped.get("status") == "CANCELLED"
    assert [e.get("reason") for e in ended] == ["done here", "done here"]
    assert (edited.get("author"), edited.get("text")) == ("sam", "hello")  # an edit made on the other node
    assert tx not in a.runtime.hub.transactions.live and tx not in b.runtime.hub.transactions.live


async def test_redis_restarted_mid_conversation_every_node_goes_on(
    own_redis: RedisServer, postgres_url: str, prefix: str
) -> None:
    with two_nodes(own_redis.url, postgres_url, prefix) as (a, b):
        async with (
            HaipClient(a.ws_url, token=a.token("alice"), accept_events=WHOLE, timeout=20) as alice,
            HaipClient(b.ws_url, token=b.token("sam", roles=["support"]), accept_events=WHOLE, timeout=20) as sam,
        ):
            tx = await alice.start_transaction("echo")
            await sam.join(tx)
            await sam.send_text(tx, "before")
            await alice.wait_for(lambda e: e.type == "MESSAGE" and e.payload == "you said: before")
            own_redis.stop()  # and started again below, without persistence: counters, logs and leases are gone
            told = [await client.wait_for(lambda e: e.type == "ERROR") for client in (alice, sam)]
            await alice.send_text(tx, "after")  # waits on A, in order, until Redis is back
            own_redis.start()
            for client in (alice, sam):
                await client.wait_for(lambda e: e.type == "INFO" and e.get("event") == "cluster")
                await client.wait_for(lambda e: e.type == "MESSAGE" and e.payload == "you said: after")
            seen = [tseq for tseq, _ in logged(sam, tx)]
            async with httpx2.AsyncClient(
                base_url=b.http_url, headers={"Authorization": f"Bearer {b.token('sam')}"}
            ) as http:
                with anyio.fail_after(10):  # every node writes what it delivers, in batches
                    while True:
                        page = (await http.get(f"/haip/transactions/{tx}/events", params={"limit": 500})).json()
                        stored = [(int(e["tseq"]), e) for e in page["events"]]
                        said = [e["payload"]["text"] for _, e in stored if e["type"] == "MESSAGE"]
                        if said == ["before", "after"] and stored[-1][1]["type"] == "RUN_FINISHED":
                            break
    assert [e.get("code") for e in told] == ["STORAGE_UNAVAILABLE"] * 2  # members on both nodes were told
    assert seen == sorted(set(seen))  # numbering went on after the restart, never from 1 again
    assert [tseq for tseq, _ in stored] == sorted({tseq for tseq, _ in stored})
    finished = [e["payload"]["status"] for _, e in stored if e["type"] == "RUN_FINISHED"]
    assert finished == ["OK", "OK"]  # both turns, each once, in the durable log


async def test_a_transaction_started_while_redis_is_down_is_said_to_wait_at_once_then_starts(
    own_redis: RedisServer, postgres_url: str, prefix: str
) -> None:
    """Its TRANSACTION_START goes through the log, so it comes once Redis is back; meanwhile the member is
    told why, at once (a tester's new user waited 11 s with no word)."""
    with two_nodes(own_redis.url, postgres_url, prefix) as (a, _):
        async with (
            HaipClient(a.ws_url, token=a.token("alice"), accept_events=WHOLE, timeout=20) as alice,
            HaipClient(a.ws_url, token=a.token("bob"), accept_events=WHOLE, timeout=10) as bob,
        ):
            await alice.start_transaction("echo")
            own_redis.stop()
            await alice.wait_for(lambda e: e.type == "ERROR")  # the members then were told; bob was none
            starting = anyio.Event()
            async with anyio.create_task_group() as tg:

                async def start() -> None:
                    starting.set()
                    started.append(await bob.start_transaction("echo"))

                started: list[str] = []
                tg.start_soon(start)
                await starting.wait()
                told = await bob.wait_for(lambda e: e.type == "ERROR")
                own_redis.start()
            reply = await bob.wait_for("TRANSACTION_START")
    assert told.get("code") == "STORAGE_UNAVAILABLE" and told.transaction is None
    assert reply.transaction is not None and started == [reply.transaction]
    assert reply.transaction in str(told.get("message"))
    assert told.get("detail")["transaction"] == reply.transaction and "reference" in told.get("detail")


async def test_a_node_cut_from_redis_loses_its_turns_to_another_and_catches_up_when_the_network_heals(
    redis_url: str, postgres_url: str, prefix: str
) -> None:
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    agents = make_config({"agents": {"patient": {"plugin": "tests.support.agents:PatientAgent"}}}).agents
    with netcut(port) as cut:
        behind_cut = node_config(redis_url.replace(f":{port}/", f":{cut.port}/"), postgres_url, prefix)
        direct = node_config(redis_url, postgres_url, prefix)
        with (
            live_server(behind_cut.model_copy(update={"agents": agents})) as a,
            live_server(direct.model_copy(update={"agents": agents})) as b,
        ):
            async with (
                HaipClient(a.ws_url, token=a.token("alice"), timeout=20) as alice,
                HaipClient(b.ws_url, token=b.token("sam", roles=["support"]), timeout=20) as sam,
            ):
                tx = await alice.start_transaction("patient")  # its turns run on A
                await sam.join(tx)
                await sam.send_text(tx, "wait")
                started = await sam.wait_for("RUN_STARTED")
                await sam.wait_for("MESSAGE_PART")
                cut.cut()  # A can reach neither Redis nor B: its lease runs out, B takes the turns
                lost = await sam.wait_for("RUN_ERROR")
                await sam.send_text(tx, "still there?")
                answer = "you said: still there?"
                await sam.wait_for(lambda e: e.type == "MESSAGE_PART" and e.get("text") == answer)
                cut.heal()  # A's feed reconnects and reads what it missed
                caught_up = await alice.wait_for(lambda e: e.type == "MESSAGE_PART" and e.get("text") == answer)
                tseqs = [int(e.raw["tseq"]) for e in alice.received if e.transaction == tx and "tseq" in e.raw]
                ends = [e for e in alice.received if e.run_id == started.get("run_id") and e.type.startswith("RUN_")]
    assert lost.get("code") == "NODE_LOST" and lost.run_id == started.get("run_id")
    assert caught_up.transaction == tx and tseqs == sorted(set(tseqs))  # in order, nothing twice
    assert [(e.type, e.get("code")) for e in ends] == [("RUN_STARTED", None), ("RUN_ERROR", "NODE_LOST")]


def announced(client: HaipClient, after: int = 0) -> list[int]:
    """The tseqs of the ``INFO mcp.server`` announcements ``client`` got past tseq ``after`` (through the log:
    not the note of the servers not connected yet that a member gets alone as it joins, which has no tseq)."""
    infos = (e for e in client.received if e.type == "INFO" and e.get("event") == "mcp.server" and "tseq" in e.raw)
    return sorted(tseq for tseq in (int(e.raw["tseq"]) for e in infos) if tseq > after)


def lists_tool(client: HaipClient, name: str) -> bool:
    """Whether the last TOOL_LIST ``client`` got lists the tool ``name``."""
    lists = [e for e in client.received if e.type == "TOOL_LIST"]
    return bool(lists) and any(tool.get("name") == name for tool in lists[-1].get("tools"))


async def test_a_tool_list_change_on_the_node_running_the_turns_is_announced_on_every_node(
    redis_url: str, postgres_url: str, prefix: str
) -> None:
    demo = {"transport": "stdio", "command": sys.executable, "args": ["-m", "haip_runtime.demo.mcp_server"]}
    extra = make_config(
        {"agents": {"operator": {"plugin": "operator", "mcp_servers": ["demo"]}}, "mcp": {"servers": {"demo": demo}}}
    )
    base = node_config(redis_url, postgres_url, prefix)
    assert base.cluster is not None
    # A's lease must not run out while the machine is starved: B would take the turns over and announce
    # its own server, which this test is not about.
    steady = base.cluster.model_copy(update={"lease_seconds": 10})
    config = base.model_copy(update={"agents": extra.agents, "mcp": extra.mcp, "cluster": steady})
    with live_server(config) as a, live_server(config) as b:
        async with (
            HaipClient(a.ws_url, token=a.token("alice"), timeout=20) as alice,
            HaipClient(b.ws_url, token=b.token("sam", roles=["support"]), timeout=20) as sam,
        ):
            tx = await alice.start_transaction("operator")  # its turns, and its tools, are A's
            await sam.join(tx)
            # A's server may still be connecting at the start (that is announced too): the changes below
            # are what this test follows, so it waits until both members see the server's tools.
            await alice.wait_for(lambda _: lists_tool(alice, "demo.toggle_extra_tool"))
            await sam.wait_for(lambda _: lists_tool(sam, "demo.toggle_extra_tool"))
            await alice.send_text(tx, "/call demo.toggle_extra_tool {}")
            after = int((await sam.wait_for("TOOL_CALL")).raw["tseq"])
            await alice.wait_for(lambda _: lists_tool(alice, "demo.extra"))  # the tools of A's server
            await alice.send_text(tx, "/call demo.toggle_extra_tool {}")  # and back
            await alice.wait_for(lambda _: len(announced(alice, after)) >= 2 and not lists_tool(alice, "demo.extra"))
            await sam.wait_for(lambda _: len(announced(sam, after)) >= 2)
            # Each node lists its own servers' tools (B's demo server did not change): B sends its members
            # a fresh TOOL_LIST at each announcement.
            last = max(announced(sam, after))
            await sam.wait_for(lambda e: e.type == "TOOL_LIST" and sam.received.index(e) > position(sam, last))
            seen = [announced(alice, after), announced(sam, after)]
            told = [e for e in sam.received if e.type == "INFO" and int(e.raw.get("tseq") or 0) in seen[1]]
    changes = [(e.get("server"), e.get("state"), e.get("tools_changed")) for e in told]
    assert changes == [("demo", "connected", True)] * 2
    # Announced by A alone, each change once to each member: not once per node.
    assert seen[0] == seen[1] and len(set(seen[1])) == 2


def position(client: HaipClient, tseq: int) -> int:
    """Where in what ``client`` received the event numbered ``tseq`` is."""
    return next(i for i, e in enumerate(client.received) if e.raw.get("tseq") == str(tseq))


async def test_a_node_stopped_cleanly_ends_its_turns_and_hands_its_transactions_over_at_once(
    redis_url: str, postgres_url: str, prefix: str
) -> None:
    agents = make_config({"agents": {"patient": {"plugin": "tests.support.agents:PatientAgent"}}}).agents
    slow = node_config(redis_url, postgres_url, prefix)
    config = slow.model_copy(
        update={"agents": agents, "cluster": slow.cluster.model_copy(update={"lease_seconds": 60})}
        if slow.cluster
        else {}
    )
    with live_server(config) as b:
        async with HaipClient(b.ws_url, token=b.token("sam", roles=["support"]), timeout=20) as sam:
            with live_server(config) as a:
                async with HaipClient(a.ws_url, token=a.token("alice"), timeout=20) as alice:
                    tx = await alice.start_transaction("patient")  # its turns run on A
                    await sam.join(tx)
                    await sam.send_text(tx, "wait")
                    started = await sam.wait_for("RUN_STARTED")
                    await sam.wait_for("MESSAGE_PART")
            # A stopped (as on SIGTERM in a rolling deploy): its run ended, its lease given back.
            ended = await sam.wait_for(
                lambda e: e.type.startswith("RUN_") and e.run_id == started.get("run_id") and e.type != "RUN_STARTED"
            )
            await sam.send_text(tx, "next")
            answered = await sam.wait_for(
                lambda e: e.type == "MESSAGE_PART" and e.get("text") == "you said: next", timeout=10
            )
    assert (ended.type, ended.get("status")) == ("RUN_FINISHED", "CANCELLED")  # not NODE_LOST: it said so itself
    assert answered.transaction == tx  # within seconds, though the lease would last a minute: it was given back


async def test_a_redis_out_of_memory_is_told_to_the_members_and_health_until_appends_go_through(
    own_redis: RedisServer, postgres_url: str, prefix: str
) -> None:
    """maxmemory with noeviction, as docs/deploy.md advises, reached: Redis refuses every append but
    answers reads, heartbeats' reads and renewals. Members heard nothing and /health said ok while every
    conversation stood still (a tester's finding). Now the bus is unavailable from the first refused
    append until one goes through: members are told, /health is degraded, and what waited follows in order."""
    admin = redis_py.Redis(port=own_redis.port)
    with live_server(node_config(own_redis.url, postgres_url, prefix)) as node:
        async with (
            HaipClient(node.ws_url, token=node.token("olga"), accept_events=WHOLE, timeout=15) as olga,
            httpx2.AsyncClient(base_url=node.http_url) as http,
        ):
            tx = await olga.start_transaction("echo")
            await olga.send_text(tx, "before")
            await olga.wait_for(all_answered(olga, tx, 1))
            admin.config_set("maxmemory", 1)  # past it already: every command that would add memory is refused
            try:
                await olga.send_text(tx, "while full")
                told = await olga.wait_for(lambda e: e.type == "ERROR" and e.transaction == tx)
                during = (await http.get("/health")).json()
            finally:
                admin.config_set("maxmemory", 0)
            back = await olga.wait_for(lambda e: e.type == "INFO" and e.get("event") == "cluster")
            await olga.wait_for(all_answered(olga, tx, 2))
            after = (await http.get("/health")).json()
    admin.close()
    assert told.get("code") == "STORAGE_UNAVAILABLE" and "maxmemory" in str(told.get("message"))
    assert during["status"] == "degraded" and during["cluster"]["state"] == "unavailable"
    assert back.get("state") == "ok" and after["cluster"]["state"] == "ok"
    assert answers(olga, tx) == ["you said: before", "you said: while full"]
