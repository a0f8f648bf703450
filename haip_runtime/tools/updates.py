"""The TOOL_UPDATEs of one tool call: status changes, coalesced MCP progress, and an MCP task's states.

Owned by the tool proxy (one per call in flight); knows the wire fields of TOOL_UPDATE, nothing of MCP.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Protocol

import anyio
from anyio.abc import TaskGroup

from haip_runtime.protocol.events import Channel, EventType, ToolStatus

if TYPE_CHECKING:
    from haip_runtime.bridge import Progress, TaskState

#: Progress updates per call are sent at most this often (about 20 a second); the latest wins.
PROGRESS_INTERVAL = 0.05


class Emit(Protocol):
    """Publish one event into the agent's transaction, stamped with the current run."""

    def __call__(self, type: str, payload: dict[str, Any] | str, *, channel: str = Channel.AGENT) -> None: ...


class Updates:
    """TOOL_UPDATEs of one call; progress is coalesced to one per ``PROGRESS_INTERVAL``, latest wins."""

    def __init__(self, call_id: str, emit: Emit) -> None:
        self.call_id = call_id
        self.timers: TaskGroup | None = None
        self._emit = emit
        self._last_sent = 0.0
        self._pending: dict[str, Any] | None = None
        self._flush_scheduled = False
        self._cancelling = False

    def send(self, status: ToolStatus, **fields: Any) -> None:
        self.flush()
        self._cancelling = status is ToolStatus.CANCELLING
        self._emit(EventType.TOOL_UPDATE, {"call_id": self.call_id, "status": status.value, **fields})

    async def progress(self, progress: Progress) -> None:
        if self._cancelling:
            return  # late progress of a call being cancelled would read as if it were still running
        body = {"call_id": self.call_id, "status": ToolStatus.RUNNING.value, "progress": progress.progress}
        if progress.total is not None:
            body["total"] = progress.total
        if progress.message:
            body["message"] = server_text(progress.message)
        self._pending = body
        wait = PROGRESS_INTERVAL - (time.monotonic() - self._last_sent)
        if wait <= 0:
            self.flush()
        elif not self._flush_scheduled and self.timers is not None:
            self._flush_scheduled = True
            self.timers.start_soon(self._flush_later, wait)

    async def _flush_later(self, delay: float) -> None:
        await anyio.sleep(delay)
        self._flush_scheduled = False
        self.flush()

    def flush(self) -> None:
        if self._pending is not None:
            self._emit(EventType.TOOL_UPDATE, self._pending)
            self._pending, self._last_sent = None, time.monotonic()

    async def task(self, state: TaskState) -> None:
        """An MCP task's new state: ``RUNNING`` with the server's status message and ``task: {id, status}``
        (the bridge's own message while it waits for a lost connection to come back).

        Its end shows in TOOL_DONE. While the call is being cancelled only the cancel's outcome comes
        here, told as ``CANCELLING``: the server confirmed it, so members see that the server, not just
        the runtime, stopped the work; or it could not reach the server, whose task may run on.
        """
        task = {"id": state.task_id, "status": state.status}
        cancelling = self._cancelling or state.cancel  # (a run cancelled, a timeout: no TOOL_CANCEL said so)
        if state.status == "cancelled" and cancelling:
            why = f": {server_text(state.message)}" if state.message else ""
            message = f"the MCP server cancelled its task {state.task_id}{why}"
            self.send(ToolStatus.CANCELLING, message=message, task=task)
        elif cancelling and state.local:
            self.send(ToolStatus.CANCELLING, message=server_text(state.message) if state.message else None, task=task)
        elif not cancelling and not state.terminal:
            said = {"message": server_text(state.message)} if state.message else {}
            self.send(ToolStatus.RUNNING, **said, task=task)


#: The most characters of an MCP server's status or progress message members are sent: what one frame holds
#: whatever a server says (a tester's find: a 100,000-character progress message closed clients holding the
#: advertised frame limit, again at every resume).
SERVER_TEXT_MOST = 1024


def server_text(text: str, most: int = SERVER_TEXT_MOST) -> str:
    """An MCP server's message for members, cut to ``most`` characters."""
    return text if len(text) <= most else text[:most] + " …"
