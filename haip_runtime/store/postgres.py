"""The PostgreSQL store: one database that several runtime processes and nodes share.

Writes go through the batching writer every durable store has (``batching.py``): queued, never
waited on, written by one writer task per process as one database transaction per batch, retried
with backoff while the database cannot be reached. What a crash of the runtime can lose: the
writes still waiting (``/health``'s ``pending_writes``): those of the last ``flush_interval`` (50 ms
by default), and under load those of the batch being written too (under half a second with a full
core of echo load, bench/store.py part 4). What PostgreSQL
has committed is its own to keep (its WAL; see docs/postgres.md for the settings that trade that).

Several writers, no overwrite: the database decides ``tseq``. A batch takes each of its
transactions' rows in id order (so two writers never wait on each other in a circle) and inserts
each event at the number it was published under if that comes after what is stored (one writer:
always, so live and stored numbers agree, a gap left by a lost write included), else at the next
free number, in the order they were published; ``last_tseq`` follows. A runtime whose events were
numbered differently in the database (another process wrote to the same transaction meanwhile) is
told through ``on_sequenced`` and numbers the next ones after them. Inserts never replace:
``(tx, tseq)`` is the primary key and ``(tx, id)`` unique, and a batch retried after a commit
whose answer was lost skips what is already there. Metadata updates merge rather than clobber:
members and agents are only added, an ended transaction stays ended, ``updated_at`` only moves
forward.

asyncpg, not psycopg 3: measured on this machine (PostgreSQL 15 on 127.0.0.1, 20,000 events in
batches of 100, same table): asyncpg wrote 96-175 k events/s, psycopg 40-77 k; point reads took
44-64 µs against 77-78 µs; reading 1,000 events took the same (2.3-2.8 ms).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Self, TypeVar

import anyio
import asyncpg
import orjson

from haip_runtime.config.masking import masked_url
from haip_runtime.config.models import StorageConfig
from haip_runtime.exceptions import ConfigError, StorageError
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
from haip_runtime.store.batching import BatchingWriter, Write, one_line
from haip_runtime.store.migrations import (
    LATEST,
    SINGLE,
    Db,
    claim_writer,
    current_version,
    migrate,
    read_writer,
    refuse_newer,
    writer,
    writer_conflict,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: What failing to reach or talk to the database raises.
_REACHING = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)

# A batch is a few set-based statements, whatever number of transactions it touches: each
# statement is one round trip, and under load a round trip waits for the event loop's turn (one
# statement per transaction let the writer fall behind a busy process's log for good).
#
# 1. Make the rows the batch needs that are not there yet, in id order: a record's own values, or a
#    placeholder for a transaction whose events come before its record (its metadata follows).
#    Returns the ids it made. Rows made by another writer's uncommitted batch are waited for in id
#    order too, so two writers never wait on each other in a circle.
_MAKE_ROWS = """
INSERT INTO haip_transactions
    (id, owner, agents, state, thread_id, created_at, updated_at, last_tseq, end_reason, reserved_tseq)
SELECT r.id, r.owner, ARRAY(SELECT a FROM jsonb_array_elements_text(r.agents::jsonb) WITH ORDINALITY AS x(a, n)
    ORDER BY n), r.state, r.thread_id, r.created_at, r.updated_at, 0, r.end_reason, r.reserved_tseq
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::float8[], $7::float8[], $8::text[],
    $9::bigint[]) AS r(id, owner, agents, state, thread_id, created_at, updated_at, end_reason, reserved_tseq)
ORDER BY r.id COLLATE "C"  -- code point order, as Python sorts: every version of the writer agrees
ON CONFLICT (id) DO NOTHING
RETURNING id
"""
# 2. Lock every row of the batch, in id order (writers of one transaction take turns), and read what
#    is stored up to. The count is kept past every stored event even if the row was restored behind them.
_LOCK_ROWS = """
WITH locked AS (SELECT id FROM haip_transactions WHERE id = ANY($1::text[]) ORDER BY id COLLATE "C" FOR UPDATE)
UPDATE haip_transactions t SET last_tseq = greatest(
    t.last_tseq, (SELECT coalesce(max(tseq), 0) FROM haip_events e WHERE e.tx = t.id))
FROM locked WHERE t.id = locked.id
RETURNING t.id, t.last_tseq
"""
# 3. Merge records into rows that were there already: members and agents are only added, an ended
#    transaction stays ended, updated_at only moves forward; reserved_tseq is the latest save's (a
#    transaction put away cleanly gives its reservation back).
_MERGE_RECORDS = """
UPDATE haip_transactions t SET
    owner = CASE WHEN t.owner = '' THEN r.owner ELSE t.owner END,
    agents = t.agents || ARRAY(
        SELECT a FROM jsonb_array_elements_text(r.agents::jsonb) WITH ORDINALITY AS x(a, n)
        WHERE NOT a = ANY(t.agents) ORDER BY n),
    state = CASE WHEN t.state = 'ended' THEN t.state ELSE r.state END,
    end_reason = CASE WHEN t.state = 'ended' THEN t.end_reason ELSE r.end_reason END,
    thread_id = coalesce(t.thread_id, r.thread_id),
    created_at = least(t.created_at, r.created_at),
    updated_at = greatest(t.updated_at, r.updated_at),
    reserved_tseq = r.reserved_tseq
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::float8[], $7::float8[], $8::text[],
    $9::bigint[]) AS r(id, owner, agents, state, thread_id, created_at, updated_at, end_reason, reserved_tseq)
WHERE t.id = r.id
"""
# 4. Members are only added; every member's row carries the transaction's updated_at (for the list).
_ADD_MEMBERS = """
INSERT INTO haip_members (user_id, tx, updated_at)
SELECT m.user_id, m.tx, t.updated_at FROM unnest($1::text[], $2::text[]) AS m(tx, user_id)
JOIN haip_transactions t ON t.id = m.tx
ON CONFLICT DO NOTHING
"""
_MEMBERS_UPDATED = """
UPDATE haip_members m SET updated_at = t.updated_at FROM haip_transactions t
WHERE t.id = ANY($1::text[]) AND m.tx = t.id AND m.updated_at < t.updated_at
"""
# 5. The events, every transaction's at once: by COPY (binary), which took 55 ms of PostgreSQL's time
#    and 3 ms of ours for 20,000 rows where this INSERT took 97 and 19. In a cluster every event comes
#    numbered by the bus's log, and every node hosting the transaction writes what it delivers: a row
#    another node wrote already is skipped, never moved, which COPY cannot do. So a clustered writer
#    copies only the events numbered past the row's last_tseq, which it holds locked (no writer can
#    have stored them: every one raises last_tseq past what it stores, under the same lock), and
#    inserts the rest with this, first; should a copied event's id be stored already (an append that
#    landed twice, under two numbers, and came before, in the table or in this batch), the COPY fails
#    and the batch is written again with this alone, in its order: the first copy is the one kept.
_EVENT_COLUMNS = ["tx", "tseq", "id", "body"]
_INSERT_NUMBERED = """
INSERT INTO haip_events (tx, tseq, id, body) SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[])
ON CONFLICT DO NOTHING
"""
# 6. A record's last_tseq counts numbers handed out live, also to events that were never stored
#    (given up, dropped in an outage): a transaction brought back later must not hand them out again.
_KEEP_LAST = """
UPDATE haip_transactions t SET last_tseq = greatest(t.last_tseq, u.last)
FROM unnest($1::text[], $2::bigint[]) AS u(id, last) WHERE t.id = u.id
"""
# A retried batch: which of its events the attempt before committed without our hearing it.
_STORED_IDS = """
SELECT e.tx, e.id, e.tseq FROM haip_events e JOIN unnest($1::text[], $2::text[]) AS u(tx, id)
ON e.tx = u.tx AND e.id = u.id
"""
_SAVE_SESSION = """
INSERT INTO haip_sessions AS s (id, user_id, epoch, transactions, updated_at) VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (id) DO UPDATE SET
    user_id = excluded.user_id, epoch = excluded.epoch, transactions = excluded.transactions,
    updated_at = excluded.updated_at
WHERE s.updated_at <= excluded.updated_at
"""
_RECORD = "SELECT t.*, ARRAY(SELECT user_id FROM haip_members WHERE tx = t.id ORDER BY user_id) AS members"
# The reads, each on an index (tests/store/test_postgres.py EXPLAINs them on a large log).
READS = {
    "transaction": f"{_RECORD} FROM haip_transactions t WHERE t.id = $1",
    "transactions_of": f"{_RECORD} FROM haip_members m JOIN haip_transactions t ON t.id = m.tx WHERE m.user_id = $1"
    " ORDER BY m.updated_at DESC, m.tx DESC LIMIT $2",
    "transactions_of_before": f"{_RECORD} FROM haip_members m JOIN haip_transactions t ON t.id = m.tx"
    " WHERE m.user_id = $1 AND (m.updated_at, m.tx) < ($3, $4) ORDER BY m.updated_at DESC, m.tx DESC LIMIT $2",
    "events": "SELECT tseq, body FROM haip_events WHERE tx = $1 AND tseq > $2 ORDER BY tseq LIMIT $3",
    "tail": "SELECT tseq, body FROM haip_events WHERE tx = $1 ORDER BY tseq DESC LIMIT $2",
    "count_events": "SELECT count(*) FROM haip_events WHERE tx = $1 AND tseq > $2 AND tseq <= $3",
    "open_owned": (
        "SELECT id FROM haip_transactions WHERE owner = $1 AND state = 'open' ORDER BY updated_at, id LIMIT $2"
    ),
    "session": "SELECT * FROM haip_sessions WHERE id = $1",
}

#: SQLSTATE classes that mean the database cannot write now, whatever the row: retry later.
#: 08 connection, 25 read-only transaction state, 28 authorization, 3D no such database, 40 rolled
#: back (deadlock, serialization), 42 a table or privilege missing, 53 out of resources (disk full),
#: 55 lock not available, 57 operator intervention (shutdown, statement timeout), 58 system (I/O),
#: XX internal (damage). Not 54 (program limits: one row too big for an index is that row's fault)
#: nor 22 and 23 (a value or a constraint: that row's).
_STORE_CLASSES = {"08", "25", "28", "3D", "40", "42", "53", "55", "57", "58", "XX"}
#: Failures two writers cause each other (serialization, deadlock, lock not available): tried again
#: at once, a few times, before they count as the store failing.
_TRANSIENT = {"40001", "40P01", "55P03"}
TRANSIENT_TRIES = 4


class PostgresStore(BatchingWriter):
    def __init__(self, config: StorageConfig) -> None:
        assert config.url is not None
        self.url = config.url.get_secret_value()
        super().__init__(
            name=masked_url(self.url),
            flush_interval=config.flush_interval_seconds,
            max_pending=config.max_pending_writes,
        )
        self.config = config
        #: Other processes write here too: what they published is readable within their batching
        #: interval (the same setting, by their config) and a commit.
        self.lag = config.flush_interval_seconds + 0.2
        #: Events come numbered by the cluster's log (``[cluster]``): kept at their number, a copy
        #: another node wrote already skipped; never renumbered (``on_sequenced`` is not called).
        self.numbered_by_caller = False
        #: The ``[cluster]`` key prefix of the servers this one writes with (``None``: no ``[cluster]``):
        #: one database is one numbering's log (``migrations.claim_writer``).
        self.cluster_prefix: str | None = None
        self._pool: asyncpg.Pool | None = None

    # --- lifetime --------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        try:
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=0,  # connections opened as needed: no warning storms restoring a floor in an outage
                max_size=self.config.pool_size,
                timeout=self.config.connect_timeout_seconds,
                # The server cancels a slow statement; this catches a network that hangs (no answer
                # at all), which the server cannot see.
                command_timeout=self.config.statement_timeout_seconds + 2,
                reset=_nothing_to_reset,
                server_settings={
                    "application_name": "haip-runtime",
                    "statement_timeout": str(int(self.config.statement_timeout_seconds * 1000)),
                },
            )
        except (*_REACHING, ValueError) as exc:
            raise ConfigError(f"storage.url: cannot open PostgreSQL database {self.name}: {_short(exc)}") from exc
        try:
            async with self._pool.acquire() as db:  # the first connection: the database is reached here
                try:
                    await migrate(db, self.name, lock_timeout=self.config.connect_timeout_seconds)
                    await claim_writer(db, self.name, writer(self.cluster_prefix))
                except _REACHING as exc:
                    message = f"storage.url: cannot prepare PostgreSQL database {self.name}: {_short(exc)}"
                    raise ConfigError(message) from exc
        except BaseException as exc:
            self._pool.terminate()  # at once: closing politely could itself be cancelled
            if isinstance(exc, (*_REACHING, ValueError)) and not isinstance(exc, ConfigError):
                raise ConfigError(f"storage.url: cannot open PostgreSQL database {self.name}: {_short(exc)}") from exc
            raise
        await self._start_writer()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stop_writer()
        if self._pool is not None:
            with anyio.move_on_after(5, shield=True):
                await self._pool.close()
            if not self._pool.is_closing() or self._pool.get_size():
                self._pool.terminate()

    # --- writes ----------------------------------------------------------------------------------

    def append(self, event: Event) -> None:
        assert event.transaction is not None and event.tseq is not None
        self._queue("event", event.transaction, event.tseq, event_to_json(event), event.id)

    def _unavailable(self, exc: BaseException) -> bool:
        if isinstance(exc, asyncpg.PostgresError):
            state = exc.sqlstate or ""
            return state[:2] in _STORE_CLASSES
        if isinstance(exc, asyncpg.DataError):  # a value asyncpg will not send: that row's fault
            return False
        return isinstance(exc, OSError | TimeoutError | asyncpg.InterfaceError | MemoryError)

    def _damaged(self, exc: BaseException) -> bool:
        return isinstance(exc, asyncpg.PostgresError) and (exc.sqlstate or "").startswith("XX")

    async def _attempt(self, batch: list[Write]) -> None:
        """Write ``batch``; what two writers do to each other (a deadlock) is tried again at once."""
        tries, copy = 1, self.numbered_by_caller
        while True:
            try:
                return await self._write(batch, copy_numbered=copy)
            except asyncpg.UniqueViolationError:
                if not copy:
                    raise
                copy = False  # an event copied was stored already (section 5): again, every one by INSERT
                logger.info("store: an event of the batch was stored already under another number; written again")
                continue
            except asyncpg.PostgresError as exc:
                if exc.sqlstate not in _TRANSIENT or tries == TRANSIENT_TRIES:
                    raise
                logger.info("store: %s (try %d of %d), writing the batch again", one_line(exc), tries, TRANSIENT_TRIES)
                await anyio.sleep(random.uniform(0.005, 0.02) * tries)  # a jitter, not a secret
                tries += 1

    async def _write(self, batch: list[Write], *, copy_numbered: bool = False) -> None:
        """One database transaction for ``batch``, in a few set-based statements whatever number of
        transactions it touches. Rows are locked in one order whoever writes, so two writers do not
        wait on each other in a circle: transactions by id, then sessions by id, then the prunes."""
        assert self._pool is not None
        records: dict[str, TransactionRecord] = {}
        events: dict[str, list[tuple[Any, ...]]] = {}
        sessions: list[tuple[int, str, int, Write]] = []
        for index, (kind, args) in enumerate(batch):
            if kind == "event":
                events.setdefault(args[0], []).append(args)
            elif kind == "transaction":
                record: TransactionRecord = args[0]
                known = records.get(record.id)
                records[record.id] = record if known is None else merged(known, record)
            elif kind == "session":
                sessions.append((0, args[0].id, index, (kind, args)))
            elif kind == "forget":
                sessions.append((0, args[0], index, (kind, args)))
            else:  # prune: many rows, after the rest
                sessions.append((1, "", index, (kind, args)))
        ids = sorted(records.keys() | events.keys())
        renumbered: list[tuple[str, int, int]] = []
        async with self._pool.acquire() as db, db.transaction():
            if ids:
                renumbered = await self._write_transactions(db, ids, records, events, copy_numbered)
            for _, _, _, (kind, args) in sorted(sessions, key=lambda item: item[:3]):
                await self._write_session(db, kind, args)
        for transaction_id, published, stored in renumbered:  # committed: now it is true
            self._sequenced(transaction_id, published, stored)

    async def _write_transactions(
        self,
        db: Db,
        ids: list[str],
        records: dict[str, TransactionRecord],
        events: dict[str, list[tuple[Any, ...]]],
        copy_numbered: bool = False,
    ) -> list[tuple[str, int, int]]:
        """The rows, metadata and events of the transactions ``ids`` (sorted); the events whose
        number changed: (transaction, published, stored). ``copy_numbered``: events numbered by the
        cluster's log past the stored ones go by COPY (section 5)."""
        now = time.time()
        made = {
            row["id"]
            for row in await db.fetch(_MAKE_ROWS, *_columns([records.get(i) or _placeholder(i, now) for i in ids]))
        }
        stored_up_to = {row["id"]: int(row["last_tseq"]) for row in await db.fetch(_LOCK_ROWS, ids)}
        if records:
            known = [record for record_id, record in records.items() if record_id not in made]
            if known:
                await db.execute(_MERGE_RECORDS, *_columns(known))
            pairs = [(record.id, member) for record in records.values() for member in record.members]
            await db.execute(_ADD_MEMBERS, [tx for tx, _ in pairs], [member for _, member in pairs])
            await db.execute(_MEMBERS_UPDATED, list(records))
        # numbers handed out live, stored or not
        last = {record_id: record.last_tseq for record_id, record in records.items() if record.last_tseq}
        renumbered: list[tuple[str, int, int]] = []
        if events:
            rows, renumbered, stored_last = await self._numbered(db, events, stored_up_to)
            if self.numbered_by_caller:
                await self._insert_numbered(db, rows, stored_up_to if copy_numbered else None)
            else:
                await db.copy_records_to_table("haip_events", records=rows, columns=_EVENT_COLUMNS)
            for tx, tseq in stored_last.items():
                last[tx] = max(last.get(tx, 0), tseq)
        if last:
            await db.execute(_KEEP_LAST, list(last), list(last.values()))
        return renumbered

    @staticmethod
    async def _insert_numbered(db: Db, rows: list[tuple[str, int, str, str]], stored: dict[str, int] | None) -> None:
        """Events numbered by the cluster's log: those past ``stored`` (what the locked rows say is
        stored) by COPY, the others (another node may have written them) by ``_INSERT_NUMBERED``;
        every one by the latter when ``stored`` is ``None`` (section 5 above)."""
        copied: list[tuple[str, int, str, str]] = []
        inserted: list[tuple[str, int, str, str]] = []
        if stored is not None:
            top = dict(stored)
            for row in rows:
                if row[1] > top.get(row[0], 0):
                    copied.append(row)
                    top[row[0]] = row[1]
                else:
                    inserted.append(row)
        else:
            inserted = rows
        if inserted:  # first: a copied row that shares an id with one of these (in the table now) fails the COPY
            await db.execute(_INSERT_NUMBERED, *[list(column) for column in zip(*inserted, strict=True)])
        if copied:
            await db.copy_records_to_table("haip_events", records=copied, columns=_EVENT_COLUMNS)

    async def _numbered(
        self, db: Db, events: dict[str, list[tuple[Any, ...]]], stored_up_to: dict[str, int]
    ) -> tuple[list[tuple[str, int, str, str]], list[tuple[str, int, int]], dict[str, int]]:
        """The events to insert as rows (tx, tseq, id, body), those whose number changed, and each
        transaction's last number after them.

        Each goes in at the number it was published under if that is free and after what is stored,
        else at the next free one: order kept, no gap made. In a cluster the bus's numbers are kept."""
        rows_out: list[tuple[str, int, str, str]] = []
        moved: list[tuple[str, int, int]] = []
        lasts: dict[str, int] = {}
        if self._retrying and not self.numbered_by_caller:  # the last attempt may have committed unheard
            asked = [(tx, row[3]) for tx, rows in events.items() for row in rows]
            found = await db.fetch(_STORED_IDS, [tx for tx, _ in asked], [event_id for _, event_id in asked])
            stored = {(row["tx"], row["id"]): row["tseq"] for row in found}
            for tx, rows in events.items():
                moved += [
                    (tx, row[1], stored[tx, row[3]]) for row in rows if stored.get((tx, row[3]), row[1]) != row[1]
                ]
            events = {
                tx: kept for tx, rows in events.items() if (kept := [row for row in rows if (tx, row[3]) not in stored])
            }
        for tx in sorted(events):
            last = stored_up_to.get(tx, 0)
            for row in events[tx]:
                number = row[1] if self.numbered_by_caller else max(row[1], last + 1)
                last = max(last, number)
                rows_out.append((tx, number, row[3], row[2]))
                if number != row[1]:
                    moved.append((tx, row[1], number))
            lasts[tx] = last
        return rows_out, moved, lasts

    @staticmethod
    async def _write_session(db: Db, kind: str, args: tuple[Any, ...]) -> None:
        if kind == "session":
            session: SessionRecord = args[0]
            row = (session.id, session.user, session.epoch, list(session.transactions), session.updated_at)
            await db.execute(_SAVE_SESSION, *row)
        elif kind == "forget":
            await db.execute("DELETE FROM haip_sessions WHERE id = $1", *args)
        else:
            await db.execute("DELETE FROM haip_sessions WHERE updated_at < $1", *args)

    # --- reads -----------------------------------------------------------------------------------

    async def _read(self, query: Callable[[Db], Awaitable[T]]) -> T:
        await self.flush()
        assert self._pool is not None
        try:
            async with self._pool.acquire(timeout=self.config.connect_timeout_seconds) as db:
                return await query(db)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError, ValueError) as exc:
            unreadable = isinstance(exc, ValueError) and not isinstance(exc, asyncpg.InterfaceError)
            if self._damaged(exc) or unreadable:  # a stored body that no longer parses
                self.health.state, self.health.error = StorageState.DAMAGED, one_line(exc)
            logger.error("store: a read of %s failed (%s)", self.name, one_line(exc))
            raise StorageError(f"the store could not read this ({_short(exc)}); see /health") from exc

    async def transaction(self, transaction_id: str) -> TransactionRecord | None:
        async def query(db: Db) -> TransactionRecord | None:
            row = await db.fetchrow(READS["transaction"], transaction_id)
            return None if row is None else _transaction(row)

        return await self._read(query)

    async def transactions_of(self, user: str, *, limit: int, before: Cursor | None = None) -> list[TransactionRecord]:
        async def query(db: Db) -> list[TransactionRecord]:
            if before is None:
                rows = await db.fetch(READS["transactions_of"], user, limit)
            else:
                rows = await db.fetch(READS["transactions_of_before"], user, limit, *before)
            return [_transaction(row) for row in rows]

        return await self._read(query)

    async def events(self, transaction_id: str, *, after: int = 0, limit: int = 1000) -> list[Event]:
        async def query(db: Db) -> list[Event]:
            rows = await db.fetch(READS["events"], transaction_id, after, limit)
            return [event_from_json(transaction_id, row[0], row[1]) for row in rows]

        return await self._read(query)

    async def tail(self, transaction_id: str, *, limit: int) -> list[Event]:
        async def query(db: Db) -> list[Event]:
            rows = await db.fetch(READS["tail"], transaction_id, limit)
            return [event_from_json(transaction_id, row[0], row[1]) for row in reversed(rows)]

        return await self._read(query) if limit > 0 else []

    async def count_events(self, transaction_id: str, *, after: int, upto: int) -> int:
        async def query(db: Db) -> int:
            return int(await db.fetchval(READS["count_events"], transaction_id, after, upto))

        return await self._read(query)

    async def open_owned(self, user: str, *, limit: int) -> list[str]:
        async def query(db: Db) -> list[str]:
            return [row[0] for row in await db.fetch(READS["open_owned"], user, limit)]

        return await self._read(query)

    async def session(self, session_id: str) -> SessionRecord | None:
        async def query(db: Db) -> SessionRecord | None:
            row = await db.fetchrow(READS["session"], session_id)
            if row is None:
                return None
            return SessionRecord(row["id"], row["user_id"], row["epoch"], tuple(row["transactions"]), row["updated_at"])

        return await self._read(query)


@asynccontextmanager
async def _one_connection(config: StorageConfig, doing: str) -> AsyncIterator[tuple[Db, str]]:
    """One connection outside the pool, for a look before (or instead of) serving, with the URL as
    shown; what fails, opening it or ``doing`` with it, is one ``ConfigError`` line. Nothing waits
    longer than the configured timeouts."""
    assert config.url is not None
    url, where = config.url.get_secret_value(), masked_url(config.url.get_secret_value())
    timeout = config.connect_timeout_seconds
    try:
        db = await asyncpg.connect(url, timeout=timeout, command_timeout=config.statement_timeout_seconds + timeout)
    except (*_REACHING, ValueError) as exc:
        raise ConfigError(f"storage.url: cannot open PostgreSQL database {where}: {_short(exc)}") from exc
    try:
        yield db, where
    except _REACHING as exc:
        raise ConfigError(f"storage.url: cannot {doing} PostgreSQL database {where}: {_short(exc)}") from exc
    finally:
        with anyio.move_on_after(timeout, shield=True):
            await db.close()
        if not db.is_closed():
            db.terminate()


async def preflight(config: StorageConfig, cluster_prefix: str | None = None, *, claim: bool = True) -> int:
    """What opening the store would refuse, met before a server starts (so the refusal is one line,
    not a failed start-up): a database that cannot be reached, a wrong password, one of a newer
    schema, one that needs migrating by a role that may not, a migration lock held too long, or the
    log of another numbering (``cluster_prefix``: the server's ``[cluster]`` key prefix; ``claim``:
    check it). Migrates it (what the store would do); the schema version it had."""
    async with _one_connection(config, "prepare") as (db, where):
        before = await migrate(db, where, lock_timeout=config.connect_timeout_seconds)
        if claim:
            await claim_writer(db, where, writer(cluster_prefix))
        return before


async def inspect(config: StorageConfig, cluster_prefix: str | None = None) -> str:
    """What ``check --connect`` says of the database, without changing it: reached, and its schema
    version against this runtime's; ``ConfigError`` (one line) if it cannot be reached or read."""
    async with _one_connection(config, "read") as (db, where):
        version = await current_version(db)
        found = await read_writer(db) if version <= LATEST else None
    refuse_newer(version, where)
    mine = writer(cluster_prefix)
    refusal = writer_conflict(where, found, mine)
    if refusal is not None:
        raise ConfigError(refusal)
    state = "current" if version == LATEST else f"{version}: serve or migrate brings it to {LATEST}"
    said = f"storage.url: {where} reached, schema version {state}"
    if found == SINGLE and mine != SINGLE:  # (the upgrade path: serve says so too, as it takes it)
        said += "; servers without [cluster] wrote it so far: serve makes it this cluster's log (stop them first)"
    return said


async def _nothing_to_reset(db: Db) -> None:
    """The pool's reset of a connection given back: nothing, beyond the rollback of an open
    transaction asyncpg always does. The store changes no session state (its only setting is
    `SET LOCAL`, its only lock a transaction's), so asyncpg's default `RESET ALL`, `UNLISTEN *`...
    would cost a round trip per read and per batch for nothing (measured: 170 -> 130 us a read)."""


def _short(exc: BaseException) -> str:
    """An error in one line, without anything that could be the password (a URL the driver could
    not parse is not echoed: the part it chokes on may be the password)."""
    if isinstance(exc, ValueError) and not isinstance(exc, asyncpg.InterfaceError):
        return "the URL cannot be read (percent-encode any of / ? # @ : in the user name or password)"
    return " ".join((str(exc) or type(exc).__name__).split())


def _transaction(row: asyncpg.Record) -> TransactionRecord:
    return TransactionRecord(
        id=row["id"],
        owner=row["owner"],
        agents=tuple(row["agents"]),
        members=tuple(row["members"]),
        state=TransactionState(row["state"]),
        thread_id=row["thread_id"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        last_tseq=row["last_tseq"],
        end_reason=row["end_reason"],
        reserved_tseq=row["reserved_tseq"],
    )


def _placeholder(transaction_id: str, now: float) -> TransactionRecord:
    """The row of a transaction whose events are written before its record: its metadata follows."""
    return TransactionRecord(transaction_id, "", (), (), TransactionState.OPEN, now, now)


def _columns(records: list[TransactionRecord]) -> list[list[Any]]:
    """``records`` as the columns _MAKE_ROWS and _MERGE_RECORDS take (agents as JSON, kept in order)."""
    return [
        [record.id for record in records],
        [record.owner for record in records],
        [orjson.dumps(record.agents).decode() for record in records],  # a lone surrogate refused, not changed
        [record.state.value for record in records],
        [record.thread_id for record in records],
        [record.created_at for record in records],
        [record.updated_at for record in records],
        [record.end_reason for record in records],
        [record.reserved_tseq for record in records],
    ]
