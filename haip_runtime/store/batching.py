"""The write path every durable store shares: a bounded queue and one batching writer task.

``append`` and ``save_*`` never wait: they queue. One writer task per store takes what waits and
writes it as one batch (one database transaction), at most ``flush_interval`` after the first
write, or at once when a reader needs it (``flush``). What it does when writing fails is the
same whatever the database:

- a batch that fails for one of its rows (a value the database will not take) is split in halves
  until the bad write is alone; that write is given up and logged, the rest is written;
- a batch that fails because the store cannot write at all (disk full, database down, connection
  cut) is put back and retried with backoff, doubling from ``RETRY_FIRST`` to ``RETRY_MAX``; health
  turns ``unavailable`` and each transaction with a waiting write is told once per outage
  (``on_storage``), and told again when it is written;
- past ``max_pending`` waiting writes the oldest are dropped (and counted): memory stays bounded
  whatever the outage costs; a backlog is written in batches of at most ``MAX_BATCH`` writes
  or ``MAX_BATCH_CHARS`` characters of events' bodies.

A backend says how to write one batch (``_attempt``) and which failures are the store's rather than
one row's (``_unavailable``, ``_damaged``).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import anyio
from anyio.abc import TaskGroup

from haip_runtime.store.base import SessionRecord, StorageHealth, StorageState, TransactionRecord

logger = logging.getLogger(__name__)

#: Backoff between retries while the store cannot write: doubling from the first to the last (5 s kept
#: a node degraded about 7 s after a PostgreSQL restart had ended: a tester).
RETRY_FIRST = 0.1
RETRY_MAX = 2.0

#: Most writes in one batch, and most characters of events' bodies: a backlog (after an outage, or a
#: burst) is written in batches any database takes within its statement timeout, rather than as one
#: that never fits. Under load a batch waits for the event loop at each of its few round trips, so
#: the batch's size is what lets the writer keep up with a busy process: at 2,000 writes the writer
#: of one process answering echoes on a full core fell further behind every second; with these it
#: keeps up (bench/store.py, part 4).
MAX_BATCH = 50_000
MAX_BATCH_CHARS = 16_000_000

#: One queued write: (kind, arguments). Kinds: "event" (transaction, tseq, body, id), "transaction",
#: "session", "forget", "prune".
Write = tuple[str, tuple[Any, ...]]
#: What writing a batch came to: (writes done, writes given up with why, the failure that stopped it).
Outcome = tuple[int, list[tuple[Write, BaseException]], Exception | None]


class BatchingWriter:
    """The queue, the writer task and the health of a durable store (a base for the backends)."""

    durable = True
    lag = 0.0  # one process a store, unless a backend says otherwise

    def __init__(self, *, name: str, flush_interval: float, max_pending: int) -> None:
        #: How the store is named in logs (a file, or a database URL without its password).
        self.name = name
        self.flush_interval = flush_interval
        self.max_pending = max_pending
        self.health = StorageHealth()
        self.on_storage: Callable[[str, str | None], None] | None = None
        self.on_sequenced: Callable[[str, int, int], None] | None = None
        self._pending: deque[Write] = deque()
        self._queued = 0  # writes ever queued
        self._written = 0  # writes ever written (or dropped, or given up)
        self._wake = anyio.Event()
        self._batch_done = anyio.Event()
        self._urgent = False
        #: Set by ``flush``: a batch gathering now goes at once (a reader waits for it).
        self._hurry = anyio.Event()
        self._retrying = False  # the batch being written was tried before (it may be half there)
        self._writer_stack = AsyncExitStack()
        self._task_group: TaskGroup | None = None
        self._alive = True  # the writer task runs (until the store is closed)
        self._told: set[str] = set()  # transactions told, in this outage, that their history is not kept

    # --- what a backend provides -----------------------------------------------------------------

    async def _attempt(self, batch: list[Write]) -> None:
        """Write ``batch`` as one database transaction, or raise (and write nothing)."""
        raise NotImplementedError

    def _unavailable(self, exc: BaseException) -> bool:
        """Whether ``exc`` is the store's fault (it cannot write now) rather than one row's."""
        raise NotImplementedError

    def _damaged(self, exc: BaseException) -> bool:
        """Whether ``exc`` says the database itself is damaged."""
        return False

    # --- lifetime --------------------------------------------------------------------------------

    async def _start_writer(self) -> None:
        async with AsyncExitStack() as stack:
            self._task_group = await stack.enter_async_context(anyio.create_task_group())
            self._task_group.start_soon(self._write_loop)
            self._writer_stack = stack.pop_all()

    async def _stop_writer(self) -> None:
        """Write what waits (for up to 10 s: a store that cannot write is not waited for), then stop."""
        if self._task_group is None:
            return
        with anyio.move_on_after(10, shield=True):
            await self.flush()
        self._task_group.cancel_scope.cancel()
        await self._writer_stack.aclose()
        if self.pending:
            error = self.health.error
            logger.error("store %s closed with %d writes it could not store (%s)", self.name, self.pending, error)

    # --- writes ----------------------------------------------------------------------------------

    def _queue(self, kind: str, *args: Any) -> None:
        if len(self._pending) >= self.max_pending:
            self._drop_oldest()
        self._pending.append((kind, args))
        self._queued += 1
        self._wake.set()
        if self.health.state is not StorageState.OK:
            self._tell(transaction_of((kind, args)))

    def _drop_oldest(self) -> None:
        dropped = self._pending.popleft()
        self._written += 1
        self.health.writes_dropped += 1
        if self.health.writes_dropped % 10_000 == 1:  # the first, then one line per 10,000
            logger.error(
                "store: %d writes waiting (storage.max_pending_writes); dropped the oldest (a %s write), "
                "%d dropped so far",
                self.max_pending,
                dropped[0],
                self.health.writes_dropped,
            )

    def save_transaction(self, record: TransactionRecord) -> None:
        self._queue("transaction", record)

    def save_session(self, record: SessionRecord) -> None:
        self._queue("session", record)

    def forget_session(self, session_id: str) -> None:
        self._queue("forget", session_id)

    def prune_sessions(self, older_than: float) -> None:
        self._queue("prune", older_than)

    @property
    def pending(self) -> int:
        """Writes queued and not yet written."""
        return self._queued - self._written

    def hurry(self) -> None:
        """Write what is queued now, without waiting out ``flush_interval`` (a reservation of numbers that
        must be stored before they are used: ``Transaction.reserve``)."""
        if self._pending:
            self._urge()

    def _urge(self) -> None:
        """The writer goes at once, without the batching interval's wait."""
        self._urgent = True
        self._wake.set()
        self._hurry.set()

    async def flush(self) -> None:
        """Wait until everything queued so far is written, or the store cannot write (then return:
        what waits is retried by the writer, and a reader sees what is stored)."""
        target = self._queued
        while self._written < target and self._alive and self.health.state is StorageState.OK:
            self._urge()
            await self._batch_done.wait()

    async def _write_loop(self) -> None:
        """Write batches until cancelled. Nothing ends it early: a batch that fails is split around
        its bad writes, or (the store cannot write) put back and retried with backoff."""
        backoff = RETRY_FIRST
        try:
            while True:
                await self._wake.wait()
                if not self._urgent:  # let a batch gather, unless a reader waits for it meanwhile
                    with anyio.move_on_after(self.flush_interval):
                        await self._hurry.wait()
                self._wake, self._hurry = anyio.Event(), anyio.Event()
                self._urgent = False
                batch = self._take()
                if self._pending:  # a backlog: the next batch goes at once, as urgent as this one
                    self._wake.set()
                    self._urgent = True
                try:
                    done, lost, failure = await self._commit(batch)
                except Exception as exc:  # the writer never dies: report, and retry unless it is cancelled
                    done, lost, failure = 0, [], exc
                if failure is None:
                    backoff = RETRY_FIRST
                    self._retrying = False
                    self._recovered()
                else:
                    self._retrying = True
                    self._pending.extendleft(reversed(batch[done:]))
                    while len(self._pending) > self.max_pending:
                        self._drop_oldest()
                    self._failed(failure)
                self._written += done
                self._lost(lost)
                done_event, self._batch_done = self._batch_done, anyio.Event()
                done_event.set()
                if self.health.state is not StorageState.OK:
                    await anyio.sleep(backoff)
                    backoff = min(backoff * 2, RETRY_MAX)
                    self._wake.set()
        finally:
            self._alive = False
            self._batch_done.set()

    def _take(self) -> list[Write]:
        """The next batch: the oldest writes, up to ``MAX_BATCH`` of them or ``MAX_BATCH_CHARS`` of bodies."""
        pending, chars = self._pending, 0
        batch: list[Write] = []
        while pending and len(batch) < MAX_BATCH and chars < MAX_BATCH_CHARS:
            write = pending.popleft()
            if write[0] == "event":  # ("event", (transaction, tseq, body, id))
                chars += len(write[1][2])
            batch.append(write)
        return batch

    async def _commit(self, batch: list[Write]) -> Outcome:
        """Write ``batch``; a chunk that fails for one of its rows is split in halves until the bad
        write is alone, and given up. Returns (writes done, writes lost, and the failure that
        stopped it when the store itself cannot write: the rest waits)."""
        done = 0
        lost: list[tuple[Write, BaseException]] = []
        chunks = [batch]
        while chunks:
            chunk = chunks.pop()
            try:
                await self._attempt(chunk)
            except Exception as exc:
                if self._unavailable(exc):
                    return done, lost, exc
                if len(chunk) > 1:
                    middle = len(chunk) // 2
                    chunks += [chunk[middle:], chunk[:middle]]  # the first half next: order is kept
                    continue
                lost.append((chunk[0], exc))
            done += len(chunk)
        return done, lost, None

    # --- health and telling ----------------------------------------------------------------------

    def _failed(self, exc: BaseException) -> None:
        health = self.health
        health.write_failures += 1
        error = one_line(exc)
        state = StorageState.DAMAGED if self._damaged(exc) else StorageState.UNAVAILABLE
        if health.state is StorageState.OK or health.error != error:
            logger.error("store cannot write %s (%s); %d writes wait and are retried", self.name, error, self.pending)
        health.state, health.error = state, error
        for write in list(self._pending):
            self._tell(transaction_of(write))

    def _recovered(self) -> None:
        if self.health.state is not StorageState.OK:
            logger.warning("store %s writes again (%d failed attempts so far)", self.name, self.health.write_failures)
            self.health.state, self.health.error = StorageState.OK, None
            told, self._told = self._told, set()
            for transaction_id in told:
                self._call_on_storage(transaction_id, None)

    def _lost(self, lost: list[tuple[Write, BaseException]]) -> None:
        for (kind, args), exc in lost:
            self.health.writes_lost += 1
            what = f"event {args[1]} of transaction {args[0]}" if kind == "event" else f"a {kind} write"
            logger.error("store: gave up %s, which cannot be stored (%s: %s)", what, type(exc).__name__, exc)
            self._tell(transaction_of((kind, args)))

    def _tell(self, transaction_id: str | None) -> None:
        """Tell a transaction's members (once per outage) that its history is not being kept."""
        if transaction_id is None or transaction_id in self._told or self.on_storage is None:
            return
        self._told.add(transaction_id)
        self._call_on_storage(transaction_id, self.health.error or "a write could not be stored")

    def _call_on_storage(self, transaction_id: str, error: str | None) -> None:
        if self.on_storage is not None:
            try:
                self.on_storage(transaction_id, error)
            except Exception:
                logger.exception("store: telling transaction %s about storage failed", transaction_id)

    def _sequenced(self, transaction_id: str, published: int, stored: int) -> None:
        if self.on_sequenced is not None:
            try:
                self.on_sequenced(transaction_id, published, stored)
            except Exception:
                logger.exception("store: telling transaction %s its stored tseq failed", transaction_id)


def transaction_of(write: Write) -> str | None:
    kind, args = write
    if kind == "event":
        return str(args[0])
    if kind == "transaction":
        return str(args[0].id)
    return None


def one_line(exc: BaseException) -> str:
    """``Type: message`` on one line (database errors often carry a DETAIL on the next)."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())
