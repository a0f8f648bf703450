"""The in-process store: everything in this process's memory, bounded by a total event count.

For tests and throwaway runs. When the logs together hold more than ``max_events`` events, the
transactions updated least recently are forgotten whole (and logged), so memory stays bounded.
"""

from __future__ import annotations

import bisect
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Self

from haip_runtime.protocol.envelope import Event
from haip_runtime.store.base import Cursor, SessionRecord, StorageHealth, TransactionRecord, TransactionState, merged

logger = logging.getLogger(__name__)


class MemoryStore:
    durable = False
    lag = 0.0
    pending = 0  # writes are done at once

    def __init__(self, *, max_events: int = 200_000) -> None:
        self.max_events = max_events
        self.health = StorageHealth()  # memory never fails to write
        self.on_storage: Callable[[str, str | None], None] | None = None
        self.on_sequenced: Callable[[str, int, int], None] | None = None  # one writer: never called
        self._records: dict[str, TransactionRecord] = {}
        self._logs: OrderedDict[str, list[Event]] = OrderedDict()  # least recently appended first
        self._sessions: dict[str, SessionRecord] = {}
        self._count = 0

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    def append(self, event: Event) -> None:
        assert event.transaction is not None and event.tseq is not None
        log = self._logs.setdefault(event.transaction, [])
        self._logs.move_to_end(event.transaction)
        log.append(event)
        self._count += 1
        while self._count > self.max_events and len(self._logs) > 1:
            oldest, dropped = self._logs.popitem(last=False)
            self._records.pop(oldest, None)
            self._count -= len(dropped)
            logger.warning("memory store full: forgot transaction %s (%d events)", oldest, len(dropped))

    def save_transaction(self, record: TransactionRecord) -> None:
        known = self._records.get(record.id)
        if known is not None:
            record = merged(known, record)
        self._records[record.id] = record

    def save_session(self, record: SessionRecord) -> None:
        self._sessions[record.id] = record

    def forget_session(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def prune_sessions(self, older_than: float) -> None:
        for record in [r for r in self._sessions.values() if r.updated_at < older_than]:
            del self._sessions[record.id]

    async def transaction(self, transaction_id: str) -> TransactionRecord | None:
        return self._records.get(transaction_id)

    async def transactions_of(self, user: str, *, limit: int, before: Cursor | None = None) -> list[TransactionRecord]:
        mine = sorted(
            (r for r in self._records.values() if user in r.members),
            key=lambda r: (r.updated_at, r.id),
            reverse=True,
        )
        if before is not None:
            mine = [r for r in mine if (r.updated_at, r.id) < before]
        return mine[:limit]

    async def open_owned(self, user: str, *, limit: int) -> list[str]:
        owned = [r for r in self._records.values() if r.owner == user and r.state is TransactionState.OPEN]
        return [r.id for r in sorted(owned, key=lambda r: (r.updated_at, r.id))[:limit]]

    async def events(self, transaction_id: str, *, after: int = 0, limit: int = 1000) -> list[Event]:
        log = self._logs.get(transaction_id, [])
        start = bisect.bisect_right(log, after, key=lambda e: e.tseq or 0)
        return log[start : start + limit]

    async def tail(self, transaction_id: str, *, limit: int) -> list[Event]:
        return self._logs.get(transaction_id, [])[-limit:] if limit > 0 else []

    async def count_events(self, transaction_id: str, *, after: int, upto: int) -> int:
        log = self._logs.get(transaction_id, [])
        key: Callable[[Event], int] = lambda event: event.tseq or 0  # noqa: E731
        return max(0, bisect.bisect_right(log, upto, key=key) - bisect.bisect_right(log, after, key=key))

    async def session(self, session_id: str) -> SessionRecord | None:
        return self._sessions.get(session_id)

    def hurry(self) -> None:
        return None

    async def flush(self) -> None:
        return None
