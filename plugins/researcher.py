"""A template for LLM agents: look something up with an MCP tool, then let the LLM answer from it.

Copy this file (and ``test_researcher.py`` beside it) to start your own agent. Enable it in haip.toml::

    [agents.researcher]
    plugin = "plugins/researcher.py:Researcher"
    llm = "local"                    # one of your [llm.*] providers
    mcp_servers = ["docs"]           # where `search_tool` lives
    instructions = "Answer from the search results only; say so when they do not help."
    options = { search_tool = "docs.search", query_argument = "query" }

Every step is visible to the humans in the conversation: the search shows up as TOOL_CALL,
TOOL_UPDATE (progress) and TOOL_DONE, the answer as MESSAGE_START/PART/END with the tokens spent.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from haip_runtime import Agent, Turn

DEFAULT_INSTRUCTIONS = "Answer the user's question from the tool results in the conversation. Be brief."


class ResearcherOptions(BaseModel):
    # extra="forbid": a misspelt key in [agents.researcher.options] stops `haip-runtime check`.
    model_config = ConfigDict(extra="forbid", frozen=True)

    search_tool: str = "docs.search"
    """The MCP tool (`server.tool`) that finds material for an answer."""
    query_argument: str = "query"
    """The name of that tool's argument that takes the user's question."""


class Researcher(Agent[ResearcherOptions]):
    name = "researcher"
    description = "Searches with an MCP tool, then answers from what it found using its LLM."
    Options = ResearcherOptions

    async def on_message(self, turn: Turn) -> None:
        # 1. The tool call: members see it live; its result is also added to turn.history.
        found = await turn.call_tool(self.options.search_tool, {self.options.query_argument: turn.text})
        if not found.ok:  # a tool error or a refused approval is a value, not an exception
            await turn.say(f"I could not search ({found.status}): {found.text}")
            return
        # 2. The answer: the LLM sees the whole conversation, the search and its result included.
        async with turn.stream() as out:
            async for delta in turn.llm.stream(turn.history, instructions=self.instructions or DEFAULT_INSTRUCTIONS):
                await out.write(delta.text)
                if delta.usage is not None:
                    out.tokens = delta.usage.output_tokens  # sent on MESSAGE_END
