"""The LLM seam: ``Provider`` (what ``turn.llm`` is), and the values it takes and streams.

A provider turns a conversation (``HistoryEntry``s: user and agent messages, tool calls and tool
results) plus the MCP tools an agent may call into a stream of ``Delta``s: text as it comes, each
tool call the model asks for (complete, with its ``server.tool`` name), token usage, and why the
model stopped. Vendor formats live in ``openai.py``, ``anthropic.py`` and ``local.py``; none of
them is seen from here.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncGenerator, Iterable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from haip_runtime.protocol.events import ToolOutcome


@dataclass(frozen=True)
class HistoryEntry:
    """One entry of the conversation, in order: a message, or an agent's tool call and its result.

    ``role`` ``user`` / ``agent``: a message (``text``, ``message_id``). ``tool_call``: ``author``
    (an agent) called ``tool`` with ``arguments``. ``tool_result``: how call ``call_id`` ended
    (``status``, a ``ToolOutcome``: ``OK``/``ERROR``/``CANCELLED``; ``text`` is what the tool returned, or the error).
    ``turn.call_tool`` records both tool entries, so an LLM sees them on its next request.
    """

    role: Literal["user", "agent", "tool_call", "tool_result"]
    author: str
    text: str
    message_id: str
    call_id: str | None = None
    tool: str | None = None
    arguments: dict[str, Any] | None = None
    status: str | None = None


class ToolLike(Protocol):
    """A tool the model may call: ``turn.tools`` items (``ToolView``) and ``ToolSpec`` both fit."""

    @property
    def name(self) -> str: ...

    @property
    def description(self) -> str: ...

    @property
    def input_schema(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class ToolSpec:
    """A tool described by hand (``name`` is what the model's call will carry back)."""

    name: str
    description: str = ""
    input_schema: dict[str, Any] = field(default_factory=lambda: {"type": "object"})


@dataclass(frozen=True)
class ToolCall:
    """A tool call the model asked for. ``arguments`` is ``None`` when the model wrote invalid JSON."""

    id: str
    name: str
    """The tool's own name (``server.tool``), mapped back from the name the vendor saw."""
    arguments: dict[str, Any] | None
    raw_arguments: str = ""


@dataclass(frozen=True)
class Usage:
    """Tokens a request cost: what the model read and what it wrote (``+`` adds two requests' usage)."""

    input_tokens: int = 0
    output_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.input_tokens + other.input_tokens, self.output_tokens + other.output_tokens)


@dataclass(frozen=True)
class Delta:
    """One piece of a streamed answer. Exactly one field is set; ``text`` is ``""`` otherwise."""

    text: str = ""
    tool_call: ToolCall | None = None
    usage: Usage | None = None
    stop_reason: str | None = None
    """Why the model stopped: ``stop``, ``tool_calls``, ``length`` (vendor words are normalised)."""


@dataclass(frozen=True)
class Reply:
    """A whole answer, as ``Provider.complete`` collects it."""

    text: str
    tool_calls: tuple[ToolCall, ...]
    usage: Usage
    stop_reason: str | None


class Provider:
    """An LLM: subclass and implement ``stream``. One instance serves every transaction of its agents.

    Errors are ``LlmError`` with a code (``LlmErrorCode``) and a message fit for the user; a turn
    that raises one ends with ``RUN_ERROR {code, message}``. Cancelling the caller stops the model.
    """

    id: str = ""
    """The `[llm.<id>]` name."""
    model: str = ""

    def stream(
        self,
        history: Sequence[HistoryEntry],
        *,
        tools: Sequence[ToolLike] = (),
        instructions: str | None = None,
    ) -> AsyncGenerator[Delta, None]:
        """Stream the model's next answer to ``history``, offering it ``tools`` (``turn.tools``)."""
        raise NotImplementedError

    async def complete(
        self,
        history: Sequence[HistoryEntry],
        *,
        tools: Sequence[ToolLike] = (),
        instructions: str | None = None,
    ) -> Reply:
        """The whole answer at once (``stream``, collected)."""
        parts: list[str] = []
        calls: list[ToolCall] = []
        usage = Usage()
        stop: str | None = None
        async with aclosing(self.stream(history, tools=tools, instructions=instructions)) as deltas:
            async for delta in deltas:
                parts.append(delta.text)
                if delta.tool_call is not None:
                    calls.append(delta.tool_call)
                if delta.usage is not None:
                    usage = usage + delta.usage
                stop = delta.stop_reason or stop
        return Reply("".join(parts), tuple(calls), usage, stop)

    async def aclose(self) -> None:
        """Release connections or the loaded model (the runtime calls it at shutdown)."""


# --- tool names ------------------------------------------------------------------------------------

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
#: OpenAI and Anthropic both accept ``^[a-zA-Z0-9_-]{1,64}$``.
MAX_TOOL_NAME = 64


class ToolNames:
    """Maps ``server.tool`` names to names a vendor accepts (``server_tool``) and back, without collisions."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        self._to_vendor: dict[str, str] = {}
        self._from_vendor: dict[str, str] = {}
        for name in names:
            self.vendor(name)

    def vendor(self, name: str) -> str:
        """The vendor-safe name of ``name`` (stable for this mapping)."""
        known = self._to_vendor.get(name)
        if known is not None:
            return known
        base = _UNSAFE.sub("_", name)[:MAX_TOOL_NAME] or "tool"
        candidate, n = base, 1
        while candidate in self._from_vendor:
            n += 1
            suffix = f"_{n}"
            candidate = base[: MAX_TOOL_NAME - len(suffix)] + suffix
        self._to_vendor[name], self._from_vendor[candidate] = candidate, name
        return candidate

    def original(self, vendor_name: str) -> str:
        """The ``server.tool`` name a vendor's call refers to (unknown names pass through unchanged)."""
        return self._from_vendor.get(vendor_name, vendor_name)


def parse_arguments(raw: str) -> dict[str, Any] | None:
    """A tool call's JSON arguments, or ``None`` if they are not a JSON object ("" means ``{}``)."""
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


# --- the conversation, grouped the way chat APIs want it ------------------------------------------


@dataclass
class UserText:
    text: str


@dataclass
class AgentText:
    """One model turn: its text and the tool calls it made (``(call_id, name, arguments)``)."""

    text: str
    calls: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)


@dataclass
class ToolResults:
    """The results of the calls of the preceding ``AgentText``: ``(call_id, text, is_error)``."""

    results: list[tuple[str, str, bool]] = field(default_factory=list)


Exchange = UserText | AgentText | ToolResults


def conversation(history: Sequence[HistoryEntry]) -> list[Exchange]:
    """Group history into alternating exchanges; tool calls without a result (and the reverse) are dropped,
    since every vendor refuses them."""
    answered = {e.call_id for e in history if e.role == "tool_result"}
    asked = {e.call_id for e in history if e.role == "tool_call" and e.call_id in answered}
    out: list[Exchange] = []
    for entry in history:
        last = out[-1] if out else None
        if entry.role == "user":
            if isinstance(last, UserText):
                last.text += "\n\n" + entry.text
            else:
                out.append(UserText(entry.text))
        elif entry.role == "agent":
            if not entry.text:
                continue
            if isinstance(last, AgentText) and not last.calls:
                last.text += "\n\n" + entry.text
            else:
                out.append(AgentText(entry.text))
        elif entry.role == "tool_call" and entry.call_id in asked:
            if not isinstance(last, AgentText):
                last = AgentText("")
                out.append(last)
            last.calls.append((str(entry.call_id), str(entry.tool), dict(entry.arguments or {})))
        elif entry.role == "tool_result" and entry.call_id in asked:
            if not isinstance(last, ToolResults):
                last = ToolResults()
                out.append(last)
            last.results.append((str(entry.call_id), entry.text, entry.status != ToolOutcome.OK))
    return out
