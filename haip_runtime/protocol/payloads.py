"""Payload models for every HAIP event type (PROTOCOL.md sections 3 to 13).

Inbound payloads are validated with these models (unknown keys are ignored, as the protocol
says); outbound payloads are built with them so that what we send is what we document.
``INBOUND`` maps each type a client may send to its model. Each model builds its validator on
first use (``defer_build``): a runtime uses a handful of these types, and building all of them
cost about 20 ms of every start-up.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from haip_runtime.protocol.events import HAIP_VERSION, RunOutcome, ToolOutcome


class Payload(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True, defer_build=True)

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True, by_alias=True)


# --- handshake, liveness, flow --------------------------------------------------------------


class FlowCredit(Payload):
    initial_credit_messages: int | None = Field(default=None, ge=0)
    initial_credit_bytes: int | None = Field(default=None, ge=0)


class Capabilities(Payload):
    binary_frames: bool = False
    flow_control: FlowCredit | None = None
    max_concurrent_runs: int | None = None
    signed_envelopes: bool = False


class HaiAuth(Payload):
    token: str | None = None


class Hai(Payload):
    haip_version: str = HAIP_VERSION
    accept_major: list[StrictInt] = Field(default_factory=lambda: [1])  # (not true, nor 1.0)
    accept_events: list[str] | None = None
    capabilities: Capabilities | None = None
    auth: HaiAuth | None = None
    last_rx_seq: str | None = None


class Ping(Payload):
    nonce: str | None = None


class Info(Payload):
    event: str


class Error(Payload):
    code: str
    message: str
    related_id: str | None = None
    detail: dict[str, Any] | None = None


class FlowUpdate(Payload):
    channel: str
    add_messages: int = Field(default=0, ge=0)
    add_bytes: int = Field(default=0, ge=0)


class ChannelControl(Payload):
    channel: str


class ReplayRequest(Payload):
    from_seq: str
    to_seq: str | None = None

    @field_validator("from_seq", "to_seq", mode="before")
    @classmethod
    def _numbers_as_strings(cls, value: object) -> object:
        # Decimal strings on the wire, as an envelope's seq; JSON integers from lenient clients too.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


# --- transactions -----------------------------------------------------------------------------


class TransactionStart(Payload):
    """Client → runtime. ``agent`` is accepted as an alias of ``toolName``."""

    toolName: str | None = None
    agent: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    thread_id: str | None = None

    @property
    def agent_name(self) -> str | None:
        return self.toolName or self.agent


class TransactionStarted(Payload):
    """Runtime → client."""

    referenceId: str | None
    agent: str
    thread_id: str | None = None


class TransactionJoin(Payload):
    since: str | None = None
    #: An agent to add (multi-agent); not empty (a prober's find: ``""`` read as a plain join).
    agent: str | None = Field(default=None, min_length=1)

    @field_validator("since", mode="before")
    @classmethod
    def _number_as_string(cls, value: object) -> object:
        # A decimal string, as every seq; a JSON integer taken too, as REPLAY_REQUEST takes one.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class TransactionJoined(Payload):
    members: list[str]
    agents: list[str]


class TransactionEnd(Payload):
    reason: str | None = None


# --- messages ---------------------------------------------------------------------------------


class Message(Payload):
    """The object form of MESSAGE; the bare-string form reads as ``{"text": ...}``."""

    text: str
    author: str | None = None
    message_id: str | None = None


class MessageUpdate(Payload):
    message_id: str
    text: str


class MessageStart(Payload):
    message_id: str
    author: str


class MessagePart(Payload):
    message_id: str
    text: str


class MessageEnd(Payload):
    message_id: str
    tokens: int | None = None
    stop_reason: str | None = None


class Audio(Payload):
    message_id: str | None = None
    mime: str
    data: str | None = None
    duration_ms: int | None = None
    seq_in_message: int | None = Field(default=None, ge=0)
    final: bool = False
    """The last chunk of its ``message_id``: the member has finished speaking (a spoken answer has ended)."""


# --- runs -------------------------------------------------------------------------------------


class RunStarted(Payload):
    run_id: str
    agent: str
    thread_id: str | None = None
    message_id: str | None = None
    """The user message the turn answers (it may have waited in the transaction's queue)."""


class RunFinished(Payload):
    run_id: str
    status: RunOutcome
    summary: str | None = None


class RunError(Payload):
    run_id: str
    code: str
    message: str


class RunCancel(Payload):
    run_id: str


# --- tools ------------------------------------------------------------------------------------


class ToolEntry(Payload):
    name: str
    description: str = ""
    server: str | None = None
    annotations: dict[str, Any] | None = None


class ToolList(Payload):
    tools: list[ToolEntry] = Field(default_factory=list)


class ToolSchemaRequest(Payload):
    tool: str


class ToolSchema(Payload):
    tool: str
    schema_: dict[str, Any] = Field(alias="schema")


class ToolCall(Payload):
    call_id: str | None = None
    tool: str
    server: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)


class ToolUpdate(Payload):
    """Runtime → client: progress. Client → runtime: ``decision`` or ``input`` for a waiting call."""

    call_id: str
    status: str | None = None
    progress: float | None = None
    total: float | None = None
    message: str | None = None
    partial: Any = None
    request: dict[str, Any] | None = None
    decision: Literal["approve", "reject", "decline"] | None = None
    reason: str | None = None
    input: dict[str, Any] | None = None


class ToolDone(Payload):
    call_id: str
    status: ToolOutcome
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


class ToolCancel(Payload):
    call_id: str
    reason: str | None = None


class Empty(Payload):
    @model_validator(mode="before")
    @classmethod
    def _anything(cls, value: object) -> object:
        return value if isinstance(value, dict) else {}


#: The model each client-sent type is validated with.
INBOUND: dict[str, type[Payload]] = {
    "HAI": Hai,
    "PING": Ping,
    "PONG": Ping,
    "INFO": Empty,
    "ERROR": Empty,
    "FLOW_UPDATE": FlowUpdate,
    "PAUSE_CHANNEL": ChannelControl,
    "RESUME_CHANNEL": ChannelControl,
    "REPLAY_REQUEST": ReplayRequest,
    "TRANSACTION_START": TransactionStart,
    "TRANSACTION_JOIN": TransactionJoin,
    "TRANSACTION_END": TransactionEnd,
    "MESSAGE": Message,
    "MESSAGE_UPDATE": MessageUpdate,
    "AUDIO": Audio,
    "AUDIO_CHUNK": Audio,
    "RUN_CANCEL": RunCancel,
    "TOOL_LIST": Empty,
    "TOOL_SCHEMA": ToolSchemaRequest,
    "TOOL_CALL": ToolCall,
    "TOOL_UPDATE": ToolUpdate,
    "TOOL_CANCEL": ToolCancel,
}
