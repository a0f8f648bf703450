"""Custom tools as a Python module: an in-process MCP server haip-runtime loads without a subprocess.

Enable it in haip.toml (the default haip.toml does, as the `team` server)::

    [mcp.servers.team]
    transport = "python"
    server = "haip_runtime.demo.team_tools:server"

Each tool shows one thing a tool author needs: a plain result, progress (and noticing a
cancellation), asking the user for input, an exception, blocking work kept off the event loop,
and an action worth an approval. The tools run on the runtime's event loop: a plain `def` tool is
run in a worker thread by the MCP SDK, and an `async def` tool must not block (wrap blocking calls
in `await anyio.to_thread.run_sync(...)`, as `checksum` does).
"""

from __future__ import annotations

import hashlib
import logging
from typing import Annotated

import anyio
import anyio.to_thread
from mcp.server.mcpserver import (
    AcceptedElicitation,
    Context,
    DeclinedElicitation,
    Elicit,
    ElicitationResult,
    MCPServer,
    Resolve,
)
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import BaseModel

logger = logging.getLogger("haip_runtime.demo.team_tools")

server = MCPServer("team", instructions="A team's own small tools: notes, indexing, meetings, announcements.")


class Activity:
    """What the tools observed: index runs started, finished and cancelled."""

    def __init__(self) -> None:
        self.started = 0
        self.finished = 0
        self.cancelled = 0
        self._waiters: set[anyio.Event] = set()

    def record_cancellation(self) -> None:
        self.cancelled += 1
        logger.info("index_notes was cancelled")
        for waiter in self._waiters:
            waiter.set()

    async def wait_cancelled(self, at_least: int) -> None:
        while self.cancelled < at_least:
            waiter = anyio.Event()
            self._waiters.add(waiter)
            try:
                await waiter.wait()
            finally:
                self._waiters.discard(waiter)


ACTIVITY = Activity()


@server.tool()
def word_count(text: str) -> int:
    """Count the words in `text`."""
    return len(text.split())


@server.tool()
async def index_notes(ctx: Context, notes: int = 10, delay: float = 0.1) -> str:
    """Index `notes` notes, one every `delay` seconds, reporting progress after each."""
    ACTIVITY.started += 1
    try:
        for done in range(1, notes + 1):
            await anyio.sleep(delay)  # real work would await I/O here
            await ctx.report_progress(done, notes, f"indexed note {done} of {notes}")
    except anyio.get_cancelled_exc_class():
        # TOOL_CANCEL, RUN_CANCEL or a timeout: the task really stops here. Clean up, then re-raise.
        ACTIVITY.record_cancellation()
        raise
    ACTIVITY.finished += 1
    return f"indexed {notes} notes"


class Meeting(BaseModel):
    day: str
    room: str


def ask_for_meeting() -> Elicit[Meeting]:
    return Elicit("Which day, and which room?", Meeting)


@server.tool()
def book_meeting(topic: str, answer: Annotated[ElicitationResult[Meeting], Resolve(ask_for_meeting)]) -> str:
    """Book a meeting about `topic`, asking the user for the day and the room."""
    # `Resolve(...)` works with every protocol era; `await ctx.elicit(...)` needs protocol_mode = "legacy".
    if isinstance(answer, AcceptedElicitation):
        return f"booked {topic!r} on {answer.data.day} in {answer.data.room}"
    return "not booked: declined" if isinstance(answer, DeclinedElicitation) else "not booked: cancelled"


@server.tool()
def divide(a: float, b: float) -> float:
    """Divide `a` by `b`. Dividing by zero raises: the caller gets a tool error, the runtime goes on."""
    return a / b


@server.tool()
def lookup_note(title: str) -> str:
    """Find a note by title; a missing one is a tool error with a message the caller sees."""
    if title != "welcome":
        raise ToolError(f"no note titled {title!r}")  # ToolError's message reaches the caller; others are hidden
    return "Welcome to the team!"


@server.tool()
async def checksum(text: str, rounds: int = 1000) -> str:
    """SHA-256 of `text`, applied `rounds` times: blocking work, run in a worker thread."""

    def digest() -> str:
        value = text.encode()
        for _ in range(rounds):
            value = hashlib.sha256(value).digest()
        return value.hex()

    return await anyio.to_thread.run_sync(digest)


@server.tool()
def send_announcement(text: str) -> str:
    """Pretend to announce `text` to the whole team (put it under `require_approval`)."""
    return f"announced: {text}"


@server.tool()
async def activity(min_cancelled: int = 0) -> dict[str, int]:
    """Index runs started, finished and cancelled; waits (up to 10 s) for `min_cancelled` cancellations."""
    with anyio.move_on_after(10):
        await ACTIVITY.wait_cancelled(min_cancelled)
    return {"started": ACTIVITY.started, "finished": ACTIVITY.finished, "cancelled": ACTIVITY.cancelled}
