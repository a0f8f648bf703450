"""``ScriptedLLM``: a provider that plays back answers written in a test, for agents' tool loops without a network.

    llm = ScriptedLLM([
        ScriptedLLM.call("tickets.search", {"q": "printer"}),   # 1st request: the model calls a tool
        "Ticket 42 is about your printer.",                      # 2nd request: it answers
    ])

Each request takes the next answer: a string (streamed word by word), a ``ToolCall``, or a list of
strings and ``ToolCall``s. ``requests`` records what each request was given (history, tool names,
instructions), so a test can check the model saw the tool's result.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio.lowlevel

from haip_runtime.exceptions import LlmError
from haip_runtime.llm.provider import Delta, Provider, ToolCall, ToolLike, Usage
from haip_runtime.protocol.envelope import new_id
from haip_runtime.protocol.events import LlmErrorCode

if TYPE_CHECKING:
    from haip_runtime.llm.provider import HistoryEntry

Answer = str | ToolCall | LlmError | Sequence[str | ToolCall]


@dataclass(frozen=True)
class ScriptedRequest:
    """What one request gave the model."""

    history: tuple[HistoryEntry, ...]
    tools: tuple[str, ...]
    instructions: str | None


class ScriptedLLM(Provider):
    """Plays back ``answers`` in order, one per request; an ``LlmError`` in the list is raised instead."""

    def __init__(self, answers: Iterable[Answer], *, model: str = "scripted") -> None:
        self.id = "scripted"
        self.model = model
        self._answers = list(answers)
        self.requests: list[ScriptedRequest] = []

    @staticmethod
    def call(name: str, arguments: dict[str, Any] | None = None) -> ToolCall:
        """A tool call for the script (``name`` is ``server.tool``)."""
        return ToolCall(new_id(), name, arguments if arguments is not None else {}, "")

    async def stream(
        self,
        history: Sequence[HistoryEntry],
        *,
        tools: Sequence[ToolLike] = (),
        instructions: str | None = None,
    ) -> AsyncGenerator[Delta, None]:
        self.requests.append(ScriptedRequest(tuple(history), tuple(t.name for t in tools), instructions))
        if not self._answers:
            raise LlmError(LlmErrorCode.LLM_BAD_REQUEST, f"the script has no answer for request {len(self.requests)}")
        answer = self._answers.pop(0)
        if isinstance(answer, LlmError):
            raise answer
        items = [answer] if isinstance(answer, str | ToolCall) else list(answer)
        words = 0
        for item in items:
            if isinstance(item, ToolCall):
                yield Delta(tool_call=item)
                continue
            for index, word in enumerate(item.split(" ")):
                words += 1
                await anyio.lowlevel.checkpoint()
                yield Delta(text=word if index == 0 else " " + word)
        yield Delta(usage=Usage(sum(len(e.text.split()) for e in history), words))
        yield Delta(stop_reason="tool_calls" if any(isinstance(i, ToolCall) for i in items) else "stop")
