"""In-process MCP servers for tests/bridge/test_inprocess.py, named in configs as
`tests.support.python_servers:<name>`."""

from __future__ import annotations

import argparse
import sys

from mcp.server.mcpserver import AcceptedElicitation, Context, MCPServer
from pydantic import BaseModel

server = MCPServer("asking")


class Name(BaseModel):
    name: str


@server.tool()
async def ask_name(ctx: Context, who: str) -> str:
    """Ask the user for a name with `ctx.elicit` (a mid-call request: needs the 2025 protocol in-process)."""
    answer = await ctx.elicit(f"What is the name of {who}?", Name)
    return f"{who} is {answer.data.name}" if isinstance(answer, AcceptedElicitation) else f"{who}: {answer.action}"


def make_server() -> MCPServer:
    """A factory: haip-runtime calls it once per connection."""
    made = MCPServer("made")

    @made.tool()
    def hello(who: str = "world") -> str:
        """Say hello."""
        return f"hello, {who}"

    @made.tool()
    def parse_args(line: str) -> str:
        """Parse `line` like a command line; argparse exits on a bad one (SystemExit)."""
        parser = argparse.ArgumentParser(prog="parse_args", exit_on_error=False)
        parser.add_argument("--count", type=int, required=True)
        return str(parser.parse_args(line.split()).count)

    @made.tool()
    async def leave() -> str:
        """Call sys.exit() from a coroutine."""
        sys.exit(3)

    return made


not_a_server = 42


def returns_none() -> None:
    return None


def broken_factory() -> MCPServer:
    raise RuntimeError("no database")


huge = MCPServer("huge")


class Blob(BaseModel):
    data: str


@huge.tool()
def blob(megabytes: float = 10) -> Blob:
    """A result of ``megabytes`` MB, as text and again as structured content."""
    return Blob(data="b" * int(megabytes * 1024 * 1024))


@huge.tool()
async def loud_progress(ctx: Context) -> str:
    """Reports progress with a 100,000-character message."""
    await ctx.report_progress(1, 2, "P" * 100_000)
    return "reported"


@huge.tool()
async def loud_question(ctx: Context) -> str:
    """Asks the user with a 100,000-character question."""
    answer = await ctx.elicit("Q" * 100_000, Name)
    return f"asked: {answer.action}"
