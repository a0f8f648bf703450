"""`McpBridge`: every configured MCP server kept connected, and tool calls carried to them.

The public face of the package: a supervisor task per server (`supervisor.py`) in one task group,
what they currently offer (`status`, `tools`), and `call_tool` through the live clients (`calls.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TextIO

import anyio
import anyio.abc
from mcp_types import CallToolResult

from haip_runtime.bridge.calls import Call, TaskRunner, call_tool
from haip_runtime.bridge.models import OnElicit, OnProgress, OnTask, ServerStatus, ToolInfo, ToolResult
from haip_runtime.bridge.supervisor import ServerSupervisor, TaskLine
from haip_runtime.bridge.tasks import OnTaskEnd, run_task
from haip_runtime.config.models import McpServerConfig, McpStdioConfig
from haip_runtime.exceptions import ToolUnavailableError
from haip_runtime.observability.logs import limit_logger

CLOSE_TIMEOUT = 5.0
"""Seconds `McpBridge.__aexit__` waits for connections to close gracefully before cancelling them."""


class McpBridge:
    """Keeps every configured MCP server connected and carries tool calls to them.

    Enter and exit it in the same task. Entering starts one supervisor task per server and returns
    at once: servers connect in parallel (`wait_settled` waits for each one's first outcome), and
    `on_change` hears every change of a server's state or tool set, `on_task_end` the final status of
    every MCP task a call ran as.
    """

    def __init__(
        self,
        servers: Mapping[str, McpServerConfig],
        stdio: McpStdioConfig,
        *,
        base_dir: Path,
        on_change: Callable[[ServerStatus], None] | None = None,
        stderr: TextIO | None = None,
        on_task_end: OnTaskEnd | None = None,
    ) -> None:
        # The SDK logs a full traceback for every stdout line of a server that is not JSON-RPC.
        limit_logger("mcp.client.stdio")
        self._stopping = anyio.Event()
        self._supervisors = {
            name: ServerSupervisor(
                name, config, stdio, base_dir=base_dir, stderr=stderr, stopping=self._stopping, on_change=on_change
            )
            for name, config in servers.items()
        }
        self._stack = AsyncExitStack()
        self._task_group: anyio.abc.TaskGroup | None = None
        self._on_task_end = on_task_end

    async def __aenter__(self) -> Self:
        if self._task_group is not None or self._stopping.is_set():
            raise RuntimeError("an McpBridge can be entered only once")
        async with AsyncExitStack() as stack:
            self._task_group = await stack.enter_async_context(anyio.create_task_group())
            for supervisor in self._supervisors.values():
                self._task_group.start_soon(supervisor.run, name=f"MCP server {supervisor.name!r}")
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._task_group is not None, "McpBridge was not entered"
        self._stopping.set()
        for supervisor in self._supervisors.values():
            supervisor.cancel_connecting()
        with anyio.move_on_after(CLOSE_TIMEOUT, shield=True):
            for supervisor in self._supervisors.values():
                await supervisor.stopped.wait()
        self._task_group.cancel_scope.cancel()
        await self._stack.__aexit__(exc_type, exc, tb)

    def status(self) -> dict[str, ServerStatus]:
        return {name: supervisor.status() for name, supervisor in self._supervisors.items()}

    def failure(self, status: ServerStatus, *, wait: float = 1.0) -> str:
        """Why a server is not connected (``status``, as it was), for an operator: its error, with the last
        lines it wrote to stderr when it is a stdio server that said something (waiting up to ``wait``
        seconds for them, as a child that just exited may not have been read to its end)."""
        error = status.error or "no answer"
        tail = self._supervisors[status.name].stderr_tail(wait)
        if not tail:
            return error
        return f"{error.removesuffix(' (see its stderr)')}; its stderr ended: {' | '.join(tail)}"

    def unmatched(self, server: str) -> list[str]:
        """The ``allowed_tools`` and ``require_approval`` patterns of ``server`` that matched none of its tools
        when it last listed them, one line each (``check --connect`` notes them)."""
        return list(self._supervisors[server].unmatched)

    def tools(self, servers: Iterable[str] | None = None) -> list[ToolInfo]:
        """The allowed tools of the CONNECTED servers (all of them, or only the named ones)."""
        names = self._supervisors.keys() if servers is None else servers
        chosen = (self._supervisors[name] for name in names if name in self._supervisors)
        return [tool for supervisor in chosen for tool in supervisor.status().tools]

    def find_tool(self, full_name: str) -> ToolInfo | None:
        server, _, name = full_name.partition(".")
        return next((tool for tool in self.tools([server]) if tool.name == name), None)

    async def wait_settled(self, timeout: float) -> None:
        """Wait until every server has connected or failed at least once, or `timeout` passes."""
        with anyio.move_on_after(timeout):
            for supervisor in self._supervisors.values():
                await supervisor.settled.wait()

    async def call_tool(
        self,
        server: str,
        tool: str,
        arguments: dict[str, Any],
        *,
        on_progress: OnProgress | None = None,
        on_elicit: OnElicit | None = None,
        timeout: float | None = None,
        on_task: OnTask | None = None,
    ) -> ToolResult:
        """Call `tool` on `server` through its live session.

        A tool that ran and failed is a result with ``is_error``. Raises `ToolUnavailableError`
        (unknown, not allowed, not connected), `ToolTimeoutError` (not finished within `timeout`,
        default the server's `timeout_seconds`; cancelled on the server) or `ToolError` (the
        connection broke). Cancelling the caller cancels the request on the server. Time spent
        in `on_elicit` does not count against the timeout; `on_elicit` should give up after the
        server's `approval_timeout_seconds` (the bridge declines by itself a little later). A tool the
        server runs as an MCP task (`ServerSupervisor.runs_as_task`) is followed to its end the same way:
        its states reach `on_task`, and cancelling cancels the task. Such a call outlives a reconnect of
        the server's connection when the server keeps the task (`tasks.py`); `ToolError` if it does not.
        """
        supervisor = self._supervisors.get(server)
        if supervisor is None:
            raise ToolUnavailableError(f"no MCP server named {server!r}")
        client, link = supervisor.live(tool)
        call = Call(server, on_elicit)
        limit = supervisor.config.timeout_seconds if timeout is None else timeout
        as_task: TaskRunner | None = None
        if supervisor.runs_as_task(tool):
            ttl = limit + supervisor.config.approval_timeout_seconds
            line = TaskLine(supervisor, client, link)

            async def as_task() -> CallToolResult:
                return await run_task(
                    line,
                    call,
                    tool,
                    arguments,
                    ttl_seconds=ttl,
                    on_task=on_task,
                    on_end=self._on_task_end,
                    on_progress=on_progress,
                )

        supervisor.calls.add(call)
        try:
            return await call_tool(
                client, call, tool, arguments, limit=limit, on_progress=on_progress, on_lost=link.lose, as_task=as_task
            )
        finally:
            supervisor.calls.discard(call)
