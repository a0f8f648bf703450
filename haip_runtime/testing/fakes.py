"""Fake MCP tools for the harness: Python functions that answer as a real MCP server would.

``FakeTools`` stands where the MCP bridge stands (a ``ToolBackend``), so the real tool proxy calls
them; a function's return value becomes the result the MCP SDK's ``MCPServer`` would give for it.
``AgentHarness`` (``harness.py``) builds one; plugin authors write the functions.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import pydantic_core

from haip_runtime.bridge.models import (
    ElicitationRequest,
    OnElicit,
    OnProgress,
    OnTask,
    Progress,
    ServerState,
    ServerStatus,
    ToolInfo,
    ToolResult,
)
from haip_runtime.config.models import McpServerConfig, tool_matches
from haip_runtime.exceptions import FakeToolError

logger = logging.getLogger(__name__)

#: A fake tool: takes the arguments and returns what an MCP tool function would (a str, number, dict,
#: list...) or a ``ToolResult``; may be async. The result is what a real MCP server makes of that
#: value: ``5.0`` gives text ``"5.0"`` and structured ``{"result": 5.0}``; a dict gives its JSON as
#: text and itself as structured content; what JSON has no form for is given one as pydantic gives it
#: (a datetime its ISO text, a set a list, anything else its ``str``). Raising ``FakeToolError`` makes an
#: error result with its message; any other exception one that says only ``Error executing tool <name>``,
#: as a real server hides a crash's text (the harness logs it). A fake that takes a second argument gets
#: a ``FakeToolContext`` to report progress and ask the user.
ToolFunc = Callable[..., Any]


class FakeToolContext:
    """What a fake tool with a second parameter gets: the means an MCP tool has to talk to the user."""

    def __init__(self, on_progress: OnProgress | None, on_elicit: OnElicit | None) -> None:
        self._on_progress = on_progress
        self._on_elicit = on_elicit

    async def report_progress(self, progress: float, total: float | None = None, message: str | None = None) -> None:
        """Members see ``TOOL_UPDATE {progress, total, message}`` (coalesced like real progress)."""
        if self._on_progress is not None:
            await self._on_progress(Progress(progress, total, message))

    async def elicit(self, message: str, schema: dict[str, Any]) -> dict[str, Any] | None:
        """Ask the user (``TOOL_UPDATE INPUT_REQUIRED``); the harness answers with its ``user_input``.

        Returns the answer, or ``None`` if it was declined.
        """
        if self._on_elicit is None:
            return None
        answer = await self._on_elicit(ElicitationRequest(message, schema))
        return answer.content if answer.action == "accept" else None


class FakeTools:
    """A ``ToolBackend`` of Python functions, standing in for the MCP bridge."""

    def __init__(self, funcs: Mapping[str, ToolFunc]) -> None:
        self._funcs: dict[str, ToolFunc] = {}
        self._infos: dict[str, ToolInfo] = {}
        for full_name, func in funcs.items():
            server, dot, tool = full_name.partition(".")
            if not dot or not tool:
                raise ValueError(f"fake tool names are 'server.tool', not {full_name!r}")
            self._funcs[full_name] = func
            description = inspect.getdoc(func) or ""
            self._infos[full_name] = ToolInfo(server, tool, description, {"type": "object"}, None, None)

    def servers(self, require_approval: Iterable[str]) -> dict[str, McpServerConfig]:
        """A config per fake server, each with every ``require_approval`` pattern: matched as haip.toml's are
        (``tool_matches``: a tool's own name, or with a dot its full name), so patterns copied from haip.toml
        work here. A pattern that matches no fake tool is a ``ValueError``: it would test nothing (an agent
        author's find: ``"place_order"`` and ``"*"`` were dropped, and the tool ran without approval)."""
        patterns = sorted(set(require_approval))
        for pattern in patterns:
            if not any(tool_matches(info.server, info.name, [pattern]) for info in self._infos.values()):
                known = ", ".join(sorted(self._infos)) or "none"
                raise ValueError(f"require_approval pattern {pattern!r} matches none of the fake tools ({known})")
        names = {info.server for info in self._infos.values()}
        return {
            server: McpServerConfig(transport="stdio", command="(fake)", require_approval=patterns) for server in names
        }

    def tools(self, servers: Iterable[str] | None = None) -> list[ToolInfo]:
        wanted = None if servers is None else set(servers)
        return [info for info in self._infos.values() if wanted is None or info.server in wanted]

    def find_tool(self, full_name: str) -> ToolInfo | None:
        return self._infos.get(full_name)

    def status(self) -> dict[str, ServerStatus]:
        """Fake servers are always connected."""
        connected = ServerState.CONNECTED
        servers = {info.server for info in self._infos.values()}
        return {s: ServerStatus(s, connected, tuple(self.tools([s])), None, 1) for s in sorted(servers)}

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
        """Run the fake tool; fakes never run as MCP tasks, so ``on_task`` is never called."""
        func = self._funcs[f"{server}.{tool}"]
        try:
            if _takes_context(func):
                value = func(arguments, FakeToolContext(on_progress, on_elicit))
            else:
                value = func(arguments)
            if inspect.isawaitable(value):
                value = await _awaited(value)
        except FakeToolError as exc:
            return ToolResult(True, [{"type": "text", "text": str(exc)}], None)
        except Exception:  # a crash: its text stays here, as a real MCPServer keeps it in its log
            logger.exception("fake tool %s.%s failed", server, tool)
            return ToolResult(True, [{"type": "text", "text": f"Error executing tool {tool}"}], None)
        if isinstance(value, ToolResult):
            return value
        return _as_result(pydantic_core.to_jsonable_python(value, fallback=str))


def _takes_context(func: ToolFunc) -> bool:
    try:
        parameters = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: called with the arguments only
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2


async def _awaited(value: Awaitable[Any]) -> Any:
    return await value


def _as_result(value: Any) -> ToolResult:
    """What the MCP SDK's ``MCPServer`` returns for a tool function's return ``value`` (made JSON's)."""
    if isinstance(value, dict):
        return ToolResult(False, [_text_block(value)], value)
    if isinstance(value, list | tuple):
        return ToolResult(False, [_text_block(item) for item in value], {"result": list(value)})
    if value is None:
        return ToolResult(False, [], {"result": None})
    return ToolResult(False, [_text_block(value)], {"result": value})


def _text_block(value: Any) -> dict[str, Any]:
    text = value if isinstance(value, str) else pydantic_core.to_json(value, fallback=str, indent=2).decode()
    return {"type": "text", "text": text}
