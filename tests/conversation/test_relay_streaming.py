"""A transaction's ``SharedLog`` with streamed parts, its bus stood in for: parts that come back from the
feed together reach the members as one part (each still logged at its tseq, a repeat dropped), and a
streaming agent's back-pressure (``pace``) waits for its own parts to come back, within bounds."""

from __future__ import annotations

import json
import logging
import time
import types
from collections.abc import Coroutine, Generator
from types import SimpleNamespace
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from haip_runtime.agents.api import MessageStream
from haip_runtime.cluster.translog import Appended, LogEntry
from haip_runtime.config.clustering import ClusterConfig
from haip_runtime.conversation import relay as relay_module
from haip_runtime.conversation import sender as sender_module
from haip_runtime.conversation.relay import Relay, SharedLog
from haip_runtime.conversation.sender import Pending
from haip_runtime.conversation.shared import entry, entry_event
from haip_runtime.conversation.transaction import Transaction
from haip_runtime.exceptions import ClusterError
from haip_runtime.protocol import fastjson
from haip_runtime.protocol.envelope import Event
from haip_runtime.protocol.events import EventType

pytestmark = pytest.mark.anyio


class Listener:
    """A member here: what it was delivered."""

    id = "m1"
    user = "alice"
    transactions: set[str] = set()

    def __init__(self) -> None:
        self.got: list[Event] = []

    def deliver(self, event: Event) -> None:
        self.got.append(event)


#: What the sender hands the bus's log in one write: (transaction, payloads, floor) each.
Calls = list[tuple[str, list[bytes], int]]


def shared_log(behind_ms: float = 20) -> tuple[SharedLog, Transaction, Listener, Any]:
    doubted: set[str] = set()
    bus = SimpleNamespace(
        node_id="n1",
        config=ClusterConfig(redis_url="redis://127.0.0.1:1/0", stream_behind_ms=behind_ms),
        feed=SimpleNamespace(
            reconnects=0, connected=True, solo=lambda transaction: False, appended=lambda *a, **k: None
        ),
        health=SimpleNamespace(state="ok"),
        leases=SimpleNamespace(on_confirmed=[], doubted=doubted, doubting=doubted.__contains__),
    )
    transaction = Transaction(owner="alice", thread_id=None, spawn=lambda *args: None)
    shared = SharedLog(Relay(bus, store=None, spawn=lambda *args: None), transaction, owner=True)  # type: ignore[arg-type]
    transaction.shared = shared
    listener = Listener()
    transaction.members[listener.id] = listener  # type: ignore[assignment]
    return shared, transaction, listener, bus


def is_behind(shared: SharedLog) -> bool:
    """Whether a streaming write would wait now (the wait itself is not started)."""
    waiting = shared.pace()
    if waiting is None:
        return False
    assert isinstance(waiting, Coroutine)
    waiting.close()
    return True


async def _returning(events: list[Event]) -> list[Event]:
    return events


def text_of(event: Event) -> str | None:
    return str(event.payload["text"]) if isinstance(event.payload, dict) and "text" in event.payload else None


def part(text: str, message_id: str = "msg1") -> Event:
    return Event(EventType.MESSAGE_PART, {"message_id": message_id, "text": text}, run_id="r1")


def appended(shared: SharedLog, first: int = 1) -> list[LogEntry]:
    """What the sender would append now, as the feed brings it back (numbered from ``first``)."""
    queued = [data for data, _, _, _ in shared.outbox]
    shared.outbox.clear()
    return [LogEntry(shared.transaction.id, first + index, data) for index, data in enumerate(queued)]


async def test_parts_that_come_back_together_reach_the_members_as_one_and_are_logged_each() -> None:
    shared, transaction, listener, _ = shared_log()
    for text in ("Once ", "upon ", "a ", "time"):
        transaction.publish(part(text))
    transaction.publish(Event(EventType.MESSAGE_END, {"message_id": "msg1"}, run_id="r1"))
    transaction.publish(part("other", message_id="msg2"))
    entries = appended(shared)
    shared.deliver(entries)
    shared.deliver(entries)  # an append that landed twice: dropped by event id
    assert [(e.type, text_of(e)) for e in listener.got] == [
        (EventType.MESSAGE_PART, "Once upon a time"),
        (EventType.MESSAGE_END, None),
        (EventType.MESSAGE_PART, "other"),
    ]
    assert [e.tseq for e in listener.got] == [4, 5, 6]  # the merged part: the last one's tseq
    assert [(e.tseq, e.type) for e in transaction.recent()] == [
        (1, EventType.MESSAGE_PART),
        (2, EventType.MESSAGE_PART),
        (3, EventType.MESSAGE_PART),
        (4, EventType.MESSAGE_PART),
        (5, EventType.MESSAGE_END),
        (6, EventType.MESSAGE_PART),
    ]


async def test_a_stream_waits_while_its_own_parts_are_behind_and_goes_on_when_they_come_back() -> None:
    shared, transaction, listener, _ = shared_log(behind_ms=20)
    transaction.publish(part("a "))
    assert shared.pace() is None  # just published: not behind
    await anyio.sleep(0.03)
    waiting = shared.pace()
    assert waiting is not None
    started = time.monotonic()
    async with anyio.create_task_group() as tg:

        async def come_back() -> None:
            await anyio.sleep(0.1)
            shared.deliver(appended(shared))

        tg.start_soon(come_back)
        await waiting
    assert time.monotonic() - started >= 0.09  # it waited for them to come back
    assert [text_of(e) for e in listener.got] == ["a "]
    assert shared.pace() is None


async def test_a_stream_does_not_wait_for_parts_lost_on_the_way_nor_while_redis_does_not_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(relay_module, "PACE_GIVE_UP", 0.2)
    shared, transaction, _, bus = shared_log(behind_ms=20)
    transaction.publish(part("lost "))  # never comes back (a Redis that crashed)
    await anyio.sleep(0.03)
    waiting = shared.pace()
    assert waiting is not None
    started = time.monotonic()
    with anyio.fail_after(5):
        await waiting
    assert time.monotonic() - started >= 0.15  # given up after PACE_GIVE_UP (0.2 s from the part's start)
    assert shared.pace() is None
    transaction.publish(part("held "))
    await anyio.sleep(0.03)  # the part is now behind (no event: time itself is the condition)
    assert is_behind(shared)
    bus.health.state = "unavailable"
    assert shared.pace() is None  # the bus is down: the outbox keeps the parts; nothing to wait for
    bus.health.state = "ok"
    bus.feed.connected = False
    assert shared.pace() is None  # the subscription is reconnecting: nothing comes back meanwhile
    bus.feed.connected = True
    assert is_behind(shared)
    shared.stop()
    assert shared.pace() is None  # the log stopped here: its parts never come back here


async def test_a_streaming_write_always_lets_the_event_loop_go_round() -> None:
    """Whether it waits or not, a write is a checkpoint: an agent streaming from text it already has
    must not hold the event loop (nor be impossible to cancel), Redis down or not."""
    shared, transaction, _, bus = shared_log(behind_ms=20)

    def emit(type: str, payload: dict[str, Any] | str, *, channel: str = "AGENT") -> None:
        transaction.publish(Event(type, payload, channel=channel, run_id="r1"))

    stream = MessageStream(emit, "echo", shared.pace)
    await stream.write("a")
    await anyio.sleep(0.03)  # its part is now behind
    turns = 0

    async def other() -> None:
        nonlocal turns
        while True:
            turns += 1
            await anyio.lowlevel.checkpoint()

    for down in ("health", "feed", "stopped"):
        if down == "health":
            bus.health.state = "unavailable"
        elif down == "feed":
            bus.health.state, bus.feed.connected = "ok", False
        else:
            bus.feed.connected = True
            shared.stop()
        async with anyio.create_task_group() as tg:
            tg.start_soon(other)
            await anyio.lowlevel.checkpoint()
            before = turns
            for _ in range(200):
                await stream.write("x")
            assert turns - before >= 199, down  # the other task ran between every two writes
            tg.cancel_scope.cancel()


async def test_parts_filled_from_the_store_count_as_back() -> None:
    shared, transaction, listener, _ = shared_log(behind_ms=20)
    transaction.publish(part("a "))
    entries = appended(shared)
    assert shared.pace() is None
    stored = [entry_event(fastjson.loads(e.data), transaction.id, e.tseq, None) for e in entries]
    shared.relay.store = SimpleNamespace(events=lambda *args, **kwargs: _returning(stored))
    await anyio.sleep(0.03)
    assert is_behind(shared)
    await shared._fill(1, 1)  # the bus lost it: it comes back through the store
    assert shared.pace() is None and [text_of(e) for e in listener.got] == ["a "]


async def test_no_back_pressure_when_it_is_off() -> None:
    shared, transaction, _, _ = shared_log(behind_ms=0)
    transaction.publish(part("a "))
    await anyio.sleep(0.03)
    assert shared.pace() is None


async def test_a_fill_cancelled_or_failing_lets_the_feed_deliver_again() -> None:
    """A fill from the store that is cancelled (a handshake whose client left) or fails must not leave the
    transaction holding every later delivery from the feed."""
    shared, transaction, listener, _ = shared_log(behind_ms=0)

    async def forever(*args: Any, **kwargs: Any) -> list[Event]:
        await anyio.sleep_forever()
        return []

    shared.relay.store = SimpleNamespace(events=forever)
    with anyio.move_on_after(0.05):
        await shared.filled(5)  # the store never answers: the caller gives up
    transaction.publish(part("after "))
    shared.deliver(appended(shared, first=6))
    assert [text_of(e) for e in listener.got] == ["after "]

    async def broken(*args: Any, **kwargs: Any) -> list[Event]:
        return [part("stored ")]  # no tseq: delivering it fails

    shared.relay.store = SimpleNamespace(events=broken)

    def failing(event: Event) -> None:
        if text_of(event) == "stored ":
            raise RuntimeError("a watcher that fails")

    transaction.watchers.append(failing)
    await shared.filled(10)
    transaction.publish(part("later "))
    shared.deliver(appended(shared, first=11))
    assert [text_of(e) for e in listener.got][-1] == "later "


async def test_filling_up_to_the_stores_newest_waits_for_a_gaps_fill_under_way() -> None:
    """A transaction brought back while the feed's gap is being read from the store: the gap's fill may
    end short of the store's newest row, so ``filled`` waits for it and then reads the rest (it returned
    at once, and the transaction stayed behind the store)."""
    shared, transaction, listener, _ = shared_log(behind_ms=0)
    for text in ("one ", "two ", "three ", "four "):
        transaction.publish(part(text))
    stored = [entry_event(fastjson.loads(e.data), transaction.id, e.tseq, None) for e in appended(shared)]
    release, reading = anyio.Event(), anyio.Event()

    async def events(transaction_id: str, *, after: int, limit: int) -> list[Event]:
        reading.set()
        await release.wait()
        return [e for e in stored if after < (e.tseq or 0) <= after + limit]

    shared.relay.store = SimpleNamespace(events=events)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            shared._filling, shared._fill_ended = [], anyio.Event()  # as ``deliver`` does at a gap
            group.start_soon(shared._fill, 1, 2)
            await reading.wait()
            group.start_soon(shared.filled, 4)
            await anyio.lowlevel.checkpoint()
            release.set()
    assert transaction.tseq == 4 and [text_of(e) for e in listener.got] == ["one ", "two ", "three ", "four "]


def running_r1(transaction: Transaction) -> None:
    """A run of this node's under way in ``transaction`` (what ``_lose`` gives up and cancels)."""
    transaction.runs["r1"] = SimpleNamespace(scope=anyio.CancelScope())  # type: ignore[assignment]


#: What a node that lost the lease appends after what it kept (its run r1 stopped).
GIVEN_UP = b'{"n":"n1","ctl":"given_up","runs":["r1"]}'


async def test_the_sender_survives_a_lost_lease_emptying_its_outbox_while_it_gathers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The lease lost while the sender lets the loop go round takes out every queued event of the runs
    it stopped: nothing is left of them to append, and the sender goes on with what comes next."""
    shared, transaction, _, bus = shared_log()
    sent: list[list[bytes]] = []
    appended_again = anyio.Event()

    async def append_batches(calls: Calls, **options: object) -> list[Appended]:
        for _, payloads, _ in calls:
            sent.append(list(payloads))
            if b'{"after":"the loss"}' in payloads:
                appended_again.set()
        return [Appended(1, True)] * len(calls)

    bus.log = SimpleNamespace(append_batches=append_batches)
    running_r1(transaction)
    lost: list[bool] = []

    @types.coroutine
    def losing_pass() -> Generator[None, None, None]:
        if not lost:
            lost.append(True)
            shared._lose()  # the contend task, while the sender's pass lets it run
        yield

    monkeypatch.setattr(sender_module, "pass_once", losing_pass)
    sender = shared.relay.sender
    shared._queue(b'{"of":"r1"}', False, "r1")
    async with anyio.create_task_group() as tg:
        tg.start_soon(sender.run)
        with anyio.fail_after(5):
            while not lost or shared.outbox or sender._wake._waiter is None:  # until it waits for more again
                await anyio.lowlevel.checkpoint()
            shared._queue(b'{"after":"the loss"}', False, None)
            await appended_again.wait()
        tg.cancel_scope.cancel()
    # the run's event is not appended; the word that the run was given up is, then what came next
    assert [payload for batch in sent for payload in batch] == [GIVEN_UP, b'{"after":"the loss"}']


async def test_a_lingering_stream_whose_parts_a_lost_lease_took_out_stops_lingering() -> None:
    shared, transaction, _, _ = shared_log()
    running_r1(transaction)
    shared._queue(b'{"part":1}', True, "r1")  # a streamed part: it waits for more
    assert shared.due_at(60.0, 1 << 20) > time.monotonic()
    shared._lose()
    assert [data for data, *_ in shared.outbox] == [GIVEN_UP]  # the parts are out; no part left to wait for
    assert shared.due_at(60.0, 1 << 20) == 0.0


async def test_the_sender_appends_for_every_ready_transaction_in_one_write_and_retries_a_refused_one_alone() -> None:
    first, _, _, bus = shared_log()
    second = SharedLog(first.relay, Transaction(owner="bob", thread_id=None, spawn=lambda *args: None), owner=True)
    calls_made: list[list[str]] = []
    refused = {second.transaction.id}  # Redis refuses the second's first append (its script run alone)
    retried = anyio.Event()

    async def append_batches(
        calls: list[tuple[str, list[bytes], int]], **options: object
    ) -> list[Appended | ClusterError]:
        calls_made.append([transaction for transaction, _, _ in calls])
        results: list[Appended | ClusterError] = []
        for transaction, _, _ in calls:
            results.append(ClusterError("refused") if transaction in refused else Appended(1, True))
            refused.discard(transaction)
        if len(calls_made) == 2:
            retried.set()
        return results

    async def no_record(transaction: str) -> None:
        return None  # the store knows nothing past what was delivered: a retry numbers after that

    bus.log = SimpleNamespace(append_batches=append_batches)
    first.relay.store = SimpleNamespace(transaction=no_record)
    first._queue(b'{"n":1}', False, None)
    second._queue(b'{"n":2}', False, None)
    async with anyio.create_task_group() as tg:
        first.relay.spawn = tg.start_soon  # (the floor's read again after a failure, in a task of its own)
        tg.start_soon(first.relay.sender.run)
        with anyio.fail_after(5):
            await retried.wait()
        tg.cancel_scope.cancel()
    assert not first.outbox and not second.outbox
    assert calls_made == [[first.transaction.id, second.transaction.id], [second.transaction.id]]


async def test_a_failing_append_is_a_warning_once_until_it_works_again(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sender_module, "FIRST_RETRY", 0.001)
    monkeypatch.setattr(sender_module, "MAX_RETRY", 0.001)
    shared, _, _, bus = shared_log()
    outages = [3, 2]  # Redis refuses three appends, takes one; later refuses two, takes one
    appended = [anyio.Event(), anyio.Event()]
    tries: list[bool] = []

    async def append_batches(
        calls: list[tuple[str, list[bytes], int]], **options: object
    ) -> list[Appended | ClusterError]:
        outage = len([event for event in appended if event.is_set()])
        refused = outages[outage] > 0
        tries.append(refused)
        if refused:
            outages[outage] -= 1
            return [ClusterError("redis: Connection refused")]
        appended[outage].set()
        return [Appended(1, True)]

    async def no_record(transaction: str) -> None:
        return None

    bus.log = SimpleNamespace(append_batches=append_batches)
    shared.relay.store = SimpleNamespace(transaction=no_record)
    async with anyio.create_task_group() as tg:
        shared.relay.spawn = tg.start_soon  # (the floor's read again after a failure)
        tg.start_soon(shared.relay.sender.run)
        with anyio.fail_after(5):
            for n, event in enumerate(appended):
                shared._queue(b'{"n":%d}' % n, False, None)
                await event.wait()
        tg.cancel_scope.cancel()
    warned = [r for r in caplog.records if "appending failed" in r.getMessage() and r.levelno == logging.WARNING]
    assert tries == [True, True, True, False, True, True, False]
    assert len(warned) == 2  # one per outage, not one per retry


async def test_a_transaction_reading_its_floor_from_the_store_holds_up_no_other() -> None:
    """After Redis was lost each transaction reads its last tseq from the store before it appends; a slow
    read (a store under load, or away) must not hold up the other transactions' appends (a reviewer's
    finding: the one sender read them one after another)."""
    first, _, _, bus = shared_log()
    second = SharedLog(first.relay, Transaction(owner="bob", thread_id=None, spawn=lambda *args: None), owner=True)
    store_answers = anyio.Event()
    second_appended = anyio.Event()
    appended: list[str] = []

    async def slow_record(transaction: str) -> None:
        await store_answers.wait()

    async def append_batches(calls: Calls, **options: object) -> list[Appended]:
        appended.extend(transaction for transaction, _, _ in calls)
        if second.transaction.id in appended:
            second_appended.set()
        return [Appended(1, True)] * len(calls)

    bus.log = SimpleNamespace(append_batches=append_batches)
    first.relay.store = SimpleNamespace(transaction=slow_record)
    first.append_failed()  # its floor must be read again first (as after a feed reconnect)
    first._queue(b'{"n":1}', False, None)
    second._queue(b'{"n":2}', False, None)
    async with anyio.create_task_group() as tg:
        first.relay.spawn = tg.start_soon
        tg.start_soon(first.relay.sender.run)
        with anyio.fail_after(5):
            await second_appended.wait()  # while the first one's read has not answered
            assert appended == [second.transaction.id] and first.reading_floor
            store_answers.set()
            while first.outbox:
                await anyio.lowlevel.checkpoint()
        tg.cancel_scope.cancel()
    assert appended == [second.transaction.id, first.transaction.id]


def message_from(node: str, text: str, *, answered: bool) -> bytes:
    """A member's message as another node appends it (``answered``: that node ran the turns as it sent it)."""
    event = Event(EventType.MESSAGE, {"message_id": f"m-{text}", "text": text}, channel="USER")
    member = {"id": "s-bob", "user": "bob", "roles": ["user"], "kind": "session"}
    return entry(event, node, {"member": member, "traceparent": None, "answered": answered})


async def test_an_owner_in_doubt_of_its_lease_answers_a_message_only_once_it_is_renewed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Redis was lost and this node has not renewed its lease since: another node may hold it and answer
    too (a tester saw both answer after a Redis restart). The message waits; renewed, it is answered."""
    shared, transaction, _, bus = shared_log()
    shared.relay.logs.add(shared)  # (as attach does)
    answered: list[str] = []
    monkeypatch.setattr(shared, "_answer", lambda turn, payload: answered.append(payload["text"]))
    bus.leases.doubted.add(shared.lease_name)
    shared.deliver([LogEntry(transaction.id, 1, message_from("n2", "in doubt", answered=False))])
    assert answered == [] and "m-in doubt" in shared.unanswered
    bus.leases.doubted.discard(shared.lease_name)
    for confirmed in bus.leases.on_confirmed:
        confirmed(shared.lease_name)
    shared.deliver([LogEntry(transaction.id, 2, message_from("n2", "after", answered=False))])
    assert answered == ["in doubt", "after"] and not shared.unanswered


async def test_a_message_another_node_answered_as_it_sent_it_waits_for_its_run_or_its_word(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Reaching the owner across a change of owner: not answered again. Its run coming takes it out;
    the sending node saying it gave its runs up has it answered here."""
    shared, transaction, _, _ = shared_log()
    answered: list[str] = []
    monkeypatch.setattr(shared, "_answer", lambda turn, payload: answered.append(payload["text"]))
    shared.deliver([LogEntry(transaction.id, 1, message_from("n2", "ran there", answered=True))])
    started = Event(EventType.RUN_STARTED, {"message_id": "m-ran there", "agent": "echo"}, run_id="r9")
    shared.deliver([LogEntry(transaction.id, 2, entry(started, "n2"))])
    shared.deliver([LogEntry(transaction.id, 3, message_from("n2", "given up", answered=True))])
    assert answered == [] and list(shared.unanswered) == ["m-given up"]
    shared.deliver([LogEntry(transaction.id, 4, b'{"n":"n2","ctl":"given_up","runs":[]}')])
    assert answered == ["given up"] and not shared.unanswered


async def test_the_owners_own_message_whose_run_it_gave_up_is_answered_when_it_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A tester's find: a member on the owner's node spoke while Redis restarted. The owner answered as it
    sent, lost the lease when Redis came back without it (its run stopped, never logged), took the lease
    back, and only then was the message appended: delivered to an owner, from itself, "answered" so
    skipped, and never answered. Now it waits for its run or its node's word like any other."""
    shared, transaction, _, _ = shared_log()
    answered: list[str] = []
    monkeypatch.setattr(shared, "_answer", lambda turn, payload: answered.append(payload["text"]))
    assert shared.owner and shared.node == "n1"
    shared.deliver([LogEntry(transaction.id, 1, message_from("n1", "ran here", answered=True))])
    started = Event(EventType.RUN_STARTED, {"message_id": "m-ran here", "agent": "echo"}, run_id="r1")
    shared.deliver([LogEntry(transaction.id, 2, entry(started, "n1"))])
    assert answered == [] and not shared.unanswered  # its run came: nothing to keep
    shared.deliver([LogEntry(transaction.id, 3, message_from("n1", "cut off", answered=True))])
    assert answered == [] and list(shared.unanswered) == ["m-cut off"]
    shared.deliver([LogEntry(transaction.id, 4, b'{"n":"n1","ctl":"given_up","runs":["r2"]}')])
    assert answered == ["cut off"] and not shared.unanswered


async def test_a_message_from_elsewhere_the_owner_answered_is_answered_again_when_its_run_was_given_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An operator's find: a member on another node spoke as Redis stopped. The owner answered (its run
    started here), lost the lease before the run reached the log, took the lease back, and had kept the
    message nowhere: no turn, no error. Now the owner keeps what it answered until the log shows its run,
    gives it back when the lease is lost, and names it in its word to the next owner."""
    shared, transaction, _, _ = shared_log()
    answered: list[str] = []
    monkeypatch.setattr(transaction, "answer_elsewhere", lambda member, text, *rest: answered.append(text))
    shared.deliver([LogEntry(transaction.id, 1, message_from("n2", "ran", answered=False))])
    started = Event(EventType.RUN_STARTED, {"message_id": "m-ran", "agent": "echo"}, run_id="r1")
    shared.deliver([LogEntry(transaction.id, 2, entry(started, "n1"))])
    shared.deliver([LogEntry(transaction.id, 3, message_from("n2", "cut off", answered=False))])
    assert answered == ["ran", "cut off"] and list(shared.answered_here) == ["m-cut off"]
    shared._lose()
    assert list(shared.unanswered) == ["m-cut off"] and not shared.answered_here
    word = json.loads(shared.outbox[len(shared.outbox) - 1][0])
    assert (word["ctl"], word["messages"]) == ("given_up", ["m-cut off"])
    shared.owner = True  # the lease again (here, or on the node that reads the word: the same answer)
    shared.deliver([LogEntry(transaction.id, 4, json.dumps(word).encode())])
    assert answered == ["ran", "cut off", "cut off"] and not shared.unanswered


async def test_what_is_published_after_the_transaction_left_the_node_is_not_sent() -> None:
    """Its log is no longer followed here and its lease was given back: a late event (a run's last word,
    cancelled) is not appended after the node's "released" (a reviewer's finding)."""
    shared, _, _, bus = shared_log()

    async def unhost(transaction: str) -> None:
        pass

    async def host(transaction: str, deliver: object, *, after: int) -> None:
        pass

    bus.feed.host, bus.feed.unhost = host, unhost
    shared.stop()
    async with anyio.create_task_group() as tg:
        tg.start_soon(shared.run)  # (nothing queued: it ends at once)
    assert shared.done.is_set()
    shared._queue(b'{"late":1}', False, None)
    assert not shared.outbox and shared not in shared.relay.sender._ready


def test_the_pending_queue_keeps_its_counts_through_every_change() -> None:
    pending = Pending()
    for data, part in ((b"ab", True), (b"cde", False), (b"f", True)):
        pending.append((data, part, 0.0, None))
    assert (len(pending), pending.size, pending.not_parts) == (3, 6, 1)
    assert pending.popleft()[0] == b"ab" and (pending.size, pending.not_parts) == (4, 1)
    pending.keep(lambda queued: queued[1])  # the streamed parts only
    assert [data for data, *_ in pending] == [b"f"] and (pending.size, pending.not_parts) == (1, 0)
    pending.clear()
    assert not pending and (pending.size, pending.not_parts) == (0, 0)


async def test_a_node_losing_the_lease_lets_its_waiting_messages_go_to_the_next_owner() -> None:
    """A reviewer's find: a message waiting in the queue (its member at the run limit) stayed there when
    the node lost the lease; taking the lease back, the node answered it again from the log, and when
    the member's run ended, the queue's copy ran as well: two runs for one message."""
    from haip_runtime.conversation.transaction import _Queued

    shared, transaction, listener, _ = shared_log()
    transaction._queue.append(_Queued(listener, "wait for me", {"message_id": "m-q"}, None))  # type: ignore[arg-type]
    assert transaction.queued == ["m-q"]
    shared._lose()
    assert transaction.queued == [] and not shared.owner


async def test_a_backlog_goes_in_appends_of_at_most_append_most_events_in_order() -> None:
    """After an outage a transaction may have thousands queued: each append takes at most
    ``APPEND_MOST`` of them (one script run of 10,000 held Redis for every node), the rest follow."""
    shared, _, _, bus = shared_log()
    appends: list[list[bytes]] = []
    done = anyio.Event()
    total = sender_module.APPEND_MOST * 2 + 500

    async def append_batches(calls: Calls, **options: object) -> list[Appended | ClusterError]:
        first = sum(len(payloads) for payloads in appends) + 1
        appends.extend(payloads for _, payloads, _ in calls)
        if sum(len(payloads) for payloads in appends) == total:
            done.set()
        return [Appended(first, True) for _ in calls]

    bus.log = SimpleNamespace(append_batches=append_batches)
    for index in range(total):
        shared._queue(b'{"i":%d}' % index, False, None)
    async with anyio.create_task_group() as tg:
        tg.start_soon(shared.relay.sender.run)
        with anyio.fail_after(5):
            await done.wait()
        tg.cancel_scope.cancel()
    assert [len(payloads) for payloads in appends] == [1000, 1000, 500]
    assert [payload for payloads in appends for payload in payloads] == [b'{"i":%d}' % i for i in range(total)]
    assert not shared.outbox


async def test_a_takeover_that_fails_still_runs_the_turns_here(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A failure escaping the takeover ended the transaction's following of the log on this node, and
    whatever it published after was dropped (a reviewer). A history that cannot be rebuilt now costs the
    history alone: the waiting message is answered; anything else failing still leaves this node the owner."""
    from haip_runtime.conversation import succession

    def unreadable(events: object) -> list[object]:
        raise ValueError("an event not as this version writes them")

    async def nothing_stored(*args: object, **options: object) -> list[Event]:
        return []

    async def flushed() -> None:
        return None

    async def last_tseq(transaction_id: str) -> int:
        return 1

    shared, transaction, _, bus = shared_log()
    bus.log = SimpleNamespace(last_tseq=last_tseq)
    shared.store = SimpleNamespace(flush=flushed, events=nothing_stored)
    answered: list[str] = []
    monkeypatch.setattr(shared, "_answer", lambda turn, payload: answered.append(payload["text"]))
    monkeypatch.setattr(succession, "history_from_events", unreadable)
    shared.owner = False
    shared.deliver([LogEntry(transaction.id, 1, message_from("n2", "still here?", answered=False))])
    assert list(shared.unanswered) == ["m-still here?"]
    with anyio.fail_after(5):
        await shared._taking_over()
    assert shared.owner and answered == ["still here?"] and transaction.history is not None
    assert "could not be rebuilt; agents start afresh" in caplog.text

    def broken(run_id: str) -> None:
        raise RuntimeError("a bug")

    shared.owner = False
    shared.open_runs["r-lost"] = "echo"
    monkeypatch.setattr(shared, "_node_lost", broken)
    shared.deliver([LogEntry(transaction.id, 2, message_from("n2", "and now?", answered=False))])
    with anyio.fail_after(5):
        await shared._taking_over()  # (did raise, and ended ``run``)
    assert shared.owner and "ending run r-lost NODE_LOST failed" in caplog.text
    assert answered == ["still here?", "and now?"]  # the steps after the one that failed are still done

    def failing(turn: object, payload: object) -> None:
        raise RuntimeError("another bug")

    shared.owner = False  # one waiting message whose answer fails costs itself: the next is answered
    shared.open_runs.clear()
    answer_first_fails: list[str] = []

    def answering(turn: object, payload: dict[str, Any]) -> None:
        if not answer_first_fails:
            answer_first_fails.append("failed")
            raise RuntimeError("a bug")
        answered.append(payload["text"])

    monkeypatch.setattr(shared, "_answer", answering)
    for tseq, text in ((3, "first"), (4, "second")):
        shared.deliver([LogEntry(transaction.id, tseq, message_from("n2", text, answered=False))])
    with anyio.fail_after(5):
        await shared._taking_over()
    assert answered[-1] == "second" and "answering a waiting message failed" in caplog.text

    shared.owner = False
    monkeypatch.setattr(shared, "_answer", failing)
    monkeypatch.setattr(shared, "_take_over", lambda: failing(None, None))  # what escapes it, whatever it is
    with anyio.fail_after(5):
        await shared._taking_over()
    assert shared.owner and "taking its turns over failed" in caplog.text


async def test_a_node_lacking_an_agent_no_live_node_runs_takes_the_turns_at_once() -> None:
    """An agent retired from every node: its conversations are not held a lease's time before their
    first turn (a reviewer); one that a live node runs is deferred to that node while the lease is free."""
    shared, transaction, _, bus = shared_log()
    transaction.absent_agents.append("retired")
    asked: list[tuple[list[str], str]] = []
    able = {"now": False}

    async def can(agents: list[str], node: str = "") -> bool:
        asked.append((list(agents), node))
        return able["now"]

    looked: list[str] = []

    async def nobody(name: str) -> None:
        looked.append(name)
        return None

    bus.nodes = SimpleNamespace(able=can)
    bus.leases.holder = nobody
    shared.handover = 0.3
    with anyio.fail_after(5):
        await shared._defer()  # nobody runs it: at once, the lease not even looked at
        assert asked == [(["retired"], "")] and looked == []
        able["now"] = True  # a live node runs it: the lease stays free a handover for it first
        await shared._defer()
    assert len(looked) >= 2  # (free at the first look; free still a handover later)


async def test_a_node_lacking_an_agent_hands_the_turns_over_only_with_nothing_of_a_run_here() -> None:
    """A reviewer's probes: the end of a run still to be appended (a hand-over then had the new owner end
    it NODE_LOST), or a run started while the hand-over asked Redis, was cut."""
    shared, transaction, _, bus = shared_log()
    transaction.absent_agents.append("operator")
    looks = anyio.Event()
    starts_a_run = {"now": False}

    async def able(agents: list[str], node: str = "") -> bool:
        if node and starts_a_run["now"]:
            transaction.runs["r2"] = SimpleNamespace(scope=anyio.CancelScope())  # type: ignore[assignment]
        return True

    async def wanted(name: str) -> str:
        looks.set()
        return "full-node"

    bus.nodes = SimpleNamespace(able=able)
    bus.leases.wanted = wanted
    ended = Event(EventType.RUN_FINISHED, {"status": "OK"}, run_id="r1")
    shared.send(ended)  # a run that ended here, its end not appended yet
    for blocker in ("outbox", "a run started meanwhile"):
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(shared._hand_over_when_wanted, scope)
                with anyio.fail_after(5):
                    for _ in range(2):  # two looks of the hand-over: the turns stay
                        await looks.wait()
                        looks = anyio.Event()
                tg.cancel_scope.cancel()
        assert shared.owner and not shared._handing, blocker
        shared.outbox.clear()  # appended: only the run started meanwhile holds it now
        starts_a_run["now"] = True
    transaction.runs.clear()
    starts_a_run["now"] = False
    with anyio.fail_after(5), anyio.CancelScope() as scope:
        await shared._hand_over_when_wanted(scope)  # nothing of a run here: given
    assert shared._handing and not shared.owner and scope.cancel_called
