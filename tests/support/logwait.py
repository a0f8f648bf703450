"""Waiting for a log line: the runtime's own record that something happened, as an event to wait on."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import anyio
import anyio.to_thread


class LogWaiter(logging.Handler):
    """Counts records whose message contains ``text``; ``await wait(n)`` until ``n`` were logged."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.count = 0
        self._changed = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            with self._changed:
                self.count += 1
                self._changed.notify_all()

    async def wait(self, count: int, timeout: float = 10) -> None:
        def until() -> bool:
            with self._changed:
                return self._changed.wait_for(lambda: self.count >= count, timeout)

        if not await anyio.to_thread.run_sync(until):
            raise TimeoutError(f"{count} log lines with {self.text!r} within {timeout} s; saw {self.count}")


@contextmanager
def waiting_for_log(text: str) -> Iterator[LogWaiter]:
    waiter = LogWaiter(text)
    root = logging.getLogger()
    level = root.level
    root.addHandler(waiter)
    root.setLevel(min(level, logging.INFO) if level else logging.INFO)
    try:
        yield waiter
    finally:
        root.removeHandler(waiter)
        root.setLevel(level)
