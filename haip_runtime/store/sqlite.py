"""The SQLite store: transaction logs and metadata in one file, written by one batching writer.

Writes are queued in memory and committed by a single writer task, in one transaction per batch,
in a worker thread (the event loop never waits on the disk). A batch is written at most
``flush_interval`` after its first write, or at once when a reader needs it (reads wait for every
write queued before them, so a reader always sees its own writes). What a crash can lose: the
writes of the last ``flush_interval`` (50 ms by default), never part of a batch (a batch is one
SQLite transaction; the file is in WAL mode with ``synchronous=NORMAL``, so an OS crash may also lose
the last commits, but never corrupts the file).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections import deque
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path
from typing import IO, Any, Self, TypeVar

import anyio
import anyio.to_thread
from anyio.abc import TaskGroup

from haip_runtime.exceptions import ConfigError, StorageError
from haip_runtime.protocol.envelope import Event
from haip_runtime.store.base import (
    Cursor,
    SessionRecord,
    StorageHealth,
    StorageState,
    TransactionRecord,
    TransactionState,
    event_from_json,
    event_to_json,
)
from haip_runtime.store.guard import INTEGRITY_CHECK_SECONDS, check_integrity, hold_lock

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Backoff between retries while the store cannot write: doubling from the first to the last.
RETRY_FIRST = 0.1
RETRY_MAX = 5.0

SCHEMA_VERSION = "1"
_SCHEMA = """
PRAGMA journal_mode=WAL;
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS transactions(
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, agents TEXT NOT NULL, state TEXT NOT NULL, thread_id TEXT,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, last_tseq INTEGER NOT NULL, end_reason TEXT);
CREATE INDEX IF NOT EXISTS transactions_by_owner ON transactions(owner, state);
CREATE TABLE IF NOT EXISTS members(user TEXT NOT NULL, tx TEXT NOT NULL, PRIMARY KEY(user, tx)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events(
    tx TEXT NOT NULL, tseq INTEGER NOT NULL, body TEXT NOT NULL, PRIMARY KEY(tx, tseq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sessions(
    id TEXT PRIMARY KEY, user TEXT NOT NULL, epoch TEXT NOT NULL, transactions TEXT NOT NULL, updated_at REAL NOT NULL);
"""

# One queued write: (kind, arguments). Kinds: "event", "transaction", "session", "forget", "prune".
_Write = tuple[str, tuple[Any, ...]]


class SqliteStore:
    durable = True

    def __init__(self, path: Path, *, flush_interval: float = 0.05, max_pending: int = 100_000) -> None:
        self.path = path
        self.flush_interval = flush_interval
        self.max_pending = max_pending
        self._pending: deque[_Write] = deque()
        self._queued = 0  # writes ever queued
        self._written = 0  # writes ever committed (or dropped)
        self._wake = anyio.Event()
        self._batch_done = anyio.Event()
        self._urgent = False
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._read_lock = threading.Lock()
        self._stack = AsyncExitStack()
        self._task_group: TaskGroup | None = None
        self._lock: IO[str] | None = None
        self._alive = True  # the writer task runs (until the store is closed)
        self._told: set[str] = set()  # transactions told, in this outage, that their history is not kept
        self.health = StorageHealth()
        self.on_storage: Callable[[str, str | None], None] | None = None

    # --- lifetime --------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._lock = hold_lock(self.path)
        try:
            self._writer, self._reader = await anyio.to_thread.run_sync(self._open)
        except (sqlite3.Error, OSError) as exc:
            self._lock.close()
            raise ConfigError(f"storage.path: cannot open SQLite database {str(self.path)!r}: {exc}") from exc
        except BaseException:
            self._lock.close()
            raise
        async with AsyncExitStack() as stack:
            self._task_group = await stack.enter_async_context(anyio.create_task_group())
            self._task_group.start_soon(self._write_loop)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task_group is not None
        with anyio.move_on_after(10, shield=True):
            await self.flush()
        self._task_group.cancel_scope.cancel()
        await self._stack.aclose()
        if self.pending:
            error = self.health.error
            logger.error("store %s closed with %d writes it could not store (%s)", self.path, self.pending, error)
        for connection in (self._writer, self._reader):
            if connection is not None:
                connection.close()
        if self._lock is not None:
            self._lock.close()  # another process may open the file now

    def _open(self) -> tuple[sqlite3.Connection, sqlite3.Connection]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        writer = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        writer.executescript(_SCHEMA)
        writer.execute("PRAGMA synchronous=NORMAL")
        check_integrity(writer, self.path, INTEGRITY_CHECK_SECONDS)
        row = writer.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            writer.execute("INSERT INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
        elif row[0] != SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"schema version {row[0]}, this runtime reads {SCHEMA_VERSION}")
        reader = sqlite3.connect(self.path, check_same_thread=False)
        return writer, reader

    # --- writes ----------------------------------------------------------------------------------

    def _queue(self, kind: str, *args: Any) -> None:
        if len(self._pending) >= self.max_pending:
            self._drop_oldest()
        self._pending.append((kind, args))
        self._queued += 1
        self._wake.set()
        if self.health.state is not StorageState.OK:
            self._tell(_transaction_of((kind, args)))

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

    def append(self, event: Event) -> None:
        assert event.transaction is not None and event.tseq is not None
        self._queue("event", event.transaction, event.tseq, event_to_json(event))

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
        """Writes queued and not yet committed."""
        return self._queued - self._written

    async def flush(self) -> None:
        """Wait until everything queued so far is written, or the store cannot write (then return:
        what waits is retried by the writer, and a reader sees what is stored)."""
        target = self._queued
        while self._written < target and self._alive and self.health.state is StorageState.OK:
            self._urgent = True
            self._wake.set()
            await self._batch_done.wait()

    async def _write_loop(self) -> None:
        """Commit batches until cancelled. Nothing ends it early: a batch that fails is split around
        its bad writes, or (the store cannot write) put back and retried with backoff."""
        backoff = RETRY_FIRST
        try:
            while True:
                await self._wake.wait()
                if not self._urgent:
                    await anyio.sleep(self.flush_interval)  # let a batch gather
                self._wake = anyio.Event()
                self._urgent = False
                batch = list(self._pending)
                self._pending.clear()
                try:
                    done, lost, failure = await anyio.to_thread.run_sync(self._commit, batch)
                except Exception as exc:  # the writer never dies: report, and retry unless it is cancelled
                    done, lost, failure = 0, [], exc
                if failure is None:
                    backoff = RETRY_FIRST
                    self._recovered()
                else:
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

    def _commit(self, batch: list[_Write]) -> tuple[int, list[tuple[_Write, BaseException]], Exception | None]:
        """Write ``batch`` (in a worker thread); a chunk that fails for one of its rows is split in
        halves until the bad write is alone, and given up. Returns (writes done, writes lost, and
        the failure that stopped it when the store itself cannot write: the rest waits)."""
        done = 0
        lost: list[tuple[_Write, BaseException]] = []
        chunks = [batch]
        while chunks:
            chunk = chunks.pop()
            try:
                self._write_batch(chunk)
            except Exception as exc:
                if _unavailable(exc):
                    return done, lost, exc
                if len(chunk) > 1:
                    middle = len(chunk) // 2
                    chunks += [chunk[middle:], chunk[:middle]]  # the first half next: order is kept
                    continue
                lost.append((chunk[0], exc))
            done += len(chunk)
        return done, lost, None

    def _failed(self, exc: BaseException) -> None:
        health = self.health
        health.write_failures += 1
        error = f"{type(exc).__name__}: {exc}"
        state = StorageState.DAMAGED if _damaged(exc) else StorageState.UNAVAILABLE
        if health.state is StorageState.OK or health.error != error:
            logger.error("store cannot write %s (%s); %d writes wait and are retried", self.path, error, self.pending)
        health.state, health.error = state, error
        for write in list(self._pending):
            self._tell(_transaction_of(write))

    def _recovered(self) -> None:
        if self.health.state is not StorageState.OK:
            logger.warning("store %s writes again (%d failed attempts so far)", self.path, self.health.write_failures)
            self.health.state, self.health.error = StorageState.OK, None
            told, self._told = self._told, set()
            for transaction_id in told:
                self._call_on_storage(transaction_id, None)

    def _lost(self, lost: list[tuple[_Write, BaseException]]) -> None:
        for (kind, args), exc in lost:
            self.health.writes_lost += 1
            what = f"event {args[1]} of transaction {args[0]}" if kind == "event" else f"a {kind} write"
            logger.error("store: gave up %s, which cannot be stored (%s: %s)", what, type(exc).__name__, exc)
            self._tell(_transaction_of((kind, args)))

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

    def _write_batch(self, batch: list[_Write]) -> None:
        """One SQLite transaction for the whole batch; a transaction saved several times is written once."""
        assert self._writer is not None
        db = self._writer
        events: list[tuple[Any, ...]] = []
        transactions: dict[str, TransactionRecord] = {}
        for kind, args in batch:
            if kind == "event":
                events.append(args)
            elif kind == "transaction":
                record: TransactionRecord = args[0]
                known = transactions.get(record.id)
                transactions[record.id] = record if known is None else _merged(known, record)
        db.execute("BEGIN")
        try:
            db.executemany("INSERT OR REPLACE INTO events VALUES (?, ?, ?)", events)
            db.executemany(
                "INSERT OR REPLACE INTO transactions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [_transaction_row(record) for record in transactions.values()],
            )
            db.executemany(
                "INSERT OR IGNORE INTO members VALUES (?, ?)",
                [(user, record.id) for record in transactions.values() for user in record.members],
            )
            for kind, args in batch:  # few, and their order matters (a save, then a forget)
                if kind == "session":
                    session: SessionRecord = args[0]
                    db.execute(
                        "INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?, ?)",
                        (session.id, session.user, session.epoch, json.dumps(session.transactions), session.updated_at),
                    )
                elif kind == "forget":
                    db.execute("DELETE FROM sessions WHERE id = ?", args)
                elif kind == "prune":
                    db.execute("DELETE FROM sessions WHERE updated_at < ?", args)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # SQLite rolls back by itself after some failures (SQLITE_FULL)
                db.execute("ROLLBACK")
            raise

    # --- reads -----------------------------------------------------------------------------------

    async def _read(self, func: Callable[[sqlite3.Connection], T]) -> T:
        await self.flush()

        def run() -> T:
            assert self._reader is not None
            with self._read_lock:
                return func(self._reader)

        try:
            return await anyio.to_thread.run_sync(run)
        except (sqlite3.Error, ValueError) as exc:  # ValueError: a stored body that no longer parses
            if _damaged(exc) or isinstance(exc, ValueError):
                self.health.state, self.health.error = StorageState.DAMAGED, f"{type(exc).__name__}: {exc}"
            logger.error("store: a read of %s failed (%s: %s)", self.path, type(exc).__name__, exc)
            raise StorageError(f"the store could not read this ({exc}); see /health") from exc

    async def transaction(self, transaction_id: str) -> TransactionRecord | None:
        def query(db: sqlite3.Connection) -> TransactionRecord | None:
            row = db.execute("SELECT * FROM transactions WHERE id = ?", (transaction_id,)).fetchone()
            return None if row is None else _transaction(db, row)

        return await self._read(query)

    async def transactions_of(self, user: str, *, limit: int, before: Cursor | None = None) -> list[TransactionRecord]:
        def query(db: sqlite3.Connection) -> list[TransactionRecord]:
            sql = "SELECT t.* FROM members m JOIN transactions t ON t.id = m.tx WHERE m.user = ?"
            params: list[Any] = [user]
            if before is not None:
                sql += " AND (t.updated_at < ? OR (t.updated_at = ? AND t.id < ?))"
                params += [before[0], before[0], before[1]]
            sql += " ORDER BY t.updated_at DESC, t.id DESC LIMIT ?"
            rows = db.execute(sql, [*params, limit]).fetchall()
            return [_transaction(db, row) for row in rows]

        return await self._read(query)

    async def events(self, transaction_id: str, *, after: int = 0, limit: int = 1000) -> list[Event]:
        def query(db: sqlite3.Connection) -> list[tuple[int, str]]:
            sql = "SELECT tseq, body FROM events WHERE tx = ? AND tseq > ? ORDER BY tseq LIMIT ?"
            return db.execute(sql, (transaction_id, after, limit)).fetchall()

        def parsed(db: sqlite3.Connection) -> list[Event]:
            return [event_from_json(transaction_id, tseq, body) for tseq, body in query(db)]

        return await self._read(parsed)

    async def open_owned(self, user: str, *, limit: int) -> list[str]:
        def query(db: sqlite3.Connection) -> list[str]:
            sql = "SELECT id FROM transactions WHERE owner = ? AND state = ? LIMIT ?"
            return [row[0] for row in db.execute(sql, (user, TransactionState.OPEN.value, limit))]

        return await self._read(query)

    async def tail(self, transaction_id: str, *, limit: int) -> list[Event]:
        def query(db: sqlite3.Connection) -> list[tuple[int, str]]:
            sql = "SELECT tseq, body FROM events WHERE tx = ? ORDER BY tseq DESC LIMIT ?"
            return db.execute(sql, (transaction_id, limit)).fetchall()

        rows = await self._read(query)
        return [event_from_json(transaction_id, tseq, body) for tseq, body in reversed(rows)]

    async def session(self, session_id: str) -> SessionRecord | None:
        def query(db: sqlite3.Connection) -> SessionRecord | None:
            row = db.execute("SELECT * FROM sessions WHERE id = ?", (session_id,)).fetchone()
            if row is None:
                return None
            return SessionRecord(row[0], row[1], row[2], tuple(json.loads(row[3])), row[4])

        return await self._read(query)


#: SQLite primary result codes that mean the store cannot write, whatever the row: retry later.
_STORE_CODES = {
    3: "PERM", 5: "BUSY", 6: "LOCKED", 7: "NOMEM", 8: "READONLY", 10: "IOERR",
    11: "CORRUPT", 13: "FULL", 14: "CANTOPEN", 15: "PROTOCOL", 26: "NOTADB",
}  # fmt: skip


def _unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` is the store's fault (disk full, locked, damaged...) rather than one row's."""
    if isinstance(exc, OSError | MemoryError):
        return True
    if not isinstance(exc, sqlite3.Error):
        return False  # a value SQLite will not bind (a lone surrogate): that row's fault
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in _STORE_CODES
    return isinstance(exc, sqlite3.OperationalError | sqlite3.ProgrammingError) or type(exc) is sqlite3.DatabaseError


def _damaged(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (11, 26)  # CORRUPT, NOTADB


def _transaction_of(write: _Write) -> str | None:
    kind, args = write
    if kind == "event":
        return str(args[0])
    if kind == "transaction":
        return str(args[0].id)
    return None


def _transaction_row(record: TransactionRecord) -> tuple[Any, ...]:
    return (
        record.id,
        record.owner,
        json.dumps(record.agents),
        record.state.value,
        record.thread_id,
        record.created_at,
        record.updated_at,
        record.last_tseq,
        record.end_reason,
    )


def _merged(earlier: TransactionRecord, later: TransactionRecord) -> TransactionRecord:
    """Two saves of one transaction in a batch: the later wins, but members are only ever added."""
    return replace(later, members=tuple(dict.fromkeys(earlier.members + later.members)))


def _transaction(db: sqlite3.Connection, row: tuple[Any, ...]) -> TransactionRecord:
    members = tuple(user for (user,) in db.execute("SELECT user FROM members WHERE tx = ?", (row[0],)))
    return TransactionRecord(
        id=row[0],
        owner=row[1],
        agents=tuple(json.loads(row[2])),
        members=members,
        state=TransactionState(row[3]),
        thread_id=row[4],
        created_at=row[5],
        updated_at=row[6],
        last_tseq=row[7],
        end_reason=row[8],
    )
