"""A stdio MCP server's stderr, into the runtime's log at a bounded rate.

The child's stderr is a pipe the runtime reads in a thread of its own, line by line (a line is
cut at ``MAX_LINE`` bytes). Each server may put ``BURST`` lines into the log at once and then
``PER_MINUTE`` lines a minute; what is over is dropped and counted, and the next line that is
logged (or the end of the pipe) says how many were dropped. A server writing megabytes a second
to stderr costs a few log lines a minute, not the disk. The last few lines (logged or not) are kept
too: ``haip-runtime tools`` and ``check --connect``, which log nothing, show them for a server that failed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from typing import IO, TextIO

logger = logging.getLogger(__name__)

BURST = 20
PER_MINUTE = 6
MAX_LINE = 2048
#: The last lines kept for ``tail``, each cut at ``TAIL_CHARS``.
TAIL_LINES = 3
TAIL_CHARS = 300


class RateLimit:
    """A token bucket: ``burst`` at once, refilled at ``per_minute``; thread-safe enough for one reader."""

    def __init__(self, burst: int = BURST, per_minute: float = PER_MINUTE) -> None:
        self.burst, self.rate = burst, per_minute / 60
        self.tokens = float(burst)
        self.at = time.monotonic()
        self.dropped = 0

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        self.dropped += 1
        return False


class ChildLog:
    """Where one MCP server's stderr goes; ``pipe()`` gives each new child process its own pipe."""

    def __init__(self, server: str) -> None:
        self.server = server
        self.limit = RateLimit()  # one budget per server, across its restarts
        self.last: deque[str] = deque(maxlen=TAIL_LINES)
        self._ended = threading.Event()
        self._ended.set()

    def pipe(self) -> TextIO:
        """The write end to give the child as its stderr; close it once the child has started."""
        read_fd, write_fd = os.pipe()
        reader = os.fdopen(read_fd, "rb")
        self._ended = ended = threading.Event()
        # Each child's own tail: the last words of one that failed, not lines of every restart interleaved
        # (a newcomer's find; the previous child's reader may still be adding its last lines to its own).
        self.last = last = deque[str](maxlen=TAIL_LINES)
        name = f"mcp-stderr-{self.server}"
        threading.Thread(target=self._pump, args=(reader, ended, last), name=name, daemon=True).start()
        return os.fdopen(write_fd, "w", encoding="utf-8")

    def tail(self, wait: float = 0.0) -> list[str]:
        """The last non-blank lines of the child's stderr; first waiting up to ``wait`` seconds for the
        latest child's stderr to end (it exited: its last words may still be in the pipe)."""
        self._ended.wait(wait)
        return list(self.last)

    def _pump(self, reader: IO[bytes], ended: threading.Event, last: deque[str]) -> None:
        try:
            with reader:
                while line := reader.readline(MAX_LINE):
                    text = line.decode("utf-8", "replace").rstrip()
                    if text.strip():
                        last.append(text[:TAIL_CHARS])
                    if self.limit.allow():
                        self._emit(text)
            if self.limit.dropped:
                self._emit(None)
        finally:
            ended.set()

    def _emit(self, text: str | None) -> None:
        dropped, self.limit.dropped = self.limit.dropped, 0
        note = f" ({dropped} stderr lines dropped before this)" if dropped else ""
        if text is None:
            logger.warning(
                "MCP server %r stderr: %d lines dropped (over %d a minute)", self.server, dropped, PER_MINUTE
            )
        else:  # (INFO: stderr is where an MCP server logs, its own INFO lines too; a failure says it apart)
            logger.info("MCP server %r stderr: %s%s", self.server, text, note)
