"""A transaction on its own: the log's order and fan-out, the run limit it owns, the members it admits."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace
from typing import Any

import anyio
import pytest

from haip_runtime.agents.registry import load_agents
from haip_runtime.auth.tokens import Principal
from haip_runtime.config.models import LimitsConfig, SessionConfig, TransactionsConfig
from haip_runtime.conversation.registry import TransactionRegistry
from haip_runtime.conversation.transaction import RESERVED_AHEAD, Transaction
from haip_runtime.exceptions import ProtocolError
from haip_runtime.hub.router import Hub
from haip_runtime.protocol.envelope import Event
from haip_runtime.protocol.events import ALL_EVENTS
from haip_runtime.session.negotiation import negotiate
from haip_runtime.session.session import Session
from haip_runtime.store.base import TransactionRecord, TransactionState
from haip_runtime.store.memory import MemoryStore
from tests.support.serving import make_config

pytestmark = pytest.mark.anyio

# (several turns of it at once: these tests are about the session's run limit; ``in_turn`` takes them one by one)
WAITING = {"plugin": "tests.support.agents:WaitingAgent", "concurrent_turns": 16}
IN_TURN = {"plugin": "tests.support.agents:WaitingAgent"}
ANY_NUMBER = {"plugin": "tests.support.agents:WaitingAgent", "concurrent_turns": 0}  # (0: no bound of its own)
CONFIG = make_config({"agents": {"waiting": WAITING, "in_turn": IN_TURN, "any_number": ANY_NUMBER}})


def member(user: str) -> Session:
    return Session(Principal(user), negotiate(ALL_EVENTS), SessionConfig())


def received(session: Session) -> list[dict[str, Any]]:
    """What the session was sent (its replay window holds every frame, connected or not)."""
    frames = (session.window.get(seq) for seq in range(1, session.last_seq + 1))
    return [json.loads(frame) for frame in frames if frame is not None]


def registry(
    spawn: Any, *, max_runs: int = 4, max_queued: int = 16, limits: LimitsConfig | None = None
) -> TransactionRegistry:
    agents = load_agents(CONFIG)
    return TransactionRegistry(
        TransactionsConfig(), agents, MemoryStore(), spawn, limits=limits, max_runs=max_runs, max_queued=max_queued
    )


def in_turn(spawn: Any) -> tuple[Transaction, Session]:
    """A transaction of ann's with the agent that takes one turn at a time, ann in it."""
    transactions = registry(spawn)
    transaction = transactions.new("ann", None)
    ann = member("ann")
    transaction.add_member(ann)
    transaction.add_agent(transactions.slot(transactions.agents["in_turn"], transaction.id, "ann", {}))
    return transaction, ann


async def test_publish_numbers_the_log_and_skips_only_the_excluded_member() -> None:
    transactions = registry(lambda *a: None)
    transaction = transactions.new("ann", None)
    ann, bob = member("ann"), member("bob")
    transaction.add_member(ann)
    transaction.add_member(bob)
    transaction.publish(Event("INFO", {"n": 1}))
    transaction.publish(Event("INFO", {"n": 2}, exclude=frozenset({ann.id})))
    assert [(e["tseq"], e["payload"]["n"]) for e in received(bob)] == [("1", 1), ("2", 2)]
    assert [e["payload"]["n"] for e in received(ann)] == [1]


async def test_a_message_past_the_run_limit_waits_in_order_and_starts_when_a_run_ends() -> None:
    async with anyio.create_task_group() as tg:
        transactions = registry(tg.start_soon, max_runs=1, max_queued=2)
        first, second = transactions.new("ann", None), transactions.new("ann", None)
        ann, bob = member("ann"), member("bob")
        for transaction in (first, second):
            transaction.add_member(ann)
            transaction.add_member(bob)
            transaction.add_agent(transactions.slot(transactions.agents["waiting"], transaction.id, "ann", {}))
        [run] = first.user_message(ann, "one", {}, "m1")
        assert (
            second.user_message(ann, "two", {"message_id": "two"}, "m2") == []
        )  # the limit counts across transactions
        assert second.user_message(ann, "three", {"message_id": "three"}, "m3") == []
        seen_by_bob = len(received(bob))
        with pytest.raises(ProtocolError) as refused:
            second.user_message(ann, "four", {}, "m4")  # past the queue's bound
        nothing_more = len(received(bob)) == seen_by_bob
        [bobs] = second.user_message(bob, "bob's own", {}, "m5")  # another member's runs are not counted against ann
        queued = [e["payload"] for e in received(bob) if e["payload"].get("event") == "run.queued"]
        first.cancel_run(run.id)
        await run.wait()
        assert second.queued == ["three"] and transactions.run_limit.running(ann) == 1  # "two" started, in order
        await anyio.wait_all_tasks_blocked()
        started = [e for e in received(ann) if e["type"] == "RUN_STARTED" and e["transaction"] == second.id]
        assert second.cancel_run("three", "ann")  # a waiting message is cancelled by its message id
        unqueued = received(bob)[-1]["payload"]
        tg.cancel_scope.cancel()
    assert refused.value.code == "RUN_LIMIT_EXCEEDED" and refused.value.related_id == "m4"
    assert nothing_more and [(q["message_id"], q["position"]) for q in queued] == [("two", 1), ("three", 2)]
    assert [e["payload"].get("message_id") for e in started if e["run_id"] != bobs.id] == ["two"]
    assert second.queued == [] and unqueued == {
        "event": "run.unqueued",
        "message_id": "three",
        "reason": "cancelled by ann",
    }


async def test_an_agents_turns_run_one_at_a_time_in_the_order_of_the_messages() -> None:
    """A front-end developer's find: lines typed faster than an LLM agent answers all ran at once and were
    answered out of order, none seeing the answers before it. An agent takes one turn at a time in a
    conversation (``concurrent_turns``): the next message waits, whoever sent it, and starts when it ends."""
    async with anyio.create_task_group() as tg:
        transactions = registry(tg.start_soon)
        transaction = transactions.new("ann", None)
        ann, bob = member("ann"), member("bob")
        transaction.add_member(ann)
        transaction.add_member(bob)
        transaction.add_agent(transactions.slot(transactions.agents["in_turn"], transaction.id, "ann", {}))
        [first] = transaction.user_message(ann, "one", {"message_id": "one"}, "m1")
        assert transaction.user_message(ann, "two", {"message_id": "two"}, "m2") == []
        assert transaction.user_message(bob, "three", {"message_id": "three"}, "m3") == []
        assert transaction.queued == ["two", "three"]
        transaction.cancel_run(first.id)
        await first.wait()
        [second] = transaction.runs.values()  # "two" started as "one" ended; "three" waits for it
        assert second.message_id == "two" and transaction.queued == ["three"]
        transaction.cancel_run(second.id)
        await second.wait()
        [third] = transaction.runs.values()
        tg.cancel_scope.cancel()
    assert third.message_id == "three"
    started = [e["payload"].get("message_id") for e in received(bob) if e["type"] == "RUN_STARTED"]
    assert started == ["one", "two", "three"]


async def test_the_queue_full_behind_a_busy_agent_says_so_and_a_config_of_0_lets_turns_run_at_once() -> None:
    """A reviewer's find: bob, with no run at all, was refused 'at most 4 runs at once per session'."""
    async with anyio.create_task_group() as tg:
        transactions = registry(tg.start_soon, max_queued=1)
        transaction, free = transactions.new("ann", None), transactions.new("ann", None)
        ann, bob = member("ann"), member("bob")
        for each, agent in ((transaction, "in_turn"), (free, "any_number")):
            each.add_member(ann)
            each.add_member(bob)
            each.add_agent(transactions.slot(transactions.agents[agent], each.id, "ann", {}))
        transaction.user_message(ann, "one", {"message_id": "one"}, "m1")
        transaction.user_message(ann, "two", {"message_id": "two"}, "m2")
        with pytest.raises(ProtocolError) as refused:
            transaction.user_message(bob, "three", {"message_id": "three"}, "m3")
        at_once = [free.user_message(bob, f"b{n}", {"message_id": f"b{n}"}, f"b{n}") for n in range(2)]
        tg.cancel_scope.cancel()
    assert refused.value.message == "the agents are answering, and 1 messages are already waiting their turn"
    assert refused.value.detail == {"limit": "session.max_queued_messages"}
    assert [len(runs) for runs in at_once] == [1, 1]


async def test_a_stop_starts_none_of_the_waiting_messages_and_says_they_were_given_up() -> None:
    """A reviewer's find: each run the stop cancelled started the next message waiting its turn, which
    nothing waited for and nothing ended (in a cluster, the next owner ended it NODE_LOST instead of answering it)."""
    async with anyio.create_task_group() as tg:
        transaction, ann = in_turn(tg.start_soon)
        [first] = transaction.user_message(ann, "one", {"message_id": "one"}, "m1")
        assert transaction.user_message(ann, "two", {"message_id": "two"}, "m2") == []
        await Hub._stop_for_restart(SimpleNamespace(tools=None), transaction)  # type: ignore[arg-type]
        left = list(transaction.runs.values())
        tg.cancel_scope.cancel()
    assert left == [] and first.finished
    started = [e["payload"].get("message_id") for e in received(ann) if e["type"] == "RUN_STARTED"]
    unqueued = [e["payload"] for e in received(ann) if e["payload"].get("event") == "run.unqueued"]
    assert started == ["one"] and [u["message_id"] for u in unqueued] == ["two"]
    assert "shutting down" in unqueued[0]["reason"]


async def test_a_waiting_message_may_be_edited_and_its_turn_answers_the_new_text() -> None:
    """A reviewer's find: the edit of a message waiting its turn was refused, and the agent answered the old text."""
    async with anyio.create_task_group() as tg:
        transaction, ann = in_turn(tg.start_soon)
        [first] = transaction.user_message(ann, "one", {"message_id": "one"}, "m1")
        transaction.user_message(ann, "teh typo", {"message_id": "two"}, "m2")
        assert transaction.edit_message("ann", "two", "the fix") and not transaction.edit_message("bob", "two", "x")
        transaction.cancel_run(first.id)
        await first.wait()
        tg.cancel_scope.cancel()
    assert [entry.text for entry in transaction.history if entry.role == "user"] == ["one", "the fix"]


async def test_a_full_transaction_refuses_newcomers_but_lets_members_rejoin() -> None:
    transactions = registry(lambda *a: None, limits=LimitsConfig(members_per_transaction=1))
    transaction = transactions.new("ann", None)
    ann = member("ann")
    transaction.add_member(ann)
    transaction.check_room(ann, "j1")
    with pytest.raises(ProtocolError) as refused:
        transaction.check_room(member("bob"), "j2")
    assert refused.value.code == "RATE_LIMITED" and refused.value.detail == {"limit": "limits.members_per_transaction"}


async def test_a_run_cancelled_from_outside_gives_its_place_back() -> None:
    """The hub's shutdown cancels turns from outside their own scope: they still leave the count."""
    async with anyio.create_task_group() as tg:
        transactions = registry(tg.start_soon, max_runs=1)
        transaction = transactions.new("ann", None)
        ann = member("ann")
        transaction.add_member(ann)
        transaction.add_agent(transactions.slot(transactions.agents["waiting"], transaction.id, "ann", {}))
        [run] = transaction.user_message(ann, "one", {}, "m1")
        running_before = transactions.run_limit.running(ann)
        tg.cancel_scope.cancel()
    await run.wait()
    assert running_before == 1 and transactions.run_limit.running(ann) == 0 and not transaction.runs


async def test_ending_a_transaction_tells_each_waiting_message_it_left_the_queue() -> None:
    """Doors that wait on a queued message (the MCP door, AG-UI) learn it will not run: ``run.unqueued``."""
    async with anyio.create_task_group() as tg:
        transactions = registry(tg.start_soon, max_runs=1)
        transaction = transactions.new("ann", None)
        ann, bob = member("ann"), member("bob")
        transaction.add_member(ann)
        transaction.add_member(bob)
        transaction.add_agent(transactions.slot(transactions.agents["waiting"], transaction.id, "ann", {}))
        transaction.user_message(ann, "one", {}, "m1")
        assert transaction.user_message(ann, "two", {"message_id": "two"}, "m2") == []
        await transaction.end("done")
        tg.cancel_scope.cancel()
    unqueued = [e["payload"] for e in received(bob) if e["payload"].get("event") == "run.unqueued"]
    assert unqueued == [{"event": "run.unqueued", "message_id": "two", "reason": "the transaction ended: done"}]
    assert transaction.queued == []


class YieldingStore(MemoryStore):
    """A store whose reads yield to the event loop, as a database's do (the memory store's never do)."""

    async def transaction(self, transaction_id: str) -> TransactionRecord | None:
        await anyio.lowlevel.checkpoint()
        return await super().transaction(transaction_id)

    async def events(self, transaction_id: str, *, after: int = 0, limit: int = 1000) -> list[Event]:
        await anyio.lowlevel.checkpoint()
        return await super().events(transaction_id, after=after, limit=limit)


async def test_members_joining_at_once_bring_a_stored_transaction_back_as_one() -> None:
    store = YieldingStore()
    now = time.time()
    store.save_transaction(TransactionRecord("t1", "ann", ("waiting",), ("ann",), TransactionState.OPEN, now, now))
    transactions = TransactionRegistry(TransactionsConfig(), load_agents(CONFIG), store, lambda *a: None)
    found: list[object] = []

    async def find() -> None:
        found.append(await transactions.find("t1", Principal("ann")))

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(find)
    assert len(found) == 20 and all(each is transactions.live["t1"] for each in found)


async def test_a_join_from_the_store_also_gets_what_is_logged_while_the_store_is_read() -> None:
    """A member joining from far back reads the store (the tail no longer reaches there); an agent
    streaming meanwhile logs more: those events come too, not lost between history and live stream."""

    class Busy(MemoryStore):
        async def events(self, transaction_id: str, *, after: int = 0, limit: int = 1000) -> list[Event]:
            page = await super().events(transaction_id, after=after, limit=limit)
            if len(logged_meanwhile) < 3:  # the agent publishes while each page is read
                logged_meanwhile.append(transaction.publish(Event("INFO", {"n": "meanwhile"})).tseq or 0)
            return page

    logged_meanwhile: list[int] = []
    transactions = TransactionRegistry(TransactionsConfig(), load_agents(CONFIG), Busy(), lambda *a: None)
    transaction = transactions.new("ann", None)
    for n in range(400):  # more than the tail keeps (backlog.TAIL_EVENTS)
        transaction.publish(Event("INFO", {"n": n}))
    events, omitted = await transaction.catch_up(0)
    assert omitted == 0 and logged_meanwhile
    assert [event.tseq for event in events] == list(range(1, transaction.tseq + 1))


def test_its_record_says_when_something_last_happened_in_it_not_when_it_was_saved() -> None:
    """A tester's find: conversation lists sort by ``updated_at``, which every save set to now (a shutdown
    saved every open one at one instant), and showed ``last_activity``, which counted the INFO of a member's
    session expiring two minutes later: the two disagreed, and neither was when anyone last spoke."""
    from haip_runtime.conversation.transaction import Transaction
    from haip_runtime.conversation.transcript import summary

    transaction = Transaction(owner="ann", thread_id=None, spawn=lambda *args: None, created_at=100.0)
    assert transaction.record().updated_at == 100.0
    said = Event("MESSAGE", {"message_id": "m", "text": "hi", "author": "ann"}, channel="USER", ts="200000", tseq=1)
    left = Event("INFO", {"event": "member.left", "user": "ann"}, ts="320000", tseq=2)
    for event in (said, left):
        transaction.logged(event)
    assert transaction.record().updated_at == 200.0  # not the INFO's time, nor the time of this save
    assert summary([said, left], [said, left])["last_activity"] == 200_000
    brought_back = Transaction(owner="ann", thread_id=None, spawn=lambda *args: None, created_at=100.0, active_at=200.0)
    assert brought_back.record().updated_at == 200.0  # from its stored record, until something happens


async def test_numbering_after_a_crash_skips_the_reserved_numbers_and_joins_still_get_the_history() -> None:
    """A transaction keeps numbers reserved ahead in its record (renewed as it goes); one brought back
    whose record was not put away (the process was killed) numbers on after them, and a join from far
    back still gets the latest ``join_history_events`` events, counted across the gap."""
    store = MemoryStore()
    config = TransactionsConfig(join_history_events=50)
    first = TransactionRegistry(config, load_agents(CONFIG), store, lambda *a: None)
    transaction = first.new("ann", None)
    first.add(transaction)  # its first record reserves its first numbers
    assert (await store.transaction(transaction.id)).reserved_tseq == RESERVED_AHEAD  # type: ignore[union-attr]
    for n in range(40):
        transaction.publish(Event("INFO", {"n": n}))
    for n in range(RESERVED_AHEAD // 2):  # past half the reservation: renewed
        transaction.publish(Event("INFO", {"n": n}))
    renewed = (await store.transaction(transaction.id)).reserved_tseq  # type: ignore[union-attr]
    assert renewed > RESERVED_AHEAD + 1 and renewed - transaction.tseq > RESERVED_AHEAD // 2
    last = transaction.tseq
    # killed: nothing put it away. Another registry (the restarted process) brings it back.
    again = TransactionRegistry(config, load_agents(CONFIG), store, lambda *a: None)
    back = await again.find(transaction.id, Principal("ann"))
    assert isinstance(back, Transaction) and back.tseq == renewed
    back.publish(Event("INFO", {"n": "after"}))
    events, omitted = await back.catch_up(0)
    numbers = [event.tseq for event in events]
    assert len(events) == 50 and numbers[-1] == renewed + 1 and numbers[-2] == last
    assert omitted == last - 49 and events[-1].payload == {"n": "after"}
    # put away cleanly, it gives the reservation back: brought back again, it numbers on from its last
    again.evict(back)
    third = TransactionRegistry(config, load_agents(CONFIG), store, lambda *a: None)
    later = await third.find(transaction.id, Principal("ann"))
    assert isinstance(later, Transaction) and later.tseq == renewed + 1


def test_an_event_json_cannot_hold_takes_no_number() -> None:
    """Refused before it is numbered: the next event takes the next number, no gap in the history."""
    transactions = registry(lambda *a: None)
    transaction = transactions.new("ann", None)
    transaction.publish(Event("INFO", {"n": 1}))
    with pytest.raises(TypeError):
        transaction.publish(Event("INFO", {"n": object()}))
    assert transaction.publish(Event("INFO", {"n": 2})).tseq == 2


async def crashed_and_back(before: int, after: int, most: int = 50) -> Transaction:
    """``before`` events, a 'crash' (the record not put away), brought back, then ``after`` events."""
    store = MemoryStore()
    config = TransactionsConfig(join_history_events=most)
    first = TransactionRegistry(config, load_agents(CONFIG), store, lambda *a: None)
    transaction = first.new("ann", None)
    first.add(transaction)
    for n in range(before):
        transaction.publish(Event("INFO", {"n": n}))
    again = TransactionRegistry(config, load_agents(CONFIG), store, lambda *a: None)
    back = await again.find(transaction.id, Principal("ann"))
    assert isinstance(back, Transaction) and back.tseq == RESERVED_AHEAD  # past the gap
    for n in range(after):
        back.publish(Event("INFO", {"n": f"after {n}"}))
    return back


@pytest.mark.parametrize(("before", "after"), [(40, 1), (40, 0), (3, 10)])
async def test_a_join_across_a_gap_gets_every_event_when_they_fit(before: int, after: int) -> None:
    """A reviewer's find: with fewer events before the gap than room, the slice of them counted from the
    end went negative and kept only the last few (10 of 41)."""
    back = await crashed_and_back(before, after)
    events, omitted = await back.catch_up(0)
    assert (len(events), omitted) == (before + after, 0)
    assert [e.payload.get("n") for e in events if isinstance(e.payload, dict)][:before] == list(range(before))


async def test_a_join_across_a_gap_counts_what_it_leaves_out_in_events() -> None:
    back = await crashed_and_back(40, 20)
    events, omitted = await back.catch_up(0)
    assert len(events) == 50 and omitted == 10 and events[0].payload == {"n": 10}


async def test_the_memory_store_counts_events_across_gaps() -> None:
    """By bisection (a reviewer's find: it scanned the whole log on the event loop), gaps and ends included."""
    store = MemoryStore(max_events=1000)
    for tseq in [*range(1, 11), *range(4107, 4117)]:
        store.append(Event("INFO", {}, transaction="t", tseq=tseq))
    counts = [
        await store.count_events("t", after=after, upto=upto)
        for after, upto in [(0, 10), (0, 4106), (5, 4110), (4116, 9999), (9, 3)]
    ]
    assert counts == [10, 10, 9, 0, 0]


class LaggingStore(MemoryStore):
    """A store other processes may write too (PostgreSQL's ``lag``): the reservation is not acted on there."""

    lag = 0.25


@pytest.mark.parametrize("store", [MemoryStore(), LaggingStore()], ids=["memory", "lagging"])
async def test_what_a_member_sent_is_known_again_once_brought_back(store: MemoryStore) -> None:
    """A client sends again, after a restart, what its lost session had not acknowledged: the conversation
    brought back from the store knows it was sent (``said_before``, ``called_before``), and by whom; a
    call's end goes back to the sender. Reviewers' finds: a message edited meanwhile (the history holds
    the edited text), and a store that lags (PostgreSQL's) were left out."""
    first = TransactionRegistry(TransactionsConfig(), load_agents(CONFIG), store, lambda *a: None)
    transaction = first.new("ann", None)
    first.add(transaction)
    said = {"text": "helo", "author": "ann", "message_id": "m1"}
    transaction.publish(Event("MESSAGE", said, channel="USER"))
    transaction.publish(Event("MESSAGE_UPDATE", {"message_id": "m1", "text": "hello", "author": "ann"}))
    call = {"call_id": "c1", "tool": "demo.add", "server": "demo", "params": {"a": 1}, "caller": "ann"}
    transaction.publish(Event("TOOL_CALL", call))
    transaction.publish(Event("TOOL_DONE", {"call_id": "c1", "status": "OK", "result": {"content": []}}))
    first.evict(transaction)
    again = TransactionRegistry(TransactionsConfig(), load_agents(CONFIG), store, lambda *a: None)
    back = await again.find(transaction.id, Principal("ann"))
    assert isinstance(back, Transaction) and not back.recent()
    done = back.called_before("ann", "c1", "demo.add", {"a": 1})
    assert done is not None and done.type == "TOOL_DONE" and isinstance(done.payload, dict)
    assert done.payload["status"] == "OK"
    assert back.called_before("bob", "c1", "demo.add", {"a": 1}) is None
    assert back.called_before("ann", "c1", "demo.add", {}) is None
    assert back.said_before("ann", "m1", "helo") and not back.said_before("bob", "m1", "helo")  # as sent
    assert [entry.text for entry in back.history if entry.message_id == "m1"] == ["hello"]  # (the history: edited)
