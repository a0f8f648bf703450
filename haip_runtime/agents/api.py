"""The agent plugin API: ``Agent`` (subclass it), ``Turn`` (one user message to answer), ``MessageStream``.

Agents never see sockets, sequencing or replay. The runtime builds one agent instance per
transaction, calls its hooks, and turns what a hook does (``say``, ``stream``, ``call_tool``)
into HAIP events for every member. ``Emit`` is the narrow door back into the transaction.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

import anyio.lowlevel
from pydantic import BaseModel, ConfigDict

from haip_runtime.config import AgentConfig
from haip_runtime.permissions import UNRESTRICTED, Permissions
from haip_runtime.protocol.envelope import new_id
from haip_runtime.protocol.events import Channel, EventType

if TYPE_CHECKING:
    from haip_runtime.tools import ToolCallResult, ToolProxy, ToolView


class Emit(Protocol):
    """Publish one event into the agent's transaction, stamped with the current run."""

    def __call__(self, type: str, payload: dict[str, Any] | str, *, channel: str = Channel.AGENT) -> None: ...


class NoOptions(BaseModel):
    """The options model of an agent that takes none."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class HistoryEntry:
    """One message of the conversation, in order. ``role`` is who spoke: a user or an agent."""

    role: Literal["user", "agent"]
    author: str
    text: str
    message_id: str


@dataclass(frozen=True)
class AgentContext:
    """What an agent instance knows about where it runs."""

    name: str
    transaction_id: str
    started_by: str
    params: dict[str, Any]
    config: AgentConfig
    options: Any = field(default_factory=NoOptions)


class Agent:
    """Base class of agent plugins. Override ``on_message``; the other hooks are optional.

    ``Options`` (a pydantic model) is validated from ``[agents.<name>.options]`` at start-up;
    ``input_schema`` (a pydantic model), if set, validates object MESSAGE payloads.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type[BaseModel]] = NoOptions
    input_schema: ClassVar[type[BaseModel] | None] = None

    def __init__(self, context: AgentContext) -> None:
        self.context = context
        self.options: Any = context.options

    async def on_start(self, turn: Turn) -> None:
        """The transaction started. ``turn.text`` is empty; you may ``say`` a greeting."""

    async def on_message(self, turn: Turn) -> None:
        """A user sent a message. Answer with ``turn.say`` or ``turn.stream``."""
        raise NotImplementedError(f"{type(self).__name__} must implement on_message")

    async def on_end(self, reason: str | None) -> None:
        """The transaction ended (by a member, or the runtime shutting down)."""


class MessageStream:
    """One agent message sent in parts: MESSAGE_START, MESSAGE_PART..., MESSAGE_END."""

    def __init__(self, emit: Emit, author: str) -> None:
        self.message_id = new_id()
        self._emit = emit
        self._author = author
        self._parts: list[str] = []
        self._started = False

    @property
    def text(self) -> str:
        """Everything written so far."""
        return "".join(self._parts)

    async def write(self, text: str) -> None:
        if not text:
            return
        self._open()
        self._parts.append(text)
        self._emit(EventType.MESSAGE_PART, {"message_id": self.message_id, "text": text})
        await anyio.lowlevel.checkpoint()

    def _open(self) -> None:
        if not self._started:
            self._started = True
            self._emit(EventType.MESSAGE_START, {"message_id": self.message_id, "author": self._author})

    def close(self) -> None:
        self._open()
        self._emit(EventType.MESSAGE_END, {"message_id": self.message_id})


class Turn:
    """One user message for an agent to answer, and the means to answer it."""

    def __init__(
        self,
        *,
        agent: str,
        transaction_id: str,
        run_id: str,
        text: str,
        payload: dict[str, Any],
        author: str,
        history: Sequence[HistoryEntry],
        emit: Emit,
        on_said: Callable[[HistoryEntry], None],
        tools: ToolProxy | None = None,
        tool_servers: Sequence[str] = (),
        permissions: Permissions = UNRESTRICTED,
    ) -> None:
        self.agent = agent
        self.transaction_id = transaction_id
        self.run_id = run_id
        self.text = text
        self.payload = payload
        self.author = author
        self.history = tuple(history)
        self._emit = emit
        self._on_said = on_said
        self._tools = tools
        self._tool_servers = tuple(tool_servers)
        self._permissions = permissions

    async def say(self, text: str) -> str:
        """Send one whole message; returns its message id."""
        async with self.stream() as out:
            await out.write(text)
        return out.message_id

    @asynccontextmanager
    async def stream(self) -> AsyncIterator[MessageStream]:
        """Send a message in parts. Clients that cannot take parts get one MESSAGE at the end."""
        out = MessageStream(self._emit, self.agent)
        try:
            yield out
        finally:
            out.close()
            self._on_said(HistoryEntry("agent", self.agent, out.text, out.message_id))

    @property
    def tools(self) -> list[ToolView]:
        """The MCP tools this agent may call right now (names are ``server.tool``)."""
        return [] if self._tools is None else self._tools.visible_tools(self._tool_servers, self._permissions)

    async def call_tool(self, name: str, arguments: dict[str, Any] | None = None) -> ToolCallResult:
        """Call an MCP tool; members see TOOL_CALL, TOOL_UPDATE... and TOOL_DONE.

        A tool error or a refused approval is a value (``result.status``); cancellation is anyio
        cancellation.
        """
        if self._tools is None:
            raise RuntimeError("this runtime has no tool proxy")
        return await self._tools.call(
            name,
            arguments or {},
            transaction_id=self.transaction_id,
            run_id=self.run_id,
            allowed_servers=self._tool_servers,
            caller=self.agent,
            emit=self._emit,
            permissions=self._permissions,
        )
