"""Deadlines of many connections, served by one task: heartbeats, token expiry, gap watches.

A task per deadline would make every idle connection hold several (each a coroutine, a cancel
scope and an event: a few KB apiece). ``Timers.run`` is instead the one task of the runtime
(started by ``Runtime``) that sleeps until the earliest deadline and calls what is due. Callbacks
are plain functions that must not block; one that raises is logged and the others still run.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import anyio

logger = logging.getLogger(__name__)

#: Cancelled timers are dropped from the heap once they are this many and half of it.
_COMPACT_AT = 256


class Timer:
    """One pending call; ``cancel`` it if it is no longer wanted."""

    __slots__ = ("_timers", "args", "callback", "cancelled", "deadline")

    def __init__(self, timers: Timers, deadline: float, callback: Callable[..., None], args: tuple[Any, ...]) -> None:
        self._timers = timers
        self.deadline = deadline
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self.callback, self.args = _nothing, ()  # what it would have called may go now
            self._timers._forget()


def _nothing() -> None:
    pass


class Timers:
    """Calls at monotonic deadlines (``time.monotonic``), made by ``run`` in its own task."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timer]] = []
        self._order = itertools.count()  # ties fire in the order they were set
        self._cancelled = 0
        self._changed = anyio.Event()

    def __len__(self) -> int:
        return len(self._heap) - self._cancelled

    def call_later(self, delay: float, callback: Callable[..., None], *args: Any) -> Timer:
        """Call ``callback(*args)`` in ``delay`` seconds."""
        timer = Timer(self, time.monotonic() + delay, callback, args)
        heapq.heappush(self._heap, (timer.deadline, next(self._order), timer))
        if self._heap[0][2] is timer:
            self._changed.set()  # a new earliest deadline: ``run`` sleeps less
        return timer

    def _forget(self) -> None:
        """A timer was cancelled: it stays in the heap (cheaply) until due, or until cancelled ones pile up."""
        self._cancelled += 1
        if self._cancelled > _COMPACT_AT and self._cancelled > len(self._heap) // 2:
            self._heap = [entry for entry in self._heap if not entry[2].cancelled]
            heapq.heapify(self._heap)
            self._cancelled = 0

    async def run(self) -> None:
        """Make every call when it is due, until cancelled."""
        while True:
            self._call_due()
            delay = self._heap[0][0] - time.monotonic() if self._heap else math.inf
            with anyio.move_on_after(delay):
                await self._changed.wait()
            self._changed = anyio.Event()

    def _call_due(self) -> None:
        now = time.monotonic()
        while self._heap and self._heap[0][0] <= now:  # (a callback may compact the heap: no local alias)
            timer = heapq.heappop(self._heap)[2]
            if timer.cancelled:
                self._cancelled -= 1
                continue
            timer.cancelled = True  # done: a late cancel() is a no-op
            try:
                timer.callback(*timer.args)
            except Exception:
                logger.exception("timer callback %r failed", timer.callback)
