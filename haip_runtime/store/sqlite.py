"""The SQLite store: transaction logs and metadata in one file, written by one batching writer.

Writes are queued in memory and committed by a single writer task, in one transaction per batch,
in a worker thread (the event loop never waits on the disk). A batch is written at most
``flush_interval`` after its first write, or at once when a reader needs it (reads wait for every
write queued before them, so a reader always sees its own writes). What a crash can lose: the
writes still waiting (``/health``'s ``pending_writes``): those of the last ``flush_interval`` (50 ms
by default), and under load those of the batch being written too (a batch is one
SQLite transaction; the file is in WAL mode with ``synchronous=NORMAL``, so an OS crash may also lose
the last commits, but never corrupts the file).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Self, TypeVar

import anyio.to_thread
import orjson

from haip_runtime.exceptions import ConfigError, StorageError
from haip_runtime.protocol import fastjson
from haip_runtime.protocol.envelope import Event
from haip_runtime.store.base import (
    Cursor,
    SessionRecord,
    StorageState,
    TransactionRecord,
    TransactionState,
    event_from_json,
    event_to_json,
    merged,
)
from haip_runtime.store.batching import BatchingWriter, Write
from haip_runtime.store.guard import INTEGRITY_CHECK_SECONDS, check_integrity, hold_lock

logger = logging.getLogger(__name__)

T = TypeVar("T")

SCHEMA_VERSION = "2"
#: Versions this runtime brings up to ``SCHEMA_VERSION`` as it opens the file (1: before reserved_tseq).
#: A newer version is refused: a runtime that does not know its columns would write rows it cannot fill.
_UPGRADES = {"1"}
#: Made first: a file of another schema version is refused before anything else in it changes.
_META = """
PRAGMA journal_mode=WAL;
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_SCHEMA = """
CREATE TABLE IF NOT EXISTS transactions(
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, agents TEXT NOT NULL, state TEXT NOT NULL, thread_id TEXT,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, last_tseq INTEGER NOT NULL, end_reason TEXT,
    reserved_tseq INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS transactions_by_owner ON transactions(owner, state);
CREATE TABLE IF NOT EXISTS members(user TEXT NOT NULL, tx TEXT NOT NULL, PRIMARY KEY(user, tx)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS members_by_tx ON members(tx, user);
CREATE TABLE IF NOT EXISTS events(
    tx TEXT NOT NULL, tseq INTEGER NOT NULL, body TEXT NOT NULL, PRIMARY KEY(tx, tseq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sessions(
    id TEXT PRIMARY KEY, user TEXT NOT NULL, epoch TEXT NOT NULL, transactions TEXT NOT NULL, updated_at REAL NOT NULL);
"""


#: A transaction's row with its members (a JSON array, on ``members_by_tx``): one query, not one more per row.
#: Without that index each record read scanned every member row (a list of 50 took 120 ms at 20,000
#: transactions, and more steps, each of which waits for a busy event loop's thread to let go of the GIL).
_RECORD = "SELECT t.*, (SELECT json_group_array(user) FROM members WHERE tx = t.id) FROM transactions t"


def _insert(db: sqlite3.Connection, verb: str, table: str, rows: list[tuple[Any, ...]]) -> None:
    """``verb`` INTO ``table`` ``rows``, as one statement over a JSON array of them.

    Not an executemany: sqlite3 lets go of the GIL around every step, one step a row, and the writer
    thread takes it back only when the event loop's thread yields it (every 5 ms when it is busy).
    Under load, 10,000 rows by executemany took 11 s instead of 17 ms, and the writer fell behind for
    good; as one statement they take 37 ms. A row whose text JSON cannot bring to SQLite intact goes the
    slow way: ``json_extract`` cuts a string at a NUL (such a row shares no key with the others: the NUL
    is in it). orjson refuses a lone surrogate (UTF-8 cannot hold one), as sqlite3 would, so that row is
    given up alone rather than changed."""
    nul = [any("\x00" in value for value in row if isinstance(value, str)) for row in rows]
    if any(nul):
        whole = [row for row, odd in zip(rows, nul, strict=True) if odd]
        rows = [row for row, odd in zip(rows, nul, strict=True) if not odd]
        db.executemany(f"{verb} INTO {table} VALUES ({', '.join('?' * len(whole[0]))})", whole)
    if rows:
        values = ", ".join(f"json_extract(value, '$[{column}]')" for column in range(len(rows[0])))
        db.execute(f"{verb} INTO {table} SELECT {values} FROM json_each(?)", (orjson.dumps(rows).decode(),))


#: Events read per step (reads are a loop of these): a step's JSON is built whole by SQLite, which
#: refuses text past 1e9 bytes and, meanwhile, holds it beside the rows (events of up to a frame, 1 MiB
#: by default, escaped: up to about 200 MB a step).
READ_CHUNK = 100


def _log(db: sqlite3.Connection, transaction_id: str, limit: int, after: int | None = None) -> list[tuple[int, str]]:
    """The (tseq, body) rows of a transaction, in tseq order: the first ``limit`` after ``after``, or
    without it the last ``limit``. Read as JSON arrays of ``READ_CHUNK`` rows, one step each: a step a
    row would give up the GIL a row, and wait for the busy event loop's thread each time (157 rows:
    182 ms with the loop's thread busy against 0.2 ms so)."""
    newest = after is None
    sql = (
        "SELECT tseq, body FROM events WHERE tx = ? AND tseq <= ? ORDER BY tseq DESC LIMIT ?"
        if newest
        else "SELECT tseq, body FROM events WHERE tx = ? AND tseq > ? ORDER BY tseq LIMIT ?"
    )
    rows: list[tuple[int, str]] = []
    bound = 2**63 - 1 if after is None else after
    rowwise = False  # once a step's JSON is past SQLite's longest text: the rest a row a step
    while len(rows) < limit:
        asked = min(READ_CHUNK, limit - len(rows))
        params = (transaction_id, bound, asked)
        chunk: list[tuple[int, str]] = []
        if not rowwise:
            try:
                query = f"SELECT json_group_array(json_array(tseq, body)) FROM ({sql})"
                (text,) = db.execute(query, params).fetchone()
                chunk = [(tseq, body) for tseq, body in fastjson.loads(text)]
            except sqlite3.DataError:
                rowwise = True
        if rowwise:
            chunk = db.execute(sql, params).fetchall()
        rows += chunk
        if len(chunk) < asked:
            break
        bound = min(tseq for tseq, _ in chunk) - 1 if newest else max(tseq for tseq, _ in chunk)
        if bound < -(2**63):
            break  # nothing comes before SQLite's smallest integer
    rows.sort()
    return rows


def _integer(value: int) -> int:
    """``value``, if SQLite can keep it as an integer (in JSON a larger one would be read as a float)."""
    if not -(2**63) <= value < 2**63:
        raise OverflowError(f"{value} does not fit SQLite's 64-bit integers")
    return value


class SqliteStore(BatchingWriter):
    def __init__(self, path: Path, *, flush_interval: float = 0.05, max_pending: int = 100_000) -> None:
        super().__init__(name=str(path), flush_interval=flush_interval, max_pending=max_pending)
        self.path = path
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._read_lock = threading.Lock()
        self._lock: IO[str] | None = None

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
        await self._start_writer()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stop_writer()
        for connection in (self._writer, self._reader):
            if connection is not None:
                connection.close()
        if self._lock is not None:
            self._lock.close()  # another process may open the file now

    def _open(self) -> tuple[sqlite3.Connection, sqlite3.Connection]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        writer = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        writer.executescript(_META)
        writer.execute("PRAGMA synchronous=NORMAL")
        check_integrity(writer, self.path, INTEGRITY_CHECK_SECONDS)
        row = writer.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is not None and row[0] != SCHEMA_VERSION and row[0] not in _UPGRADES:
            raise sqlite3.DatabaseError(f"schema version {row[0]}, this runtime reads {SCHEMA_VERSION}")
        writer.executescript(_SCHEMA)  # (what an older runtime's file lacks, an index, is made here)
        columns = {column[1] for column in writer.execute("PRAGMA table_info(transactions)")}
        if "reserved_tseq" not in columns:  # version 1 (before 2026-12-07): nothing was reserved
            writer.execute("ALTER TABLE transactions ADD COLUMN reserved_tseq INTEGER NOT NULL DEFAULT 0")
        writer.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
        reader = sqlite3.connect(self.path, check_same_thread=False)
        return writer, reader

    # --- writes ----------------------------------------------------------------------------------

    def append(self, event: Event) -> None:
        assert event.transaction is not None and event.tseq is not None
        self._queue("event", event.transaction, event.tseq, event_to_json(event), event.id)

    async def _attempt(self, batch: list[Write]) -> None:
        await anyio.to_thread.run_sync(self._write_batch, batch)

    def _unavailable(self, exc: BaseException) -> bool:
        return _unavailable(exc)

    def _damaged(self, exc: BaseException) -> bool:
        return _damaged(exc)

    def _write_batch(self, batch: list[Write]) -> None:
        """One SQLite transaction for the whole batch; a transaction saved several times is written once."""
        assert self._writer is not None
        db = self._writer
        events: list[tuple[Any, ...]] = []
        transactions: dict[str, TransactionRecord] = {}
        for kind, args in batch:
            if kind == "event":
                events.append((args[0], _integer(args[1]), args[2]))
            elif kind == "transaction":
                record: TransactionRecord = args[0]
                _integer(record.last_tseq)
                _integer(record.reserved_tseq)
                known = transactions.get(record.id)
                transactions[record.id] = record if known is None else merged(known, record)
        members = [(user, record.id) for record in transactions.values() for user in record.members]
        db.execute("BEGIN")
        try:
            _insert(db, "INSERT OR REPLACE", "events", events)
            _insert(db, "INSERT OR REPLACE", "transactions", [_transaction_row(r) for r in transactions.values()])
            _insert(db, "INSERT OR IGNORE", "members", members)
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
            row = db.execute(f"{_RECORD} WHERE t.id = ?", (transaction_id,)).fetchone()
            return None if row is None else _transaction(row)

        return await self._read(query)

    async def transactions_of(self, user: str, *, limit: int, before: Cursor | None = None) -> list[TransactionRecord]:
        def query(db: sqlite3.Connection) -> list[TransactionRecord]:
            sql = f"{_RECORD} JOIN members m ON t.id = m.tx WHERE m.user = ?"
            params: list[Any] = [user]
            if before is not None:
                sql += " AND (t.updated_at < ? OR (t.updated_at = ? AND t.id < ?))"
                params += [before[0], before[0], before[1]]
            sql += " ORDER BY t.updated_at DESC, t.id DESC LIMIT ?"
            rows = db.execute(sql, [*params, limit]).fetchall()
            return [_transaction(row) for row in rows]

        return await self._read(query)

    async def events(self, transaction_id: str, *, after: int = 0, limit: int = 1000) -> list[Event]:
        def query(db: sqlite3.Connection) -> list[Event]:
            return [
                event_from_json(transaction_id, tseq, body) for tseq, body in _log(db, transaction_id, limit, after)
            ]

        return await self._read(query)

    async def count_events(self, transaction_id: str, *, after: int, upto: int) -> int:
        def query(db: sqlite3.Connection) -> int:
            sql = "SELECT count(*) FROM events WHERE tx = ? AND tseq > ? AND tseq <= ?"
            return int(db.execute(sql, (transaction_id, _integer(after), _integer(upto))).fetchone()[0])

        return await self._read(query)

    async def open_owned(self, user: str, *, limit: int) -> list[str]:
        def query(db: sqlite3.Connection) -> list[str]:
            sql = "SELECT id FROM transactions WHERE owner = ? AND state = ? ORDER BY updated_at, id LIMIT ?"
            return [row[0] for row in db.execute(sql, (user, TransactionState.OPEN.value, limit))]

        return await self._read(query)

    async def tail(self, transaction_id: str, *, limit: int) -> list[Event]:
        def query(db: sqlite3.Connection) -> list[Event]:
            return [event_from_json(transaction_id, tseq, body) for tseq, body in _log(db, transaction_id, limit)]

        return await self._read(query)

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
        record.reserved_tseq,
    )


def _transaction(row: tuple[Any, ...]) -> TransactionRecord:
    """A record from a row of ``_RECORD``: the transaction's columns, then its members as JSON."""
    members = tuple(sorted(json.loads(row[10])))  # by user, in code point order, as they were read before
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
        reserved_tseq=row[9],
    )
