"""The built-in ``operator`` agent: run MCP tools by hand, no LLM needed.

``/help``, ``/tools``, and ``/call <tool> <json arguments>``; the call's progress and result
show up as TOOL_* events like any agent's call. Handy for operators checking a deployment and
for demos. ``run_command`` is the same commands for other agents (the ``assistant`` uses it).
"""

from __future__ import annotations

import json

from haip_runtime.agents.api import Agent, NoOptions, Turn

COMMANDS = """  /tools                     list the tools I can use
  /call <tool> [json args]   call a tool, e.g. /call demo.add {"a": 2, "b": 3}
  /help                      this text"""
HELP = f"I run MCP tools for you. Commands:\n{COMMANDS}"


async def run_command(turn: Turn, help_text: str = HELP) -> bool:
    """Carry out ``/tools``, ``/call`` or ``/help`` if ``turn.text`` is one; ``False`` if it is not."""
    command, _, rest = turn.text.strip().partition(" ")
    if command == "/tools":
        await turn.say(OperatorAgent._tool_listing(turn))
    elif command == "/call":
        await OperatorAgent._call(turn, rest.strip())
    elif command == "/help":
        await turn.say(help_text)
    else:
        return False
    return True


class OperatorAgent(Agent[NoOptions]):
    name = "operator"
    description = "Runs MCP tools on request: /tools, /call <tool> <json>. Needs no LLM."
    concurrent_turns = None  # each command stands alone: several tools may run at once, as a shell's jobs

    async def on_message(self, turn: Turn) -> None:
        if not await run_command(turn):
            await turn.say(f"I only run tools. {HELP}")

    @staticmethod
    def _tool_listing(turn: Turn) -> str:
        tools = turn.tools
        if not tools:
            return "No tools are available right now (is an MCP server configured and connected?)."
        return "\n".join(f"- {tool.name}: {tool.description}" for tool in tools)

    @staticmethod
    async def _call(turn: Turn, rest: str) -> None:
        name, _, raw_args = rest.partition(" ")
        if not name:
            await turn.say("Usage: /call <tool> [json args]")
            return
        try:
            arguments = json.loads(raw_args) if raw_args.strip() else {}
        except json.JSONDecodeError as exc:
            await turn.say(f"The arguments are not JSON: {exc.msg} at column {exc.colno}.")
            return
        if not isinstance(arguments, dict):
            await turn.say('The arguments must be a JSON object, like {"a": 1}.')
            return
        full_name = OperatorAgent._resolve(turn, name)
        result = await turn.call_tool(full_name, arguments)
        if result.ok:
            shown = result.text or json.dumps(result.structured_content)
            await turn.say(f"{full_name} returned: {shown}")
        else:
            await turn.say(f"{full_name} ended {result.status}: {result.text}")

    @staticmethod
    def _resolve(turn: Turn, name: str) -> str:
        """Accept a bare tool name when exactly one server has it."""
        if "." in name:
            return name
        matches = [tool.name for tool in turn.tools if tool.name.split(".", 1)[1] == name]
        return matches[0] if len(matches) == 1 else name
