"""haip-runtime's agents as an MCP server: the MCP-SDK side of the `[mcp_server]` door.

`agent_server` builds the SDK's low-level `Server` and its streamable HTTP app (both protocol eras
the SDK serves: the 2025-11-25 handshake and the 2026-07-28 stateless protocol). It knows MCP and
nothing of HAIP: who the caller is, which agents they may start and how a run goes are an
`AgentHost`'s (the server's `McpDoor`). Progress notifications and cancellation are the SDK's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import mcp_types as types
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.server import Server
from mcp.server.transport_security import DEFAULT_MAX_REQUEST_BODY_SIZE
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from starlette.types import ASGIApp

MAX_BODY_BYTES: int = DEFAULT_MAX_REQUEST_BODY_SIZE
"""The largest request body the SDK takes (the door reads bodies itself, within its deadline)."""

CALLER = "haip.mcp_caller"
"""The ASGI scope key where the server's authentication puts the caller (opaque here)."""

Report = Callable[[str], Awaitable[None]]
"""Tell the MCP client how the run goes (a progress notification carrying the text)."""
Ask = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any] | None]]
"""Ask the MCP client's user (elicitation, form mode): the values if they accepted, else ``None``."""


@dataclass(frozen=True)
class AgentTool:
    name: str
    description: str


@dataclass(frozen=True)
class AgentAnswer:
    text: str
    """The agent's answer (its messages of the run, joined)."""
    structured: dict[str, Any] = field(default_factory=dict)
    """`conversation_id`, `agent`, `status`, `tool_calls`."""
    is_error: bool = False


class AgentHost(Protocol):
    def agents(self, caller: Any) -> list[AgentTool]: ...

    async def run(
        self, caller: Any, agent: str, message: str, conversation_id: str | None, report: Report, ask: Ask | None
    ) -> AgentAnswer: ...


INPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "message": {"type": "string", "description": "What to say to the agent."},
        "conversation_id": {
            "type": "string",
            "description": "Continue this conversation (an earlier answer's conversation_id) instead of a new one.",
        },
    },
    "required": ["message"],
    "additionalProperties": False,
}

OUTPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "conversation_id": {"type": "string"},
        "agent": {"type": "string"},
        "status": {"type": "string", "description": "How the run ended: OK, CANCELLED or an error code."},
        "tool_calls": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "call_id": {"type": "string"},
                    "tool": {"type": "string"},
                    "params": {},
                    "status": {"type": "string"},
                    "result": {},
                    "error": {},
                },
                "required": ["call_id", "tool"],
            },
        },
    },
    "required": ["conversation_id", "agent", "status", "tool_calls"],
}


@dataclass
class AgentServer:
    app: ASGIApp
    """The streamable HTTP endpoint, to mount at the door's path (it serves its own root)."""
    lifespan: Callable[[], AbstractAsyncContextManager[None]]
    """Enter for as long as the app serves (the SDK's session manager)."""


def agent_server(host: AgentHost, *, name: str, version: str) -> AgentServer:
    """The MCP server offering `host`'s agents as tools; mount `app`, and keep `lifespan` entered."""

    async def list_tools(
        ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        tools = [
            types.Tool(
                name=agent.name,
                description=agent.description,
                input_schema=INPUT_SCHEMA,
                output_schema=OUTPUT_SCHEMA,
            )
            for agent in host.agents(_caller(ctx))
        ]
        return types.ListToolsResult(tools=tools)

    async def call_tool(
        ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        arguments = params.arguments or {}
        message, conversation = arguments.get("message"), arguments.get("conversation_id")
        if not isinstance(message, str) or not (conversation is None or isinstance(conversation, str)):
            return _error("arguments: 'message' (a string) is required; 'conversation_id' must be a string")
        steps = 0

        async def report(text: str) -> None:
            nonlocal steps
            steps += 1
            await ctx.session.report_progress(steps, None, text)

        answer = await host.run(_caller(ctx), params.name, message, conversation, report, _asker(ctx))
        content = [types.TextContent(type="text", text=answer.text)]
        return types.CallToolResult(content=content, structured_content=answer.structured, is_error=answer.is_error)

    server: Server[Any] = Server(name, version=version, on_list_tools=list_tools, on_call_tool=call_tool)
    # The door's authentication runs before the SDK and checks Origin itself: no SDK host checks here.
    app = server.streamable_http_app(streamable_http_path="/", host="0.0.0.0")
    return AgentServer(app=app, lifespan=lambda: server.session_manager.run())


def _caller(ctx: ServerRequestContext[Any, Any]) -> Any:
    request = ctx.request
    scope = getattr(request, "scope", None)
    return scope.get(CALLER) if isinstance(scope, dict) else None


def _asker(ctx: ServerRequestContext[Any, Any]) -> Ask | None:
    """How to ask this call's client, if it can be asked: it declared elicitation, and it speaks the
    2025-11-25 protocol (there a request may go to the client during the call, on the call's stream)."""
    if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
        return None
    capabilities = ctx.session.client_capabilities
    if capabilities is None or capabilities.elicitation is None:
        return None

    async def ask(message: str, schema: dict[str, Any]) -> dict[str, Any] | None:
        result = await ctx.session.elicit_form(message, schema, related_request_id=ctx.request_id)
        return dict(result.content or {}) if result.action == "accept" else None

    return ask


def _error(text: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)], is_error=True)
