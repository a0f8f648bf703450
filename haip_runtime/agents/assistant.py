"""The built-in ``assistant`` agent: an LLM that answers, calling the agent's MCP tools as it needs them.

Each user message starts a tool loop: the model gets the conversation (``turn.history``, tool calls
and results included) and ``turn.tools``; its text is streamed to the members, each tool call it
asks for runs through the tool proxy (so humans see TOOL_CALL/UPDATE/DONE and approve where
configured), the results go back to it, and it goes on until it answers without calling a tool
or reaches ``max_steps``. The operator's ``/help``, ``/tools`` and ``/call`` work too.
"""

from __future__ import annotations

from contextlib import AsyncExitStack, aclosing

from pydantic import BaseModel, ConfigDict, Field

from haip_runtime.agents.api import Agent, MessageStream, Turn
from haip_runtime.agents.operator import COMMANDS, run_command
from haip_runtime.llm.provider import HistoryEntry, ToolCall, Usage
from haip_runtime.protocol.envelope import new_id
from haip_runtime.protocol.events import ToolOutcome

DEFAULT_INSTRUCTIONS = "You are a helpful assistant. Answer briefly. Use a tool only when it helps."
#: Ends an answer the model stopped at its ``max_tokens`` (MESSAGE_END then says ``stop_reason: "length"``).
CUT_MARKER = " … [cut: the answer reached the model's max_tokens]"
HELP = f"Talk to me in plain words; I answer with my language model and may use tools. Commands:\n{COMMANDS}"


class AssistantOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_steps: int = Field(default=8, ge=1, le=50)
    """Model requests per user message; each may call tools. The turn ends with a note past this."""
    max_history_entries: int = Field(default=40, ge=1)
    """Only the latest this-many history entries are sent to the model (small models have small contexts)."""


class AssistantAgent(Agent[AssistantOptions]):
    name = "assistant"
    description = "Answers with an LLM and calls its MCP tools; /tools and /call run tools by hand."
    Options = AssistantOptions

    async def on_message(self, turn: Turn) -> None:
        if await run_command(turn, HELP):
            return
        spent = Usage()
        for _ in range(self.options.max_steps):
            calls, spent = await self._step(turn, spent)
            if not calls:
                return
            for call in calls:
                await self._run(turn, call)
        await turn.say(f"(I stopped after {self.options.max_steps} model requests without a final answer.)")

    async def _step(self, turn: Turn, spent: Usage) -> tuple[list[ToolCall], Usage]:
        """One model request: stream its text as one message; return the tool calls it asked for."""
        history = turn.history[-self.options.max_history_entries :]
        calls: list[ToolCall] = []
        out: MessageStream | None = None
        async with AsyncExitStack() as stack:
            deltas = await stack.enter_async_context(
                aclosing(
                    turn.llm.stream(history, tools=turn.tools, instructions=self.instructions or DEFAULT_INSTRUCTIONS)
                )
            )
            async for delta in deltas:
                if delta.text:
                    if out is None:
                        out = await stack.enter_async_context(turn.stream())
                    await out.write(delta.text)
                if delta.tool_call is not None:
                    calls.append(delta.tool_call)
                if delta.usage is not None:
                    spent = spent + delta.usage
                if delta.stop_reason is not None and out is not None:
                    out.stop_reason = delta.stop_reason
            if out is not None:
                if out.stop_reason == "length":  # cut mid-sentence: say so where everyone reads it
                    await out.write(CUT_MARKER)
                out.tokens, spent = spent.output_tokens, Usage()
        return calls, spent

    @staticmethod
    async def _run(turn: Turn, call: ToolCall) -> None:
        if call.arguments is None:  # the model wrote arguments that are not a JSON object: tell it, run nothing
            call_id = new_id()
            problem = f"INVALID_ARGUMENTS: the arguments must be a JSON object, not {call.raw_arguments[:200]!r}"
            turn.record(
                HistoryEntry("tool_call", turn.agent, "", call_id, call_id=call_id, tool=call.name, arguments={})
            )
            turn.record(
                HistoryEntry(
                    "tool_result",
                    call.name,
                    problem,
                    call_id,
                    call_id=call_id,
                    tool=call.name,
                    status=ToolOutcome.ERROR,
                )
            )
            return
        await turn.call_tool(call.name, call.arguments)  # records the call and its result in the history
