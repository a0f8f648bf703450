"""Waiting for a log line: the runtime's own record that something happened, as an event to wait on."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import anyio
import anyio.to_thread


class LogWaiter(logging.Handler):
    """Keeps the messages that contain ``text``; ``await wait(n, also)`` until ``n`` of them also contain ``also``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.messages: list[str] = []
        self._changed = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self.text in message:
            with self._changed:
                self.messages.append(message)
                self._changed.notify_all()

    def count(self, also: str = "") -> int:
        return sum(also in message for message in self.messages)

    async def wait(self, count: int, timeout: float = 10, *, also: str = "") -> None:
        def until() -> bool:
            with self._changed:
                return self._changed.wait_for(lambda: self.count(also) >= count, timeout)

        if not await anyio.to_thread.run_sync(until):
            seen = self.count(also)
            raise TimeoutError(f"{count} log lines with {self.text!r} and {also!r} within {timeout} s; saw {seen}")


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
