"""A small MCP server for trying haip-runtime and for its tests.

Run it over stdio (how haip-runtime starts it from haip.toml)::

    python -m haip_runtime.demo.mcp_server

or over streamable HTTP (``--port 0`` picks a free port; the address is printed once it listens)::

    python -m haip_runtime.demo.mcp_server --http --host 127.0.0.1 --port 0

Every tool shows one thing the runtime surfaces to humans: results, progress, errors,
cancellation, elicitation (asking the user) and a changing tool list.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import Annotated

import anyio
import uvicorn
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

server = MCPServer("demo", instructions="Demo tools for haip-runtime: arithmetic, progress, errors, elicitation.")


class Stats:
    """What the server observed: tool calls started, and calls cancelled mid-way."""

    def __init__(self) -> None:
        self.calls = 0
        self.cancelled = 0
        self._cancellation = anyio.Event()

    def record_cancellation(self, tool: str) -> None:
        self.cancelled += 1
        _log(f"{tool} was cancelled")
        self._cancellation.set()
        self._cancellation = anyio.Event()

    async def wait_cancelled(self, at_least: int) -> None:
        while self.cancelled < at_least:
            await self._cancellation.wait()


STATS = Stats()


def _log(message: str) -> None:
    # stdout carries the protocol over stdio, so the log goes to stderr.
    print(f"demo_mcp_server: {message}", file=sys.stderr, flush=True)


async def _cancellable(tool: str, steps: int, delay: float, ctx: Context | None) -> None:
    """Wait `steps` times `delay` seconds, reporting progress after each; record a cancellation."""
    STATS.calls += 1
    try:
        for i in range(1, steps + 1):
            await anyio.sleep(delay)
            if ctx is not None:
                await ctx.report_progress(i, steps, f"step {i} of {steps}")
    except anyio.get_cancelled_exc_class():
        STATS.record_cancellation(tool)
        raise


@server.tool()
def add(a: float, b: float) -> float:
    """Add two numbers."""
    STATS.calls += 1
    return a + b


@server.tool()
async def slow_count(ctx: Context, steps: int = 5, delay: float = 0.2) -> str:
    """Count to `steps`, one step every `delay` seconds, reporting progress after each."""
    await _cancellable("slow_count", steps, delay, ctx)
    return f"counted to {steps}"


@server.tool()
async def sleep(seconds: float) -> str:
    """Sleep for `seconds` without reporting progress (useful to try timeouts)."""
    await _cancellable("sleep", 1, seconds, None)
    return f"slept {seconds} s"


@server.tool()
def fail(message: str = "this tool always fails") -> str:
    """Fail on purpose: the caller gets an error result carrying `message`."""
    STATS.calls += 1
    raise ToolError(message)


@server.tool()
def delete_everything(confirm: str = "yes") -> str:
    """Pretend to delete everything. Harmless; put it under `require_approval` to try approvals."""
    STATS.calls += 1
    return "pretended to delete everything"


class Preferences(BaseModel):
    name: str
    favourite_colour: str


def ask_preferences() -> Elicit[Preferences]:
    return Elicit("Who are you, and which colour do you like best?", Preferences)


@server.tool()
def ask_user(answer: Annotated[ElicitationResult[Preferences], Resolve(ask_preferences)]) -> str:
    """Ask the user for their name and favourite colour (MCP elicitation)."""
    # `Resolve(...)` asks the way the client's protocol era needs: a mid-call `elicitation/create`
    # request (2025) or an `input_required` result that the client answers and retries (2026).
    STATS.calls += 1
    if isinstance(answer, AcceptedElicitation):
        return f"{answer.data.name} likes {answer.data.favourite_colour}"
    return "declined" if isinstance(answer, DeclinedElicitation) else "cancelled"


def extra() -> str:
    """A tool that comes and goes with `toggle_extra_tool`."""
    return "extra tool called"


@server.tool()
async def toggle_extra_tool(ctx: Context) -> str:
    """Add the tool `extra`, or remove it if present, and tell clients the tool list changed."""
    STATS.calls += 1
    present = any(tool.name == "extra" for tool in await server.list_tools())
    if present:
        server.remove_tool("extra")
    else:
        server.add_tool(extra)
    await ctx.session.send_tool_list_changed()  # clients of the 2025 protocol (initialize handshake)
    await ctx.notify_tools_changed()  # clients of the 2026 protocol (subscriptions/listen)
    return "removed extra" if present else "added extra"


@server.tool()
async def stats(min_cancelled: int = 0) -> dict[str, int]:
    """Tool calls started and calls cancelled so far; waits (up to 10 s) for `min_cancelled` cancellations."""
    # A cancellation reaches the tool a moment after the client gives up: tests wait here for it.
    with anyio.move_on_after(10):
        await STATS.wait_cancelled(min_cancelled)
    return {"calls": STATS.calls, "cancelled": STATS.cancelled}


@server.tool()
def env_names() -> list[str]:
    """The names (not values) of the environment variables this server sees.

    haip-runtime passes a stdio server only `[mcp.stdio] inherit_env` and the server's own `env`,
    never its whole environment, where secrets live.
    """
    return sorted(os.environ)


@server.tool()
def pid() -> int:
    """The server's process id (tests use it to kill the server mid-call)."""
    return os.getpid()


async def serve_http(host: str, port: int) -> None:
    """Serve streamable HTTP at http://HOST:PORT/mcp; print the address once the socket listens."""
    # IPPROTO_TCP, not 0: asyncio turns Nagle off only on sockets that say they are TCP; without it a
    # response waits ~40 ms for a delayed ACK.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    bound_port = sock.getsockname()[1]
    config = uvicorn.Config(server.streamable_http_app(host=host), log_level="warning", lifespan="on")
    shown_host = f"[{host}]" if ":" in host else host
    print(f"listening on http://{shown_host}:{bound_port}/mcp", flush=True)
    try:
        await uvicorn.Server(config).serve(sockets=[sock])
    finally:
        sock.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--http", action="store_true", help="serve streamable HTTP instead of stdio")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port; 0 picks a free one")
    args = parser.parse_args(argv)
    if args.http:
        anyio.run(serve_http, args.host, args.port)
    else:
        server.run()


if __name__ == "__main__":
    main()
