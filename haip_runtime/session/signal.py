"""``Signal``: a wake-up flag for one waiting task, cleared as the task takes it.

What a loop that sleeps until there is work waits on: a connection's writer, a transaction's sender
on the bus, the window mirror's flusher. Lighter than an event: ``anyio.Event()`` asks sniffio which
event loop runs on each construction (a few µs, and these loops made one per wake-up), and an
``asyncio.Event`` keeps a deque of waiters, about 0.7 KB for every connection. Cancelling the wait
(``anyio.move_on_after`` around it) leaves the flag as it was.
"""

from __future__ import annotations

import asyncio


class Signal:
    """Set by anyone; ``wait`` returns once it is set (at once if it is) and clears it. One waiter at a time."""

    __slots__ = ("_set", "_waiter")

    def __init__(self) -> None:
        self._set = False
        self._waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        self._set = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def is_set(self) -> bool:
        return self._set

    async def wait(self) -> None:
        """Until set (at once if it is); then clear it."""
        if not self._set:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        self._set = False
