"""One task appends what every transaction this node hosts publishes to its log on the bus (``[cluster]``).

Each ``relay.SharedLog`` queues its events in its outbox and marks itself ready here. The sender goes round
the ready transactions, takes each one's outbox (up to ``APPEND_MOST`` events) as one append, writes
every append of the round together on the bus's pipe (one write, one read of the answers for them
all), and when the answers are in goes round again. So at most one append per transaction is in
flight, and each transaction's events reach the log in the order it published them.

Why one task for the node and not one per transaction: the per-transaction task woke up, let the
event loop go round and awaited its own answer, each on its own. Under 100 echo conversations, one
message in flight each, that cost the node 7 % more CPU per round trip than this (bench/CLUSTER-RESULTS.md).

Per transaction, as before it was one task:

- streamed parts wait ``part_batch_ms`` (from the oldest queued) for more, unless ``part_batch_bytes``
  are queued, something else is, or the transaction is leaving;
- while a turn runs on this node, the sender lets the event loop go round (at most ``GATHER_PASSES``
  times, while the ready transactions keep publishing), so that a message and the turn it starts here
  share an append;
- each append's events are delivered here at its answer (``Feed.appended``), and it is ``solo`` (not
  published while no other node listens) once the feed follows the transaction;
- an append that fails is tried again after a backoff (doubling up to ``MAX_RETRY``), for that
  transaction alone; after the feed reconnected, its floor is read again from the store first.
"""

from __future__ import annotations

import logging
import time
import types
from collections import deque
from collections.abc import Callable, Generator, Iterator
from itertools import islice
from typing import TYPE_CHECKING, Protocol

import anyio

from haip_runtime.exceptions import ClusterError
from haip_runtime.session.signal import Signal

if TYPE_CHECKING:
    from haip_runtime.cluster import Appended, Bus
    from haip_runtime.conversation.transaction import Transaction

logger = logging.getLogger(__name__)

#: The most event-loop passes the sender waits for more of the ready transactions' events before a round.
GATHER_PASSES = 3
#: The longest wait before an append that failed is tried again.
MAX_RETRY = 1.0
#: The first wait before an append that failed is tried again (doubled at each failure).
FIRST_RETRY = 0.05
#: The most events of one transaction in one append; the rest go in the next round. A backlog after an
#: outage (up to the relay's ``MAX_OUTBOX``, 10,000) in one script run held Redis for about 45 ms here,
#: every node's appends and mirror writes waiting behind it; 1,000 take about 4 ms. It also keeps a
#: retried append (run twice when its answer was lost) within the ids each node's relay remembers
#: (``relay.SEEN_IDS``) to drop the repeat.
APPEND_MOST = 1000


#: An event queued for the log: (its entry, a streamed part?, when it was queued, its run).
Queued = tuple[bytes, bool, float, str | None]


class Pending:
    """One transaction's events waiting to be appended, in order, with their bytes and how many are not
    streamed parts kept as the queue changes (the sender asks at every wake-up: no walk of the queue)."""

    __slots__ = ("_queued", "size", "not_parts")

    def __init__(self) -> None:
        self._queued: deque[Queued] = deque()
        #: Bytes of the entries queued.
        self.size = 0
        #: Entries queued that are not streamed parts.
        self.not_parts = 0

    def __len__(self) -> int:
        return len(self._queued)

    def __iter__(self) -> Iterator[Queued]:
        return iter(self._queued)

    def __getitem__(self, index: int) -> Queued:
        return self._queued[index]

    def append(self, queued: Queued) -> None:
        self._queued.append(queued)
        self.size += len(queued[0])
        self.not_parts += not queued[1]

    def popleft(self) -> Queued:
        queued = self._queued.popleft()
        self.size -= len(queued[0])
        self.not_parts -= not queued[1]
        return queued

    def keep(self, wanted: Callable[[Queued], bool]) -> None:
        """Keep only what is ``wanted``, in order."""
        kept = [queued for queued in self._queued if wanted(queued)]
        self.clear()
        for queued in kept:
            self.append(queued)

    def clear(self) -> None:
        self._queued.clear()
        self.size = self.not_parts = 0


class Outbox(Protocol):
    """What the sender needs of a transaction's log on the bus (``relay.SharedLog`` is one)."""

    transaction: Transaction
    #: A read of the store's last tseq under way: left out of the rounds until it calls ``ready``.
    reading_floor: bool

    @property
    def outbox(self) -> Pending:
        """The events waiting to be appended, in order."""

    def due_at(self, linger: float, most: int) -> float:
        """When the outbox (not empty) should go (``time.monotonic``; 0: now)."""

    def payloads(self, batch: list[Queued]) -> list[bytes]:
        """What of ``batch`` to append."""

    def numbered_after(self) -> int:
        """The floor for Redis's numbering."""

    def floor_known(self) -> bool:
        """Whether the floor is sure; if not, it is read again from the store (``reading_floor``)."""

    def append_failed(self) -> None:
        """An append failed: the floor is read again before the next."""

    def sent(self, batch: list[Queued]) -> None:
        """``batch`` is in the log: out of the outbox."""

    def drained(self) -> None:
        """The outbox is empty."""


@types.coroutine
def pass_once() -> Generator[None, None, None]:
    """Let every other ready task run once (``asyncio.sleep(0)`` without anyio's checkpoint bookkeeping)."""
    yield


class Sender:
    """This node's appends: ``ready`` says a transaction has queued events; ``run`` sends them."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._linger = bus.config.part_batch_ms / 1000
        self._most = bus.config.part_batch_bytes
        #: The transactions with events queued (in the order they became ready).
        self._ready: dict[Outbox, None] = {}
        #: Transactions whose last append failed: when to try again, and the wait after the next failure.
        self._retry: dict[Outbox, tuple[float, float]] = {}
        self._wake = Signal()

    def ready(self, shared: Outbox, *, urgent: bool = True) -> None:
        """``shared`` queued events (or is leaving): send them at the next round. Not ``urgent`` (a streamed
        part that does not fill the batch), a transaction ready already is not looked at again now: its
        linger runs from its oldest part, which has not changed."""
        if shared in self._ready:
            if urgent:
                self._wake.set()
            return
        self._ready[shared] = None
        self._wake.set()

    def forget(self, shared: Outbox) -> None:
        """``shared`` stopped following its log here: nothing more of it is sent."""
        self._ready.pop(shared, None)
        self._retry.pop(shared, None)

    async def run(self) -> None:
        """Send rounds until cancelled; a round that breaks is logged, and the next one goes on."""
        while True:
            due, wait = self._due(time.monotonic())
            if not due:
                if wait is None:
                    await self._wake.wait()
                else:
                    with anyio.move_on_after(wait):
                        await self._wake.wait()
                continue
            try:
                await self._gather(due)
                await self._send(due)
            except Exception:
                logger.exception("cluster: sending the transactions' events failed; trying again")
                await anyio.sleep(FIRST_RETRY)

    def _due(self, now: float) -> tuple[list[Outbox], float | None]:
        """The ready transactions to send now, and how long until the next one lingering or backing off
        is (``None``: none is)."""
        due: list[Outbox] = []
        soonest: float | None = None
        for shared in list(self._ready):
            if not shared.outbox:  # sent, or a lost lease took out what was queued
                self._done_with(shared)
                continue
            if shared.reading_floor:  # ready again once read
                continue
            retry = self._retry.get(shared)
            at = retry[0] if retry is not None and retry[0] > now else shared.due_at(self._linger, self._most)
            if at <= now:
                due.append(shared)
            elif soonest is None or at < soonest:
                soonest = at
        return due, None if soonest is None else max(soonest - now, 0.0)

    async def _gather(self, due: list[Outbox]) -> None:
        """Let the event loop go round while the due transactions keep publishing (at most
        ``GATHER_PASSES`` times), so one append carries what a step of work publishes in a few: a
        message and the turn it starts here (RUN_STARTED, the answer, RUN_FINISHED come over the next
        two passes). An append costs more than a pass; this halved them for echo turns. With no turn
        under way here, nothing more is coming: it goes at once."""
        if not any(shared.transaction.runs for shared in due):
            return
        size = sum(len(shared.outbox) for shared in due)
        for _ in range(GATHER_PASSES):
            await pass_once()
            now = sum(len(shared.outbox) for shared in due)
            if now == size:
                return
            size = now

    async def _send(self, due: list[Outbox]) -> None:
        """One append per transaction, all in one write; then each one's outbox, or its retry. What goes
        wrong with one transaction (an exception of its own) costs that one a retry, not the round."""
        calls: list[tuple[str, list[bytes], int]] = []
        batches: list[tuple[Outbox, list[Queued], list[bytes]]] = []
        feed = self._bus.feed
        solo: set[str] = set()
        ended: set[str] = set()
        for shared in due:
            try:
                if not shared.floor_known():  # (read meanwhile, by a task of its own: never number below it)
                    continue
                batch = list(islice(shared.outbox, APPEND_MOST))
                payloads = shared.payloads(batch)
                if not payloads:  # every one of a run this node gave up with its lease
                    shared.sent(batch)
                    continue
                calls.append((shared.transaction.id, payloads, shared.numbered_after()))
                batches.append((shared, batch, payloads))
                if feed.solo(shared.transaction.id):
                    solo.add(shared.transaction.id)
                if shared.transaction.ended:
                    ended.add(shared.transaction.id)
            except Exception as error:
                logger.exception("transaction %s: its events could not be prepared", shared.transaction.id)
                self._failed(shared, ClusterError(str(error)))
        if calls:
            results: list[Appended | ClusterError]
            try:
                results = await self._bus.log.append_batches(calls, solo=solo, ended=ended)
            except ClusterError as error:
                results = [error] * len(calls)
            for (shared, batch, payloads), result in zip(batches, results, strict=True):
                if isinstance(result, ClusterError):
                    self._failed(shared, result)
                    continue
                self._retry.pop(shared, None)
                try:
                    shared.sent(batch)
                except Exception:
                    logger.exception("transaction %s: its sent events could not be taken out", shared.transaction.id)
                # Delivered here now, in turn (the feed drops them if they come back on the channel).
                feed.appended(shared.transaction.id, result.first, payloads)
        for shared in due:
            if not shared.outbox:
                self._done_with(shared)

    def _failed(self, shared: Outbox, error: ClusterError) -> None:
        # Once per failing streak: Redis away, every transaction with something to say retries each second.
        log = logger.debug if shared in self._retry else logger.warning
        log("transaction %s: appending failed (%s); trying again until it works", shared.transaction.id, error)
        shared.append_failed()
        wait = self._retry[shared][1] if shared in self._retry else FIRST_RETRY
        self._retry[shared] = (time.monotonic() + wait, min(wait * 2, MAX_RETRY))

    def _done_with(self, shared: Outbox) -> None:
        """Its outbox is empty: out of the ready ones (a leaving transaction is told it may go)."""
        self._ready.pop(shared, None)
        shared.drained()
