"""An in-memory harness for agent plugins: run turns with fake tools and a scripted LLM, no server or network.

    llm = ScriptedLLM([ScriptedLLM.call("tickets.search", {"q": "printer"}), "Ticket 42 it is."])
    async with AgentHarness(Helpdesk, tools={"tickets.search": search}, llm=llm) as agent:
        turn = await agent.send("my printer is on fire")
        assert turn.status == "OK" and "42" in turn.text
        assert turn.tool_calls[0]["tool"] == "tickets.search"

The agent runs in a real transaction with the real tool proxy, so what a turn records is what a
HAIP client would receive: RUN_*, MESSAGE_START/PART/END and TOOL_CALL/UPDATE/DONE events. A fake
tool's return value becomes the result a real MCP server (the SDK's ``MCPServer``) would give.
"""

from haip_runtime.bridge.models import ToolResult
from haip_runtime.exceptions import FakeToolError
from haip_runtime.llm.scripted import ScriptedLLM
from haip_runtime.testing.fakes import FakeToolContext, ToolFunc
from haip_runtime.testing.harness import AgentHarness, TurnResult

__all__ = ["AgentHarness", "FakeToolContext", "FakeToolError", "ScriptedLLM", "ToolFunc", "ToolResult", "TurnResult"]
