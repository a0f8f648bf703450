"""A transaction's recent events in memory, and a joining member's catch-up from them and the store.

``Backlog`` keeps the latest events (at most ``TAIL_EVENTS`` and ``TAIL_BYTES``, the newest always),
so a member joining mid-stream misses nothing and a join rarely waits on the store for what just
happened. ``catch_up`` reads the store for what the tail no longer holds, then the tail.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from haip_runtime.protocol.envelope import Event
from haip_runtime.store.base import Store

#: Recent events kept in memory, so a join never waits on the store for what just happened...
TAIL_EVENTS = 256
#: ...but never more than this many bytes of them (the newest is always kept).
TAIL_BYTES = 1024 * 1024


class Backlog:
    """The latest events of one transaction, oldest first."""

    def __init__(self) -> None:
        self._tail: deque[Event] = deque(maxlen=TAIL_EVENTS)
        self._bytes = 0

    def remember(self, event: Event) -> None:
        tail = self._tail
        if len(tail) == tail.maxlen:
            self._bytes -= len(tail[0].payload_json)
        tail.append(event)
        self._bytes += len(event.payload_json)
        while len(tail) > 1 and self._bytes > TAIL_BYTES:
            self._bytes -= len(tail.popleft().payload_json)

    def recent(self) -> list[Event]:
        return list(self._tail)

    async def catch_up(self, store: Store | None, transaction: str, since: int, last: Callable[[], int]) -> list[Event]:
        """The events after ``since`` up to ``last()``, the transaction's latest tseq, read again after
        each page (what is logged while the store is read comes too): from the store while the tail does
        not reach back that far, then the tail."""
        events: list[Event] = []
        after, tail = since, self._tail
        while after < last():
            if (tail and tail[0].tseq is not None and tail[0].tseq <= after + 1) or not store:
                events += [e for e in tail if (e.tseq or 0) > after]
                break
            page = await store.events(transaction, after=after, limit=last() - after)
            if not page:
                break
            events += page
            after = page[-1].tseq or last()
        return events
