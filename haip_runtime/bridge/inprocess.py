"""Finding the `MCPServer` of a `transport = "python"` server: custom tools as a module, not a process.

The `server` key names the object the way agent plugins are named (`haip_runtime/config/references.py`); it
is an `mcp.server.mcpserver.MCPServer` or a callable returning one (called once per connection).
The supervisor hands it to `mcp.Client`, which reaches it in-process; everything after that is the
same bridge as for stdio and HTTP servers. `ExitGuard` keeps a tool's `sys.exit()` inside its call.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mcp_types as types
from mcp.server._otel import OpenTelemetryMiddleware
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import MCPServer

from haip_runtime.config.models import HaipConfig, McpServerConfig
from haip_runtime.config.references import PluginKind, resolve
from haip_runtime.exceptions import PluginError
from haip_runtime.observability import tracing

logger = logging.getLogger(__name__)

SERVERS = PluginKind(noun="MCP server", group="haip_runtime.mcp_servers", form="module:server")


def load_server(name: str, config: McpServerConfig, base_dir: Path) -> MCPServer:
    """Import the module `config.server` names and return its `MCPServer`; `PluginError` in one line."""
    assert config.server is not None, "validated by McpServerConfig"
    where = f"mcp.servers.{name}.server"
    target, found = resolve(config.server, base_dir, where, SERVERS)
    if isinstance(found, MCPServer):
        return _guarded(found)
    if not callable(found):
        raise PluginError(f"{where}: {target!r} is {_kind(found)}, not an MCPServer or a callable returning one")
    try:
        made = found()
    except Exception as exc:  # the factory is plugin code: report any failure in one line
        raise PluginError(f"{where}: calling {target!r} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(made, MCPServer):
        raise PluginError(f"{where}: {target!r} returned {_kind(made)}, not an MCPServer")
    return _guarded(made)


class ExitGuard:
    """Server middleware: a tool raising SystemExit (`sys.exit`, argparse) or KeyboardInterrupt fails only its call.

    The MCP SDK turns a tool's `Exception` into an error result, but lets these through, and
    in-process they would end the runtime.
    """

    async def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        try:
            return await call_next(ctx)
        except (SystemExit, KeyboardInterrupt) as exc:
            if ctx.method != "tools/call":
                raise
            tool = (ctx.params or {}).get("name")
            logger.error("in-process MCP tool %r raised %s; its call ends as a tool error", tool, type(exc).__name__)
            text = f"Error executing tool {tool}: it raised {type(exc).__name__}"
            return types.CallToolResult(content=[types.TextContent(type="text", text=text)], is_error=True)


class TracedInRuns:
    """The MCP SDK's server span (its ``OpenTelemetryMiddleware``), for an in-process server's requests
    made in a run only (under its span, or carrying its trace in ``_meta.traceparent``). The client side
    traces none outside runs (pings, ``tools/list``: ``observability/tracing.py``), and the server's
    spans of them stood alone, a trace of their own each (found by a tester reading the collector)."""

    def __init__(self, traced: Any) -> None:
        self.traced = traced

    async def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        if tracing.current_ids() is None and not (ctx.meta or {}).get("traceparent"):
            return await call_next(ctx)
        result: HandlerResult = await self.traced(ctx, call_next)
        return result


def _guarded(server: MCPServer) -> MCPServer:
    chain = server.middleware  # (the server's own list: changed in place)
    chain[:] = [TracedInRuns(each) if isinstance(each, OpenTelemetryMiddleware) else each for each in chain]
    if not any(isinstance(middleware, ExitGuard) for middleware in server.middleware):
        server.middleware.append(ExitGuard())
    return server


def load_servers(config: HaipConfig) -> dict[str, MCPServer]:
    """Every `python` server of `config`, loaded (what `haip-runtime check` verifies)."""
    return {
        name: load_server(name, server, config.base_dir)
        for name, server in config.mcp.servers.items()
        if server.transport == "python"
    }


def _kind(value: object) -> str:
    if isinstance(value, type):
        return f"the class {value.__name__}"
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"  # (a newcomer's find: "is a int")
