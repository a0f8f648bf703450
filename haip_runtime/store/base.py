"""The store interface: transaction logs, transaction metadata and session records.

A ``Store`` keeps what must outlive memory and processes: every transaction's ordered event log
(each event with its transaction sequence ``tseq``), each transaction's metadata (owner, users who
took part, agents, state, timestamps), and a small record per session so that a client resuming
after a restart learns what happened. Writes (``append``, ``save_*``) never block: they are queued
and written by the backend's own writer. Reads are async and see every write queued before them.
The interface is deliberately small and free of any database's idioms: memory, SQLite and
PostgreSQL implement the same few methods, and nothing above ``store/`` knows which it talks to.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol, Self

from haip_runtime.protocol import fastjson
from haip_runtime.protocol.envelope import Event


class TransactionState(enum.StrEnum):
    OPEN = "open"
    ENDED = "ended"


@dataclass(frozen=True)
class TransactionRecord:
    """What the store knows of one transaction besides its log."""

    id: str
    owner: str
    agents: tuple[str, ...]
    #: Every user who has been a member (the owner included): who may list and read it.
    members: tuple[str, ...]
    state: TransactionState
    created_at: float
    updated_at: float
    last_tseq: int = 0
    thread_id: str | None = None
    end_reason: str | None = None
    #: Numbers up to this one may have reached members while it was live: kept out of use after a crash
    #: (``Transaction.reserve``); its ``last_tseq`` once it was put away cleanly.
    reserved_tseq: int = 0

    def public(self) -> dict[str, Any]:
        """The record as the REST history shows it."""
        return {
            "id": self.id,
            "owner": self.owner,
            "agents": list(self.agents),
            "members": list(self.members),
            "state": self.state.value,
            "created_at": int(self.created_at * 1000),
            "updated_at": int(self.updated_at * 1000),
            "last_tseq": self.last_tseq,
            "thread_id": self.thread_id,
            "end_reason": self.end_reason,
        }


@dataclass(frozen=True)
class SessionRecord:
    """Enough of a session to tell a client, after a restart, which conversations it was in."""

    id: str
    user: str
    epoch: str
    transactions: tuple[str, ...]
    updated_at: float


class StorageState(enum.StrEnum):
    OK = "ok"
    #: Writes fail (disk full, locked, read-only, I/O error); they wait in memory and are retried.
    UNAVAILABLE = "unavailable"
    #: The database file is damaged (a read or a write met a malformed page).
    DAMAGED = "damaged"


@dataclass
class StorageHealth:
    """What ``/health`` and ``/metrics`` say of the store; the counters only ever grow."""

    state: StorageState = StorageState.OK
    #: The last failure, one line (``None`` while ``ok``).
    error: str | None = None
    #: Batches whose write failed (each retry counts).
    write_failures: int = 0
    #: Writes given up because they cannot be stored at all (one bad row costs itself only).
    writes_lost: int = 0
    #: Writes dropped, oldest first, because too many waited while the store could not write.
    writes_dropped: int = 0

    def public(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "error": self.error,
            "write_failures": self.write_failures,
            "writes_lost": self.writes_lost,
            "writes_dropped": self.writes_dropped,
        }


#: A page position in a user's transaction list: (updated_at, id) of the last record of the previous page.
Cursor = tuple[float, str]


class Store(Protocol):
    """Where conversations are kept. Use as ``async with`` (it owns its writer)."""

    #: Whether what it keeps outlives the process (open transactions then survive a restart).
    durable: bool
    #: 0 when no other process writes here; else how long what another process has published may
    #: take to be readable here (its batching interval and a commit): a lookup that finds nothing
    #: looks once more after it.
    lag: float
    #: Whether it can write and read now, and what it has failed to keep.
    health: StorageHealth
    #: Called (in the event loop) with a transaction's id and the error, once per transaction per
    #: outage, when its history cannot be written, and with ``None`` when it is written again: the
    #: runtime tells its members.
    on_storage: Callable[[str, str | None], None] | None
    #: Called (in the event loop) with a transaction's id, the ``tseq`` an event was published
    #: under and the one the store keeps it under, when they differ: another process wrote to the
    #: same transaction meanwhile (only a store several processes share does this). The runtime then
    #: numbers its next events after the stored ones.
    on_sequenced: Callable[[str, int, int], None] | None

    @property
    def pending(self) -> int:
        """Writes queued and not yet done (``/health`` shows it: a writer falling behind)."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, *exc_info: object) -> None: ...

    def append(self, event: Event) -> None:
        """Queue ``event`` (with ``transaction`` and ``tseq`` set) for its transaction's log."""

    def save_transaction(self, record: TransactionRecord) -> None:
        """Queue an insert-or-update of a transaction's metadata (members are only ever added; its
        ``last_tseq`` is the store's own count of what was appended)."""

    def save_session(self, record: SessionRecord) -> None: ...

    def forget_session(self, session_id: str) -> None: ...

    def prune_sessions(self, older_than: float) -> None:
        """Forget session records last updated before ``older_than`` (a ``time.time()``)."""

    async def transaction(self, transaction_id: str) -> TransactionRecord | None: ...

    async def transactions_of(self, user: str, *, limit: int, before: Cursor | None = None) -> list[TransactionRecord]:
        """The user's transactions (started or joined), most recently updated first."""
        ...

    async def events(self, transaction_id: str, *, after: int = 0, limit: int = 1000) -> list[Event]:
        """Up to ``limit`` events with ``tseq > after``, in order."""
        ...

    async def tail(self, transaction_id: str, *, limit: int) -> list[Event]:
        """The last ``limit`` events of the log, in order (what a conversation list previews)."""
        ...

    async def count_events(self, transaction_id: str, *, after: int, upto: int) -> int:
        """How many events the log holds with ``after < tseq <= upto`` (numbers can have gaps)."""
        ...

    async def open_owned(self, user: str, *, limit: int) -> list[str]:
        """Ids of up to ``limit`` transactions ``user`` started that have not ended, the least recently
        active first (``updated_at``: their last event but INFO); quotas count them, and end the oldest
        idle one to make room."""
        ...

    async def session(self, session_id: str) -> SessionRecord | None: ...

    def hurry(self) -> None:
        """Write what is queued soon, without the batching interval's wait (nothing to do in memory)."""

    async def flush(self) -> None:
        """Wait until everything queued so far is written."""


def merged(earlier: TransactionRecord, later: TransactionRecord) -> TransactionRecord:
    """Two saves of one transaction: the later wins, but members are only ever added."""
    return replace(later, members=tuple(dict.fromkeys(earlier.members + later.members)))


def event_to_json(event: Event) -> str:
    """The stored form of an event: its envelope fields and payload, without any session's stamp."""
    head: dict[str, Any] = {"id": event.id, "type": event.type, "channel": event.channel, "ts": event.ts}
    if event.run_id is not None:
        head["run_id"] = event.run_id
    if event.thread_id is not None:
        head["thread_id"] = event.thread_id
    return fastjson.dumps(head)[:-1] + ',"payload":' + event.payload_json + "}"


def event_from_json(transaction_id: str, tseq: int, text: str) -> Event:
    data = fastjson.loads(text)
    return Event(
        type=data["type"],
        payload=data["payload"],
        channel=data["channel"],
        transaction=transaction_id,
        run_id=data.get("run_id"),
        thread_id=data.get("thread_id"),
        id=data["id"],
        ts=data["ts"],
        tseq=tseq,
    )
