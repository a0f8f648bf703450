"""The terminal ``haip-runtime chat`` draws on: a prompt that output never overwrites, and a live area.

``PromptTerminal`` (an interactive terminal) reads with prompt_toolkit (history, line editing)
inside ``patch_stdout``, so lines printed while the person types appear above the prompt; the
live area (running tool calls with progress bars, the line an agent is still streaming) is the
prompt's bottom toolbar. ``LineTerminal`` (stdin is a pipe or a file) reads plain lines and has
no live area. Both print with rich. The chat's loop is ``chat.py``; what it shows, ``view.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol

import anyio
from prompt_toolkit import PromptSession
from prompt_toolkit.formatted_text import StyleAndTextTuples
from prompt_toolkit.history import InMemoryHistory
from prompt_toolkit.patch_stdout import patch_stdout
from prompt_toolkit.styles import Style
from rich.console import Console, RenderableType

#: What ``read`` returns when ``interrupt`` ended it early (the chat has something new to ask).
INTERRUPTED = "\x00interrupted"

STYLE = Style.from_dict(
    {
        "bottom-toolbar": "noreverse",
        "bar": "ansiblue",
        "dim": "ansibrightblack",
        "tool": "bold",
        "prompt": "bold",
        "question": "ansiyellow bold",
    }
)

LiveArea = Callable[[], StyleAndTextTuples]


class Terminal(Protocol):
    console: Console
    echoes_input: bool  # what the person typed stays on screen (the prompt line)

    async def read(self, prompt: str, *, question: bool = False) -> str:
        """The next line; raises ``EOFError`` (Ctrl-D, end of input) and ``KeyboardInterrupt`` (Ctrl-C)."""
        ...

    def interrupt(self) -> None:
        """End the current ``read`` with ``INTERRUPTED`` (what was typed is kept for the next prompt)."""
        ...

    def refresh(self) -> None:
        """Redraw the live area."""
        ...

    def print(self, *renderables: RenderableType) -> None: ...


class PromptTerminal:
    echoes_input = True

    def __init__(self, live: LiveArea) -> None:
        self.console = Console(highlight=False, soft_wrap=True)
        self._live = live
        self._session: PromptSession[str] = PromptSession(history=InMemoryHistory(), style=STYLE)
        self._reading = False
        self._carry = ""  # text typed when a read was interrupted

    async def read(self, prompt: str, *, question: bool = False) -> str:
        message: StyleAndTextTuples = [("class:question" if question else "class:prompt", prompt)]
        default, self._carry = ("", self._carry) if question else (self._carry, "")
        self._reading = True
        try:
            line = await self._session.prompt_async(
                message,
                default=default,
                bottom_toolbar=self._live,
                refresh_interval=0.2,
            )
        finally:
            self._reading = False
        return line

    def interrupt(self) -> None:
        app = self._session.app
        if self._reading and app.is_running and not app.is_done:
            self._carry = self._session.default_buffer.text
            app.exit(result=INTERRUPTED)

    def refresh(self) -> None:
        if self._reading:
            self._session.app.invalidate()

    def print(self, *renderables: RenderableType) -> None:
        self.console.print(*renderables)


class LineTerminal:
    """Lines from a pipe; prompts are printed as they are asked, output goes straight to stdout."""

    echoes_input = False

    def __init__(self) -> None:
        self.console = Console(highlight=False, soft_wrap=True)
        self._send, self._lines = anyio.create_memory_object_stream[str | None](math.inf)
        self._scope: anyio.CancelScope | None = None
        loop = asyncio.get_running_loop()
        # A daemon thread of its own: a read of a pipe held open cannot be interrupted, and waiting for
        # it (in anyio's worker thread, which the interpreter waits for) kept a chat that had lost its
        # server open until the next line came.
        threading.Thread(target=self._read_stdin, args=(loop,), name="chat-stdin", daemon=True).start()

    def _read_stdin(self, loop: asyncio.AbstractEventLoop) -> None:
        for line in sys.stdin:
            if not self._hand_over(loop, line.rstrip("\n")):
                return
        self._hand_over(loop, None)

    def _hand_over(self, loop: asyncio.AbstractEventLoop, line: str | None) -> bool:
        try:
            loop.call_soon_threadsafe(self._put, line)
        except RuntimeError:  # the loop has closed: the chat ended
            return False
        return True

    def _put(self, line: str | None) -> None:
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._send.send_nowait(line)

    async def read(self, prompt: str, *, question: bool = False) -> str:
        if question:
            self.console.print(prompt)
        with anyio.CancelScope() as scope:
            self._scope = scope
            line = await self._lines.receive()
            if line is None:
                raise EOFError
            return line
        return INTERRUPTED

    def interrupt(self) -> None:
        if self._scope is not None:
            self._scope.cancel()

    def refresh(self) -> None:
        pass

    def print(self, *renderables: RenderableType) -> None:
        self.console.print(*renderables)


@asynccontextmanager
async def open_terminal(live: LiveArea) -> AsyncIterator[Terminal]:
    """A ``PromptTerminal`` when stdin and stdout are a terminal, else a ``LineTerminal``."""
    if sys.stdin.isatty() and sys.stdout.isatty():
        with patch_stdout(raw=True):
            yield PromptTerminal(live)
        return
    yield LineTerminal()


def progress_bar(done: float | None, total: float | None, width: int = 20) -> str:
    """``█████░░░░░`` for a known total; a moving block when the total (or any progress) is unknown."""
    if done is None or not total:
        position = int(time.monotonic() * 8) % width
        cells = ["░"] * width
        for offset in range(3):
            cells[(position + offset) % width] = "█"
        return "".join(cells)
    filled = max(0, min(width, round(width * done / total)))
    return "█" * filled + "░" * (width - filled)


def short(value: Any, limit: int = 60) -> str:
    """One line, at most ``limit`` characters."""
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
