"""The agent plugin API: ``Agent`` (subclass it), ``Turn`` (one user message to answer), ``MessageStream``.

Agents never see sockets, sequencing or replay. The runtime builds one agent instance per
transaction, calls its hooks, and turns what a hook does (``say``, ``stream``, ``call_tool``,
``llm``) into HAIP events for every member. A turn gets what it needs from the transaction as one
``TurnServices`` bundle; ``Emit`` (from the tool proxy) is the narrow door back
into the transaction; ``HistoryEntry`` (from the LLM seam) is how the conversation reads to a model.
"""

from __future__ import annotations

import base64
import logging
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

from haip_runtime.auth.permissions import UNRESTRICTED, Permissions
from haip_runtime.config.models import AgentConfig
from haip_runtime.exceptions import LlmError
from haip_runtime.llm.provider import HistoryEntry, Provider
from haip_runtime.observability import tracing
from haip_runtime.protocol import fastjson
from haip_runtime.protocol.codec import DEFAULT_MAX_FRAME_BYTES, ENVELOPE_ROOM
from haip_runtime.protocol.envelope import new_id
from haip_runtime.protocol.events import Channel, EventType, LlmErrorCode, ToolOutcome
from haip_runtime.tools.proxy import Emit, ToolCallResult, ToolProxy, ToolView

logger = logging.getLogger(__name__)

#: How a message cut at ``TurnServices.max_message_bytes`` ends.
CUT_NOTE = " … [cut: the message reached the most one frame holds, server.max_frame_bytes]"


def _json_size(text: str) -> int:
    """Bytes of ``text`` as a JSON string's content (escapes and UTF-8), without its quotes."""
    return fastjson.size(text) - 2


__all__ = [
    "Agent",
    "AgentContext",
    "AudioClip",
    "Emit",
    "HistoryEntry",
    "MessageStream",
    "NoOptions",
    "Turn",
    "TurnServices",
]


class NoOptions(BaseModel):
    """The options model of an agent that takes none."""

    model_config = ConfigDict(extra="forbid", frozen=True)


#: An agent's ``Options`` model: ``class Helpdesk(Agent[HelpdeskOptions])`` types ``self.options``.
OptionsT = TypeVar("OptionsT", bound=BaseModel)


@dataclass(frozen=True)
class AgentContext:
    """What an agent instance knows about where it runs (``self.context`` in a plugin).

    ``name`` is the agent's name in haip.toml; ``transaction_id`` and ``started_by`` (a user)
    identify its conversation; ``params`` are TRANSACTION_START's params; ``config`` is its
    ``[agents.<name>]`` table (``config.instructions``, ``config.mcp_servers``...); ``options`` its
    validated ``Options``; ``llm`` the provider named by ``agents.<name>.llm`` (or ``None``).
    """

    name: str
    transaction_id: str
    started_by: str
    params: dict[str, Any]
    config: AgentConfig
    options: Any = field(default_factory=NoOptions)
    llm: Provider | None = None


@dataclass(frozen=True)
class TurnServices:
    """What a turn takes from its transaction, as one bundle (built by ``Transaction._turn``)."""

    emit: Emit
    history: Sequence[HistoryEntry]
    """The transaction's history, live: a turn sees the entries added while it runs."""
    record: Callable[[HistoryEntry], None]
    """Append an entry to that history."""
    tools: ToolProxy | None = None
    tool_servers: Sequence[str] = ()
    permissions: Permissions = UNRESTRICTED
    """The permissions of the user the turn answers; tool calls are checked against them."""
    llm: Provider | None = None
    pace: Callable[[], Awaitable[None] | None] | None = None
    """Called after each streamed part: something to wait for while the transaction is far behind the
    stream (in a cluster, its parts on their way through the bus), else ``None``."""
    max_message_bytes: int = DEFAULT_MAX_FRAME_BYTES - ENVELOPE_ROOM
    """The most bytes of one message's text, as JSON: what a frame holds (``server.max_frame_bytes``) less
    room for the envelope, so that its parts, and the one ``MESSAGE`` clients without parts get, fit."""


def concurrent_turns(agent: Agent[Any]) -> int | None:
    """How many turns of ``agent`` may run at once in one conversation (``None``: no bound of its own):
    ``agents.<name>.concurrent_turns`` (0: no bound) if set, else its class's ``concurrent_turns``."""
    configured = agent.context.config.concurrent_turns
    if configured is None:
        return type(agent).concurrent_turns
    return configured or None


class Agent(Generic[OptionsT]):
    """Base class of agent plugins. Override ``on_message``; the other hooks are optional.

    ``Options`` (a pydantic model) is validated from ``[agents.<name>.options]`` at start-up and
    becomes ``self.options``; name the same model as the type argument (``Agent[MyOptions]``, or
    ``Agent[NoOptions]`` for none) so a type checker knows it. ``input_schema`` (a pydantic model),
    if set, validates object MESSAGE payloads with fields of their own (not plain text: a string, or an
    object of only ``text``, ``author`` and ``message_id``).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type[BaseModel]] = NoOptions
    input_schema: ClassVar[type[BaseModel] | None] = None
    concurrent_turns: ClassVar[int | None] = 1
    """How many of this agent's turns may run at once in one conversation: one, by default, so messages
    typed faster than it answers wait their turn and are answered in order, each turn seeing the answers
    before it. ``None``: as many as the session's ``max_concurrent_runs`` (an agent whose turns are
    independent, such as ``echo``). ``agents.<name>.concurrent_turns`` overrides it."""

    def __init__(self, context: AgentContext) -> None:
        self.context = context
        self.options: OptionsT = context.options

    @property
    def instructions(self) -> str:
        """``agents.<name>.instructions`` from haip.toml (``""`` if unset): the system prompt of an LLM agent."""
        return self.context.config.instructions or ""

    async def on_start(self, turn: Turn) -> None:
        """The transaction started. ``turn.text`` is empty; you may ``say`` a greeting."""

    async def on_message(self, turn: Turn) -> None:
        """A user sent a message. Answer with ``turn.say`` or ``turn.stream``."""
        raise NotImplementedError(f"{type(self).__name__} must implement on_message")

    async def on_end(self, reason: str | None) -> None:
        """The transaction ended (by a member, or the runtime shutting down)."""

    async def on_audio(self, turn: Turn) -> None:
        """A user sent audio (``AUDIO``/``AUDIO_CHUNK``): ``turn.audio`` is the clip. Answer with
        ``turn.say`` or ``turn.send_audio``. Agents that do not override this get no audio turns."""


@dataclass(frozen=True)
class AudioClip:
    """Audio a user sent: its bytes (decoded from base64, or the binary frame), type and id."""

    data: bytes
    mime: str
    message_id: str
    author: str
    duration_ms: int | None = None


@types.coroutine
def _pass_turn() -> Generator[None, None, None]:
    """Let the event loop run everything else that is ready (the writers, other turns) once, and a
    cancellation through: what ``asyncio.sleep(0)`` does, without anyio's checkpoint bookkeeping,
    which cost a tenth of every streamed part."""
    yield


class MessageStream:
    """One agent message sent in parts: MESSAGE_START, MESSAGE_PART..., MESSAGE_END."""

    def __init__(
        self,
        emit: Emit,
        author: str,
        pace: Callable[[], Awaitable[None] | None] | None = None,
        most: int = DEFAULT_MAX_FRAME_BYTES - ENVELOPE_ROOM,
    ) -> None:
        self.message_id = new_id()
        self._emit = emit
        self._pace = pace
        self._author = author
        self._parts: list[str] = []
        self._started = False
        self._closed = False
        #: Bytes of the text as JSON so far, and the most it may reach (``TurnServices.max_message_bytes``).
        self._size, self._most = 0, most
        #: Cut at ``_most``: what is written after is dropped (the message says it was cut).
        self._full = False
        self._tokens: int | None = None
        self._stop_reason: str | None = None

    @property
    def tokens(self) -> int | None:
        """Tokens the model spent on this message; sent as MESSAGE_END ``tokens`` if set (a whole number)."""
        return self._tokens

    @tokens.setter
    def tokens(self, value: int | None) -> None:
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise TypeError(f"MessageStream.tokens is a whole number of tokens (or None), not {value!r:.40}")
        self._tokens = value

    @property
    def stop_reason(self) -> str | None:
        """Why the model stopped (``stop``, ``length``, ``tool_calls``...); MESSAGE_END ``stop_reason`` if set."""
        return self._stop_reason

    @stop_reason.setter
    def stop_reason(self, value: str | None) -> None:
        if value is not None and not isinstance(value, str):
            raise TypeError(f"MessageStream.stop_reason is text (or None), not {type(value).__name__}")
        self._stop_reason = value

    @property
    def text(self) -> str:
        """Everything written so far."""
        return "".join(self._parts)

    async def write(self, text: str) -> None:
        if self._put(text):
            behind = None if self._pace is None else self._pace()
            if behind is None:
                await _pass_turn()
            else:  # back-pressure: the transaction's members are far behind the stream
                await behind

    def _put(self, text: str) -> bool:
        if not isinstance(text, str):  # before anything is sent: members never see a number for text
            raise TypeError(f"an agent's message is text (str), not {type(text).__name__}: {text!r:.80}")
        if self._closed:  # (an agent author's find: the part went out after MESSAGE_END, and joined the text)
            raise RuntimeError(
                f"message {self.message_id} has ended (its `async with turn.stream()` block is over): write inside it"
            )
        if not text or self._full:
            return False
        size = _json_size(text)
        if self._size + size > self._most:  # (an agent author's find: a frame past the limit closed clients)
            text, size = self._cut(text)
        self._open()
        self._size += size
        self._parts.append(text)
        self._emit(EventType.MESSAGE_PART, {"message_id": self.message_id, "text": text})
        return True

    def _cut(self, text: str) -> tuple[str, int]:
        """What of ``text`` fits with ``CUT_NOTE`` in what is left of the message, and its size; the message
        is full from then on (logged once)."""
        self._full = True
        room = self._most - self._size - _json_size(CUT_NOTE)
        kept = fastjson.fitting_start(text, room + 2) + CUT_NOTE  # (+ 2: its quotes, not counted here)
        logger.warning(
            "agent %s: message %s cut at %d bytes of text (server.max_frame_bytes: a frame holds it whole)",
            self._author,
            self.message_id,
            self._most,
        )
        return kept, _json_size(kept)

    def _open(self) -> None:
        if not self._started:
            self._started = True
            self._emit(EventType.MESSAGE_START, {"message_id": self.message_id, "author": self._author})

    def close(self) -> None:
        if self._closed:
            return
        self._open()
        self._closed = True
        end: dict[str, Any] = {"message_id": self.message_id}
        if self._tokens is not None:
            end["tokens"] = self._tokens
        if self._stop_reason is not None:
            end["stop_reason"] = self._stop_reason
        self._emit(EventType.MESSAGE_END, end)


class Turn:
    """One user message for an agent to answer, and the means to answer it.

    ``text``, ``payload`` (the MESSAGE object), ``author`` (the user), ``history`` (the
    conversation so far, this message included), ``tools`` (what the agent may call), ``llm``
    (its provider); ``say``, ``stream``, ``call_tool`` and ``record`` act.
    """

    def __init__(
        self,
        *,
        agent: str,
        transaction_id: str,
        run_id: str,
        text: str,
        payload: dict[str, Any],
        author: str,
        services: TurnServices,
    ) -> None:
        self.agent = agent
        self.transaction_id = transaction_id
        self.run_id = run_id
        self.text = text
        self.payload = payload
        self.author = author
        self._services = services
        self._emit = services.emit

    @property
    def audio(self) -> AudioClip | None:
        """The clip of an ``on_audio`` turn (``None`` in other turns)."""
        clip = self.payload.get("audio")
        return clip if isinstance(clip, AudioClip) else None

    async def send_audio(self, data: bytes, mime: str, *, duration_ms: int | None = None) -> str:
        """Send audio to the transaction's members (``AUDIO_CHUNK`` on ``AUDIO_OUT``); returns its message id.

        Clients that advertise ``binary_frames`` on WebSocket get it as two frames, others as base64.
        """
        most = self._services.max_message_bytes * 3 // 4  # as base64, with room for the envelope: one frame
        if len(data) > most:  # (a reviewer's find: 1 MiB of audio went out as a 1.4 MB frame)
            raise ValueError(
                f"send_audio: {len(data)} bytes of audio is over the {most} one frame holds "
                "(server.max_frame_bytes): send it in pieces"
            )
        message_id = new_id()
        payload: dict[str, Any] = {
            "message_id": message_id,
            "mime": mime,
            "data": base64.b64encode(data).decode("ascii"),
            "author": self.agent,
        }
        if duration_ms is not None:
            payload["duration_ms"] = duration_ms
        self._emit(EventType.AUDIO_CHUNK, payload, channel=Channel.AUDIO_OUT)
        await _pass_turn()
        return message_id

    @property
    def history(self) -> tuple[HistoryEntry, ...]:
        """Every entry so far, in order: messages, and tool calls with their results (``HistoryEntry``)."""
        return tuple(self._services.history)

    def record(self, entry: HistoryEntry) -> None:
        """Add an entry to the history (say, a ``tool_result`` for a call your agent refused to make)."""
        self._services.record(entry)

    @property
    def llm(self) -> Provider:
        """The agent's LLM (``agents.<name>.llm``): ``stream(history, tools=..., instructions=...)``, ``complete``.

        Raises ``LlmError`` (``LLM_NOT_CONFIGURED``) if the agent's config names none.
        """
        if self._services.llm is None:
            raise LlmError(
                LlmErrorCode.LLM_NOT_CONFIGURED,
                f"agent {self.agent!r} needs an LLM: set agents.{self.agent}.llm to one of the [llm.*] providers",
            )
        return self._services.llm

    async def say(self, text: str) -> str:
        """Send one whole message; returns its message id. A message is at most ``max_message_bytes`` of
        text (as JSON); past it, it is cut, and ends saying so (``stream`` too)."""
        out = MessageStream(self._emit, self.agent, most=self._services.max_message_bytes)  # ``stream``'s, faster
        out._put(text)
        out.close()
        self.record(HistoryEntry("agent", self.agent, out.text, out.message_id))
        await _pass_turn()  # after the whole message: the writers send it at once
        return out.message_id

    @asynccontextmanager
    async def stream(self) -> AsyncIterator[MessageStream]:
        """Send a message in parts. Clients that cannot take parts get one MESSAGE at the end."""
        out = MessageStream(self._emit, self.agent, self._services.pace, self._services.max_message_bytes)
        try:
            yield out
        finally:
            out.close()
            self.record(HistoryEntry("agent", self.agent, out.text, out.message_id))

    @property
    def tools(self) -> list[ToolView]:
        """The MCP tools this agent may call right now, for this user.

        Each has ``name`` (``server.tool``), ``description``, ``input_schema`` (the MCP JSON schema of
        its arguments), ``server`` and ``schema()`` (the MCP tool object). Pass them to
        ``turn.llm.stream(..., tools=turn.tools)``.
        """
        services = self._services
        if services.tools is None:
            return []
        return services.tools.visible_tools(services.tool_servers, services.permissions)

    async def call_tool(self, name: str, arguments: dict[str, Any] | None = None) -> ToolCallResult:
        """Call an MCP tool; members see TOOL_CALL, TOOL_UPDATE... and TOOL_DONE.

        A tool error or a refused approval is a value (``result.status``); cancellation is anyio
        cancellation. The call and its result are added to ``history`` (roles ``tool_call`` and
        ``tool_result``), so an LLM given the history sees them.
        """
        services = self._services
        # No [mcp.servers]: the call is refused as a value (TOOL_NOT_FOUND), as the harness refuses it, not
        # raised (a newcomer's find: a plugin whose harness test passed failed every turn once deployed).
        tools = services.tools if services.tools is not None else ToolProxy({})
        call_id = new_id()
        args = arguments or {}
        try:
            size = fastjson.size(args)
        except TypeError as exc:  # (refused before anything is published: members never see half a call)
            raise TypeError(f"call_tool({name!r}): the arguments must be what JSON holds: {exc}") from None
        if size > self._services.max_message_bytes:  # (a tester's find: its TOOL_CALL went out past the frame limit)
            raise ValueError(
                f"call_tool({name!r}): {size} bytes of arguments are over what one frame holds (server.max_frame_bytes)"
            )
        self.record(HistoryEntry("tool_call", self.agent, "", call_id, call_id=call_id, tool=name, arguments=args))
        status, text = ToolOutcome.CANCELLED, "the call was cancelled"
        try:
            with tracing.tool_span(name, call_id):
                result = await tools.call(
                    name,
                    args,
                    transaction_id=self.transaction_id,
                    run_id=self.run_id,
                    allowed_servers=services.tool_servers,
                    caller=self.agent,
                    emit=self._emit,
                    permissions=services.permissions,
                    call_id=call_id,
                )
                if result.status == ToolOutcome.ERROR:
                    tracing.tool_failed(str((result.error or {}).get("code", "TOOL_ERROR")), result.model_text)
            status, text = result.status, result.model_text
            return result
        finally:
            self.record(HistoryEntry("tool_result", name, text, call_id, call_id=call_id, tool=name, status=status))
