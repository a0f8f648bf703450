"""One MCP server's long-lived connection, owned by one task: connect, list, follow, reconnect.

`ServerSupervisor.run` is that task. It enters and exits the MCP `Client` itself (the SDK needs
both in one task), lists the tools after every connect, re-lists them on tools/list_changed,
notices a dead connection and reconnects with exponential backoff. Calls from other tasks use the
live client it publishes (`live`). A dead connection is noticed by: the transport ending its read
stream (a stdio process exiting, the HTTP transport failing), a call seeing "Connection closed",
the 2026 `subscriptions/listen` stream breaking, or, for 2025 servers, a ping going unanswered.
A `python` server is an `MCPServer` in this process (`inprocess.py`), handed to `Client` as is.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import anyio
import mcp_types as types
from mcp import Client, MCPError
from mcp.client import IncomingMessage, Transport
from mcp.client.session import ClientSession, MessageHandlerFnT
from mcp.client.subscriptions import SubscriptionLost
from mcp.server.mcpserver import MCPServer
from mcp_types.version import LATEST_MODERN_VERSION, MODERN_PROTOCOL_VERSIONS

from haip_runtime.bridge.calls import Call, elicitation_callback, wire
from haip_runtime.bridge.childlog import ChildLog
from haip_runtime.bridge.dialer import describe_failure, open_transport, watching_end
from haip_runtime.bridge.inprocess import load_server
from haip_runtime.bridge.models import ServerState, ServerStatus, ToolInfo
from haip_runtime.bridge.tasks import TaskStatusListener, route_progress
from haip_runtime.config.models import McpServerConfig, McpStdioConfig, tool_matches
from haip_runtime.exceptions import ToolUnavailableError

logger = logging.getLogger(__name__)

BACKOFF_FIRST = 0.2
"""Seconds before the first reconnect attempt; doubles per failed attempt, reset by a healthy connection."""
BACKOFF_MAX = 10.0
HEALTH_INTERVAL = 5.0
"""Seconds between pings (2025 protocol) or tool-list polls (2026 servers without subscriptions/listen)."""
HEALTH_TIMEOUT = 10.0
MAX_TOOL_PAGES = 100
MODES = {"auto": "auto", "legacy": "legacy", "modern": LATEST_MODERN_VERSION}
"""`protocol_mode` to the SDK's `Client(mode=...)`; `modern` adopts the newest 2026 version without a probe."""


@dataclass(eq=False)
class Link:
    """The signals of one connection attempt: lost (and why), and "re-list the tools"."""

    connected: bool = False
    lost: anyio.Event = field(default_factory=anyio.Event)
    reason: str = ""
    relist: anyio.Event = field(default_factory=anyio.Event)

    def lose(self, reason: str) -> None:
        if not self.lost.is_set():
            self.reason = reason
            self.lost.set()


class ServerSupervisor:
    def __init__(
        self,
        name: str,
        config: McpServerConfig,
        stdio: McpStdioConfig,
        *,
        base_dir: Path,
        stderr: TextIO | None,
        stopping: anyio.Event,
        on_change: Callable[[ServerStatus], None] | None,
    ) -> None:
        self.name = name
        self.config = config
        self._stdio = stdio
        self._base_dir = base_dir
        self._stderr = stderr
        self._child_log = ChildLog(name)  # stderr=None: the child's stderr reaches the log, bounded
        self._stopping = stopping
        self._on_change = on_change
        self.state = ServerState.CONNECTING
        self.error: str | None = None
        self.connects = 0
        self.tools: tuple[ToolInfo, ...] = ()
        self.calls: set[Call] = set()
        """Calls in flight, for routing elicitations that carry no link to their call."""
        self.settled = anyio.Event()
        """Set once the server has connected or failed."""
        self.stopped = anyio.Event()
        self._client: Client | None = None
        self._link = Link()
        self._attempt: anyio.CancelScope | None = None
        self._reported: ServerStatus | None = None
        #: Its ``allowed_tools`` and ``require_approval`` patterns that matched none of its tools (logged).
        self.unmatched: list[str] = []
        self._changed = anyio.Event()
        """Set (and replaced) at every change of state: what `reconnected` waits on."""

    def status(self) -> ServerStatus:
        tools = self.tools if self.state is ServerState.CONNECTED else ()
        return ServerStatus(self.name, self.state, tools, self.error, self.connects)

    def allows(self, tool: str) -> bool:
        return tool_matches(self.name, tool, self.config.allowed_tools)

    def live(self, tool: str) -> tuple[Client, Link]:
        """The live client and its link for calling `tool`, or `ToolUnavailableError`."""
        if not self.allows(tool):
            raise ToolUnavailableError(
                f"tool '{self.name}.{tool}' is not allowed (mcp.servers.{self.name}.allowed_tools)"
            )
        client = self._client
        if client is None or self.state is not ServerState.CONNECTED:
            why = f": {self.error}" if self.error else ""
            raise ToolUnavailableError(f"MCP server {self.name!r} is not connected ({self.state.value}{why})")
        if not any(known.name == tool for known in self.tools):
            raise ToolUnavailableError(f"MCP server {self.name!r} has no tool {tool!r}")
        return client, self._link

    def runs_as_task(self, tool: str) -> bool:
        """Whether calls of `tool` are MCP tasks: it requires them, or allows them and `use_tasks` is on."""
        info = next((known for known in self.tools if known.name == tool), None)
        support = "forbidden" if info is None else info.task_support
        return support == "required" or (support == "optional" and self.config.use_tasks)

    async def reconnected(self, since: Link) -> tuple[Client, Link]:
        """The first live connection after `since`, waiting through the backoff and failed attempts
        (callers bound the wait: their call's timeout); `ToolUnavailableError` once the bridge stops."""
        while True:
            client, link = self._client, self._link
            if client is not None and link is not since and link.connected and self.state is ServerState.CONNECTED:
                return client, link
            if self._stopping.is_set() or self.state is ServerState.STOPPED:
                raise ToolUnavailableError(f"MCP server {self.name!r} is stopping (the bridge is closing)")
            await self._changed.wait()

    def cancel_connecting(self) -> None:
        """Abandon an attempt that has not connected yet (there is nothing to close gracefully)."""
        if self._client is None and self._attempt is not None:
            self._attempt.cancel()

    async def run(self) -> None:
        """Keep the server connected until the bridge stops."""
        delay = BACKOFF_FIRST
        try:
            while not self._stopping.is_set():
                if await self._connect_and_serve():
                    delay = BACKOFF_FIRST
                with anyio.move_on_after(delay):
                    await self._stopping.wait()
                delay = min(delay * 2, BACKOFF_MAX)
                if not self._stopping.is_set():
                    self._set_state(ServerState.RECONNECTING, self.error)
        finally:
            self._client = None
            self._set_state(ServerState.STOPPED, None)
            self.stopped.set()

    def stderr_tail(self, wait: float = 0.0) -> list[str]:
        """The last lines a stdio server wrote to stderr (``ChildLog.tail``); none for other transports,
        or when the bridge was given a stderr of its own."""
        if self.config.transport != "stdio" or self._stderr is not None:
            return []
        return self._child_log.tail(wait)

    async def _connect_and_serve(self) -> bool:
        """One connection's life: connect, list tools, serve until lost. True if it got connected."""
        self._link = link = Link()
        try:
            with anyio.fail_after(self.config.connect_timeout_seconds) as attempt:
                self._attempt = attempt
                async with self._open_client(link) as client:
                    await self._relist(client)
                    attempt.deadline = math.inf
                    self._client, link.connected = client, True
                    self.connects += 1
                    self._set_state(ServerState.CONNECTED, None)
                    await self._serve(client, link)
                    self._client = None
                    if not self._stopping.is_set():
                        self._set_state(ServerState.RECONNECTING, f"connection lost: {link.reason}")
        except Exception as exc:  # the top of a connection's life: every failure becomes the server's state
            self._client = None
            message = describe_failure(self.config, exc, connect_timeout=self.config.connect_timeout_seconds)
            if link.connected:
                self._set_state(ServerState.RECONNECTING, f"connection lost: {message}")
            else:
                self._set_state(ServerState.FAILED, message)
        return link.connected

    @asynccontextmanager
    async def _open_client(self, link: Link) -> AsyncIterator[Client]:
        async with AsyncExitStack() as stack:
            target: Transport | MCPServer
            if self.config.transport == "python":
                target = load_server(self.name, self.config, self._base_dir)  # reached in-process; never ends
            else:
                stderr = self._stderr
                if stderr is None and self.config.transport == "stdio":
                    stderr = self._child_log.pipe()
                    stack.callback(stderr.close)  # the child holds its own copy
                transport = await open_transport(
                    self.config, self._stdio, stack, base_dir=self._base_dir, stderr=stderr
                )
                ended = "the server process exited" if self.config.transport == "stdio" else "the HTTP transport closed"
                target = watching_end(transport, lambda: link.lose(ended))
            client = Client(
                target,
                mode=MODES[self.config.protocol_mode],
                cache=None,
                message_handler=self._message_handler(),
                elicitation_callback=elicitation_callback(self.name, self.calls, self.config.approval_timeout_seconds),
                extensions=[TaskStatusListener(self.calls)],
            )
            yield await stack.enter_async_context(client)

    async def _serve(self, client: Client, link: Link) -> None:
        """Follow the tool list until the connection is lost or the bridge stops (the first one wins)."""
        async with anyio.create_task_group() as task_group:

            async def until(event: anyio.Event) -> None:
                await event.wait()
                task_group.cancel_scope.cancel()

            task_group.start_soon(until, link.lost)
            task_group.start_soon(until, self._stopping)
            task_group.start_soon(self._watch, client, link)
            task_group.start_soon(self._follow_tool_list, client, link)

    async def _watch(self, client: Client, link: Link) -> None:
        """Notice a dead connection the transport cannot see; on 2026 servers, also tool-list changes."""
        if client.protocol_version not in MODERN_PROTOCOL_VERSIONS:
            await _ping_until_silent(client, link)
            return
        try:
            async with client.listen(tools_list_changed=True) as subscription:
                link.relist.set()  # a change between the first listing and the subscription
                async for _event in subscription:
                    link.relist.set()
            link.lose("the server ended its change stream")
        except SubscriptionLost:
            link.lose("the server's change stream broke")
        except MCPError as exc:
            if exc.code == types.CONNECTION_CLOSED:
                link.lose("the connection closed")
                return
            logger.info("MCP server %r has no subscriptions/listen (%s); polling its tools", self.name, exc)
            while True:
                await anyio.sleep(HEALTH_INTERVAL)
                link.relist.set()

    async def _follow_tool_list(self, client: Client, link: Link) -> None:
        while True:
            await link.relist.wait()
            link.relist = anyio.Event()
            try:
                await self._relist(client)
            except MCPError as exc:
                if exc.code == types.CONNECTION_CLOSED:
                    link.lose("the connection closed")
                    return
                logger.warning("MCP server %r: listing tools failed: %s", self.name, exc)

    async def _relist(self, client: Client) -> None:
        tools = await _list_tools(self.name, client)
        self.tools = tuple(tool for tool in tools if self.allows(tool.name))
        self._warn_unmatched([tool.name for tool in tools])
        self._report()

    def _warn_unmatched(self, names: list[str]) -> None:
        """Say once (until the tools change) which ``allowed_tools`` and ``require_approval`` patterns match
        none of the server's tools: a typo there silently hides every tool, or runs one without approval
        (a newcomer's find)."""
        unmatched = unmatched_patterns(self.name, names, self.config)
        if unmatched != self.unmatched:
            self.unmatched = unmatched
            for line in unmatched:
                logger.warning("mcp.servers.%s.%s", self.name, line)

    def _message_handler(self) -> MessageHandlerFnT:
        async def handle(message: IncomingMessage) -> None:
            if isinstance(message, types.ToolListChangedNotification):
                self._link.relist.set()
            elif isinstance(message, types.ProgressNotification):  # a task's, past its tools/call
                await route_progress(self.calls, message.params)
            elif isinstance(message, Exception):
                logger.debug("MCP server %r transport reported %r", self.name, message)

        return handle

    def _set_state(self, state: ServerState, error: str | None) -> None:
        if error is not None and error != self.error:
            logger.warning("MCP server %r %s: %s", self.name, state.value, error)
        self.state, self.error = state, error
        if state in (ServerState.CONNECTED, ServerState.FAILED):
            self.settled.set()
        self._changed.set()
        self._changed = anyio.Event()
        self._report()

    def _report(self) -> None:
        status = self.status()
        if status == self._reported:
            return
        self._reported = status
        if self._on_change is None:
            return
        try:
            self._on_change(status)
        except Exception:  # a listener's bug must not take the connection down
            logger.exception("on_change failed for MCP server %r", self.name)


class TaskLine:
    """A task call's hold on its server's connection across reconnects (`tasks.Line`): a task the
    server keeps outlives the connection it was started on."""

    def __init__(self, supervisor: ServerSupervisor, client: Client, link: Link) -> None:
        self._supervisor = supervisor
        self._client = client
        self._link = link

    @property
    def session(self) -> ClientSession:
        return self._client.session

    @property
    def lost(self) -> anyio.Event:
        return self._link.lost

    def lose(self, why: str) -> None:
        self._link.lose(why)

    async def reconnect(self) -> ClientSession:
        self._client, self._link = await self._supervisor.reconnected(self._link)
        return self._client.session


async def _ping_until_silent(client: Client, link: Link) -> None:
    while True:
        await anyio.sleep(HEALTH_INTERVAL)
        try:
            with anyio.fail_after(HEALTH_TIMEOUT):
                await client.session.send_ping()
        except (MCPError, TimeoutError) as exc:
            link.lose(f"the server did not answer a ping ({exc or 'timeout'})")
            return


async def _list_tools(server: str, client: Client) -> list[ToolInfo]:
    tools: list[ToolInfo] = []
    cursor: str | None = None
    for _ in range(MAX_TOOL_PAGES):
        page = await client.list_tools(cursor=cursor)
        tools.extend(_tool_info(server, tool) for tool in page.tools)
        cursor = page.next_cursor
        if cursor is None:
            break
    return tools


def _tool_info(server: str, tool: types.Tool) -> ToolInfo:
    return ToolInfo(
        server=server,
        name=tool.name,
        description=tool.description or "",
        input_schema=tool.input_schema,
        output_schema=tool.output_schema,
        annotations=None if tool.annotations is None else wire(tool.annotations),
        task_support=(tool.execution.task_support if tool.execution else None) or "forbidden",
    )


def unmatched_patterns(server: str, tools: Iterable[str], config: McpServerConfig) -> list[str]:
    """One line per ``allowed_tools`` or ``require_approval`` pattern that matches none of ``tools``."""
    names = list(tools)
    lines = []
    for key in ("allowed_tools", "require_approval"):
        for pattern in getattr(config, key):
            if not any(tool_matches(server, name, [pattern]) for name in names):
                shown = ", ".join(sorted(names)[:8]) + (", ..." if len(names) > 8 else "") or "none"
                lines.append(f"{key}: {pattern!r} matches none of its {len(names)} tool(s) ({shown})")
    return lines
