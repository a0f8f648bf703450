"""When the turns move between nodes: a node cut from Redis past its lease (through netcut), an end
asked while nobody holds the lease, a message queued at the node that lost it, a run started long
before the node taking over hosted the transaction, and a join with ``since`` on a node that brings
the transaction back. Two runtimes on one real Redis and one real PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import pytest

from haip_runtime.client import HaipClient, Received
from tests.behaviour.test_cluster_conversations import WHOLE, node_config, two_nodes
from tests.behaviour.test_cluster_limits import seen, until
from tests.support.agents import GATES, Gate
from tests.support.netcut import NetCut, netcut
from tests.support.serving import LiveServer, live_server, make_config

pytestmark = pytest.mark.anyio

PATIENT = {
    "patient": {"plugin": "tests.support.agents:PatientAgent"},
    "gate": {"plugin": "tests.support.agents:GateAgent"},
}


@contextmanager
def cut_and_direct(
    redis_url: str, postgres_url: str, prefix: str, **extra: Any
) -> Iterator[tuple[NetCut, LiveServer, LiveServer]]:
    """Node A reaches Redis through a cut the test controls; node B directly."""
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    update = {key: getattr(make_config({"agents": PATIENT, **extra}), key) for key in ("agents", *extra)}
    with netcut(port) as cut:
        behind = node_config(redis_url.replace(f":{port}/", f":{cut.port}/"), postgres_url, prefix)
        direct = node_config(redis_url, postgres_url, prefix)
        with live_server(behind.model_copy(update=update)) as a, live_server(direct.model_copy(update=update)) as b:
            yield cut, a, b


def said(text: str) -> Callable[[Received], bool]:
    return lambda e: e.type == "MESSAGE_PART" and e.get("text") == text


def whole(text: str) -> Callable[[Received], bool]:
    return lambda e: e.type == "MESSAGE" and e.payload == text


async def runs_nothing(node: LiveServer) -> None:
    """Until ``node`` runs no transaction's turns (its lease ran out by Redis's clock: no event says so)."""
    fleet = node.runtime.fleet
    assert fleet is not None
    await until(seen(lambda: fleet.hosted()["runsHere"] == 0))


async def keeps_a_lease(node: LiveServer) -> None:
    """Until ``node`` keeps a run lease renewed: a new transaction's turns start before its lease is taken."""
    fleet = node.runtime.fleet
    assert fleet is not None and fleet.bus is not None
    leases = fleet.bus.leases
    await until(seen(lambda: leases.held == 1))


async def test_a_node_that_loses_its_lease_and_takes_it_back_ends_the_run_it_lost(
    redis_url: str, postgres_url: str, prefix: str
) -> None:
    with cut_and_direct(redis_url, postgres_url, prefix) as (cut, a, _):
        async with HaipClient(a.ws_url, token=a.token("alice"), timeout=20) as alice:
            tx = await alice.start_transaction("patient")  # A alone hosts it
            await alice.send_text(tx, "wait")
            started = await alice.wait_for("RUN_STARTED")
            await alice.wait_for("MESSAGE_PART")
            await keeps_a_lease(a)  # (taken behind the first turn: cut before, there is no lease to lose)
            cut.cut()
            await runs_nothing(a)  # its lease ran out: the run is stopped
            cut.heal()  # A takes the lease again, and must end the run it stopped
            lost = await alice.wait_for(lambda e: e.type == "RUN_ERROR" and e.run_id == started.run_id)
            await alice.send_text(tx, "hello")
            await alice.wait_for(lambda e: e.type == "MESSAGE_PART" and e.get("text") == "you said: hello")
    assert lost.get("code") == "NODE_LOST"


async def test_an_end_asked_while_the_owner_is_cut_off_is_carried_out_by_the_next_owner(
    redis_url: str, postgres_url: str, prefix: str
) -> None:
    with cut_and_direct(redis_url, postgres_url, prefix) as (cut, a, b):
        async with (
            HaipClient(a.ws_url, token=a.token("alice"), timeout=20) as alice,
            HaipClient(b.ws_url, token=b.token("sam", roles=["support"]), timeout=30) as sam,
        ):
            tx = await alice.start_transaction("patient")
            await sam.join(tx)
            await keeps_a_lease(a)
            cut.cut()  # A holds the lease, but cannot hear the end
            await sam.end_transaction(tx, "bye")
            ended = await sam.wait_for("TRANSACTION_END")
    assert ended.get("reason") == "bye" and ended.transaction == tx


async def test_a_message_queued_at_the_owner_that_loses_its_lease_is_answered_by_the_next(
    redis_url: str, postgres_url: str, prefix: str
) -> None:
    with cut_and_direct(redis_url, postgres_url, prefix, session={"max_concurrent_runs": 1}) as (cut, a, b):
        async with (
            HaipClient(a.ws_url, token=a.token("alice"), timeout=20) as alice,
            HaipClient(b.ws_url, token=b.token("sam", roles=["support"]), timeout=20) as sam,
        ):
            tx = await alice.start_transaction("patient")
            await sam.join(tx)
            await alice.send_text(tx, "wait")
            started = await sam.wait_for("RUN_STARTED")
            await alice.send_text(tx, "second")  # alice may run one at a time: it waits at A
            await sam.wait_for(lambda e: e.type == "INFO" and e.get("event") == "run.queued")
            await keeps_a_lease(a)
            cut.cut()
            lost = await sam.wait_for(lambda e: e.type == "RUN_ERROR" and e.run_id == started.get("run_id"))
            answered = await sam.wait_for(lambda e: e.type == "MESSAGE_PART" and e.get("text") == "you said: second")
            cut.heal()
            await alice.wait_for(lambda e: e.type == "MESSAGE_PART" and e.get("text") == "you said: second")
            said = [e for e in sam.received if e.type == "MESSAGE_PART" and e.get("text") == "you said: second"]
    assert lost.get("code") == "NODE_LOST" and answered.transaction == tx
    assert len(said) == 1  # answered once: by B, not again by A when the network healed


@asynccontextmanager
async def said_while_cut_off(
    cut: NetCut, a: LiveServer, b: LiveServer, agent: str, text: str
) -> AsyncIterator[tuple[HaipClient, HaipClient, str]]:
    """alice on A and sam on B in a transaction with ``agent`` whose turns A runs; A cut from Redis,
    alice says ``text`` (A answers it at once, by its clock still the owner), B takes the turns over,
    the network heals: (alice, sam, the transaction)."""
    async with (
        HaipClient(a.ws_url, token=a.token("alice"), timeout=20) as alice,
        HaipClient(b.ws_url, token=b.token("sam", roles=["support"]), timeout=20) as sam,
    ):
        tx = await alice.start_transaction(agent)
        await sam.join(tx)
        await keeps_a_lease(a)
        cut.cut()
        await alice.send_text(tx, text)  # both wait for Redis
        await runs_nothing(a)
        fleet = b.runtime.fleet
        assert fleet is not None
        await until(seen(lambda: fleet.hosted()["runsHere"] == 1))  # B runs the turns
        cut.heal()
        yield alice, sam, tx


async def test_a_message_the_cut_off_owner_answered_is_not_answered_again_by_the_next_owner(
    redis_url: str, postgres_url: str, prefix: str
) -> None:
    """A cut from Redis still holds the lease by its clock: it answers alice's message at once, and both
    wait for Redis. B takes the lease over; when the network heals A's message and its run reach the log
    after B runs the turns. B answered it again (found by a tester restarting Redis): once now."""
    with cut_and_direct(redis_url, postgres_url, prefix) as (cut, a, b):
        async with said_while_cut_off(cut, a, b, "echo", "while cut off") as (alice, sam, tx):
            await sam.wait_for(said("you said: while cut off"))
            await alice.send_text(tx, "after")
            await sam.wait_for(said("you said: after"))
            await alice.wait_for(said("you said: after"))
    for member in (sam, alice):
        answers = [e for e in member.received if said("you said: while cut off")(e)]
        started = [e for e in member.received if e.type == "RUN_STARTED" and e.transaction == tx]
        assert len(answers) == 1 and len(started) == 2, [e.type for e in member.received if e.transaction == tx]


async def test_a_message_whose_run_the_cut_off_owner_gave_up_is_answered_by_the_next_owner(
    redis_url: str, postgres_url: str, prefix: str
) -> None:
    """As above, but A's run for the message is still running when A's lease runs out: A stops it and
    drops its events, so only the message reaches the log, after B runs the turns, and then A's word
    that it gave its runs up. B answers the message then (else nobody would)."""
    with cut_and_direct(redis_url, postgres_url, prefix) as (cut, a, b):
        # A's run waits until its lease runs out and A stops it
        async with said_while_cut_off(cut, a, b, "patient", "wait") as (_, sam, tx):
            started = await sam.wait_for(lambda e: e.type == "RUN_STARTED" and e.transaction == tx)
            streamed = await sam.wait_for(lambda e: e.type == "MESSAGE_PART" and e.get("text") == "waiting")
    assert started.run_id == streamed.run_id  # B's run: A's never reached the log


async def test_a_run_that_ends_on_the_cut_off_owner_before_its_lease_runs_out_ends_once_with_node_lost(
    redis_url: str, postgres_url: str, prefix: str
) -> None:
    """A's run streamed its first words to the log, then A is cut off and the run ends there while A
    still holds the lease by its clock: its last events wait for Redis. B ends the run NODE_LOST (it
    saw it open), so when the network heals those events must not follow: a run ends once (found by a
    tester: RUN_ERROR NODE_LOST, then the rest of the answer and RUN_FINISHED OK)."""
    GATES["cut off"], GATES["after"] = gate, after = Gate(), Gate()
    after.open()
    with cut_and_direct(redis_url, postgres_url, prefix) as (cut, a, b):
        async with (
            HaipClient(a.ws_url, token=a.token("alice"), timeout=20) as alice,
            HaipClient(b.ws_url, token=b.token("sam", roles=["support"]), timeout=20) as sam,
        ):
            tx = await alice.start_transaction("gate")
            await sam.join(tx)
            await keeps_a_lease(a)
            await alice.send_text(tx, "cut off")
            started = await sam.wait_for("RUN_STARTED")
            await sam.wait_for(said("waiting at the gate"))
            cut.cut()
            gate.open()  # the run ends on A, which still runs the turns
            transaction = a.runtime.hub.transactions.live[tx]
            await until(seen(lambda: not transaction.runs))
            await runs_nothing(a)
            lost = await sam.wait_for(lambda e: e.type == "RUN_ERROR" and e.run_id == started.run_id)
            cut.heal()
            await alice.send_text(tx, "after")  # answered by B; anything of A's run would be in the log before
            await sam.wait_for(lambda e: e.type == "RUN_FINISHED" and e.run_id != started.run_id)
            await alice.wait_for(lambda e: e.type == "RUN_FINISHED" and e.run_id != started.run_id)
    assert not gate.cancelled.is_set()  # the run did end on A, before A stopped its turns
    assert lost.get("code") == "NODE_LOST"
    for member in (sam, alice):
        ends = [e.type for e in member.received if e.run_id == started.run_id and e.type.startswith("RUN_")]
        assert ends == ["RUN_STARTED", "RUN_ERROR"], ends
        assert not any(said("; through the gate cut off")(e) for e in member.received)


async def test_a_run_started_long_before_the_next_owner_hosted_the_transaction_ends_with_node_lost(
    redis_url: str, postgres_url: str, prefix: str
) -> None:
    with cut_and_direct(redis_url, postgres_url, prefix) as (cut, a, b):
        async with HaipClient(a.ws_url, token=a.token("alice"), timeout=20) as alice:
            tx = await alice.start_transaction("patient")
            await alice.send_text(tx, "wait")
            started = await alice.wait_for("RUN_STARTED")
            for n in range(14):  # more than the last events a node brings back from Redis (64)
                await alice.send_text(tx, f"x{n}")
                await alice.wait_for(said(f"you said: x{n}"))
            async with HaipClient(b.ws_url, token=b.token("sam", roles=["support"]), timeout=20) as sam:
                await sam.join(tx)
                cut.cut()
                lost = await sam.wait_for(lambda e: e.type == "RUN_ERROR" and e.run_id == started.run_id)
                cut.heal()
    assert lost.get("code") == "NODE_LOST"


async def test_a_join_with_since_on_a_node_that_brings_the_transaction_back_repeats_nothing(
    redis_url: str, postgres_url: str, prefix: str
) -> None:
    with two_nodes(redis_url, postgres_url, prefix) as (a, b):
        async with HaipClient(a.ws_url, token=a.token("alice"), accept_events=WHOLE, timeout=15) as alice:
            tx = await alice.start_transaction("echo")
            for n in range(3):
                await alice.send_text(tx, f"m{n}")
                await alice.wait_for(whole(f"you said: m{n}"))
            last = max(int(e.raw["tseq"]) for e in alice.received if e.transaction == tx and "tseq" in e.raw)
            async with HaipClient(b.ws_url, token=b.token("alice"), accept_events=WHOLE, timeout=15) as again:
                reply = await again.join(tx, since=last)
                await alice.send_text(tx, "m3")
                await again.wait_for(lambda e: e.type == "MESSAGE" and e.payload == "you said: m3")
                got = [int(e.raw["tseq"]) for e in again.received if e.transaction == tx and "tseq" in e.raw]
    assert int(reply.get("tseq")) >= last  # the join's position is the log's end, not where B brought it back
    assert got and min(got) > last and got == sorted(set(got))  # nothing before since, nothing twice


async def test_an_agent_added_on_a_node_that_does_not_run_the_turns_answers_from_the_one_that_does(
    redis_url: str, postgres_url: str, prefix: str
) -> None:
    with two_nodes(redis_url, postgres_url, prefix) as (a, b):
        async with (
            HaipClient(a.ws_url, token=a.token("alice"), accept_events=WHOLE, timeout=15) as alice,
            HaipClient(b.ws_url, token=b.token("sam", roles=["support"]), accept_events=WHOLE, timeout=15) as sam,
        ):
            tx = await alice.start_transaction("echo")  # its turns run on A
            await sam.join(tx)
            await sam.send("TRANSACTION_JOIN", {"agent": "storyteller"}, transaction=tx)
            await sam.wait_for(lambda e: e.type == "TRANSACTION_JOIN" and "storyteller" in e.get("agents", []))
            await alice.send_text(tx, "hi")
            told = [await client.wait_for(storied) for client in (alice, sam)]
            started = [e.get("agent") for e in alice.received if e.type == "RUN_STARTED"]
    assert all(e.transaction == tx for e in told)
    assert sorted(started) == ["echo", "storyteller"]  # one turn each, run on A, for the message after it joined


def storied(event: Received) -> bool:
    return event.type == "MESSAGE" and "Once upon a time, someone said 'hi'" in str(event.payload)


async def test_a_redis_that_hangs_is_noticed_in_seconds_and_the_members_are_told(
    redis_url: str, postgres_url: str, prefix: str
) -> None:
    with cut_and_direct(redis_url, postgres_url, prefix) as (cut, a, _):
        async with HaipClient(a.ws_url, token=a.token("alice"), accept_events=WHOLE, timeout=8) as alice:
            tx = await alice.start_transaction("patient")
            cut.cut("hang")  # packets dropped: no error, only silence (a frozen Redis, a partition)
            await alice.send_text(tx, "anyone?")  # its append waits for an answer that does not come
            told = await alice.wait_for("ERROR")  # within a command's timeout (2 s) and a second more
            cut.heal()
            await alice.wait_for(lambda e: e.type == "INFO" and e.get("event") == "cluster")
            answered = await alice.wait_for(whole("you said: anyone?"))
    assert told.get("code") == "STORAGE_UNAVAILABLE" and answered.transaction == tx
