"""Names of the wire: event types, channels, error codes, close codes, and how calls and turns end (PROTOCOL.md).

Every value here is a string (or a number) exactly as it travels; the ``StrEnum`` members compare
equal to those strings, so code compares and builds with members and the wire stays the same.
"""

from __future__ import annotations

import enum

HAIP_VERSION = "1.1.2"
ACCEPT_MAJOR = (1,)


class EventType(enum.StrEnum):
    # transaction era (spoken by the reference SDK and CLI)
    HAI = "HAI"
    PING = "PING"
    PONG = "PONG"
    ERROR = "ERROR"
    INFO = "INFO"
    FLOW_UPDATE = "FLOW_UPDATE"
    REPLAY_REQUEST = "REPLAY_REQUEST"
    TRANSACTION_START = "TRANSACTION_START"
    TRANSACTION_END = "TRANSACTION_END"
    TRANSACTION_JOIN = "TRANSACTION_JOIN"
    MESSAGE = "MESSAGE"
    MESSAGE_UPDATE = "MESSAGE_UPDATE"
    AUDIO = "AUDIO"
    TOOL_LIST = "TOOL_LIST"
    TOOL_SCHEMA = "TOOL_SCHEMA"
    # 1.1.2 vocabulary (sent only to clients that list them in accept_events)
    RUN_STARTED = "RUN_STARTED"
    RUN_FINISHED = "RUN_FINISHED"
    RUN_ERROR = "RUN_ERROR"
    RUN_CANCEL = "RUN_CANCEL"
    MESSAGE_START = "MESSAGE_START"
    MESSAGE_PART = "MESSAGE_PART"
    MESSAGE_END = "MESSAGE_END"
    AUDIO_CHUNK = "AUDIO_CHUNK"
    TOOL_CALL = "TOOL_CALL"
    TOOL_UPDATE = "TOOL_UPDATE"
    TOOL_DONE = "TOOL_DONE"
    TOOL_CANCEL = "TOOL_CANCEL"
    PAUSE_CHANNEL = "PAUSE_CHANNEL"
    RESUME_CHANNEL = "RESUME_CHANNEL"


class Channel(enum.StrEnum):
    USER = "USER"
    AGENT = "AGENT"
    SYSTEM = "SYSTEM"
    AUDIO_IN = "AUDIO_IN"
    AUDIO_OUT = "AUDIO_OUT"


class ErrorCode(enum.StrEnum):
    HANDSHAKE_REQUIRED = "HANDSHAKE_REQUIRED"
    AUTHENTICATION_FAILED = "AUTHENTICATION_FAILED"
    UNAUTHORIZED = "UNAUTHORIZED"
    VERSION_INCOMPATIBLE = "VERSION_INCOMPATIBLE"
    INVALID_MESSAGE = "INVALID_MESSAGE"
    UNSUPPORTED_TYPE = "UNSUPPORTED_TYPE"
    INVALID_PAYLOAD = "INVALID_PAYLOAD"
    TRANSACTION_NOT_FOUND = "TRANSACTION_NOT_FOUND"
    AGENT_NOT_FOUND = "AGENT_NOT_FOUND"
    TOOL_NOT_FOUND = "TOOL_NOT_FOUND"
    RUN_LIMIT_EXCEEDED = "RUN_LIMIT_EXCEEDED"
    FLOW_CONTROL_VIOLATION = "FLOW_CONTROL_VIOLATION"
    SEQ_VIOLATION = "SEQ_VIOLATION"
    REPLAY_TOO_OLD = "REPLAY_TOO_OLD"
    RESUME_FAILED = "RESUME_FAILED"
    BINARY_FRAME_ERROR = "BINARY_FRAME_ERROR"
    MESSAGE_TOO_LARGE = "MESSAGE_TOO_LARGE"
    RATE_LIMITED = "RATE_LIMITED"
    INTERNAL_ERROR = "INTERNAL_ERROR"
    STORAGE_UNAVAILABLE = "STORAGE_UNAVAILABLE"
    STORAGE_ERROR = "STORAGE_ERROR"
    NODE_LOST = "NODE_LOST"


class SpeechErrorCode(enum.StrEnum):
    """Codes of ``ERROR`` to a member whose audio could not be transcribed, or of ``INFO speech.failed``."""

    SPEECH_UNAVAILABLE = "SPEECH_UNAVAILABLE"
    """The engine is not installed (the `speech` extra, or Debian's espeak-ng), or its model is missing."""
    SPEECH_NOT_UNDERSTOOD = "SPEECH_NOT_UNDERSTOOD"
    """The audio could not be decoded, or held no words."""
    SPEECH_FAILED = "SPEECH_FAILED"
    """The speech service refused or failed (HTTP error, timeout, unreachable)."""


class LlmErrorCode(enum.StrEnum):
    """Codes of ``RUN_ERROR`` when an agent's LLM provider fails (the message says what to fix)."""

    LLM_NOT_CONFIGURED = "LLM_NOT_CONFIGURED"
    """The agent needs an LLM and its config names none (`agents.<name>.llm`)."""
    LLM_AUTH_FAILED = "LLM_AUTH_FAILED"
    """The provider refused the API key (HTTP 401/403)."""
    LLM_MODEL_NOT_FOUND = "LLM_MODEL_NOT_FOUND"
    """The model (or the endpoint) does not exist at that provider (HTTP 404), or the local file is missing."""
    LLM_UNREACHABLE = "LLM_UNREACHABLE"
    """The endpoint could not be connected to, after retries."""
    LLM_TIMEOUT = "LLM_TIMEOUT"
    """The provider did not answer within `timeout_seconds`, after retries."""
    LLM_RATE_LIMITED = "LLM_RATE_LIMITED"
    """HTTP 429 persisted through every retry."""
    LLM_UNAVAILABLE = "LLM_UNAVAILABLE"
    """HTTP 5xx persisted through every retry, or the local model cannot be loaded."""
    LLM_CONTEXT_TOO_LONG = "LLM_CONTEXT_TOO_LONG"
    """The conversation does not fit the model's context window."""
    LLM_BAD_REQUEST = "LLM_BAD_REQUEST"
    """The provider rejected the request for another reason (HTTP 400/422); the message is the provider's."""
    LLM_STREAM_BROKEN = "LLM_STREAM_BROKEN"
    """The streamed answer stopped before its end, or could not be parsed."""


class CloseCode(enum.IntEnum):
    NORMAL = 1000
    PROTOCOL = 1002  # version incompatible
    POLICY = 1008  # authentication / handshake
    TOO_LARGE = 1009
    INTERNAL = 1011
    SERVICE_RESTART = 1012  # the server is stopping: resume (on it again, or another node)
    TRY_AGAIN_LATER = 1013


class ToolStatus(enum.StrEnum):
    """``TOOL_UPDATE.status``: where a tool call is while it runs (how it ended is a ``ToolOutcome``)."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    CANCELLING = "CANCELLING"
    AWAITING_APPROVAL = "AWAITING_APPROVAL"
    INPUT_REQUIRED = "INPUT_REQUIRED"


class ToolOutcome(enum.StrEnum):
    """``TOOL_DONE.status``: how a tool call ended (``error.code``, a ``ToolErrorCode``, says why if not OK)."""

    OK = "OK"
    """The tool ran; ``result`` holds what it returned."""
    ERROR = "ERROR"
    """The tool reported an error, or the call could not be carried out."""
    CANCELLED = "CANCELLED"
    """The call was cancelled, or refused at approval."""


class ToolErrorCode(enum.StrEnum):
    """``TOOL_DONE.error.code``: why a call did not end ``OK`` (PROTOCOL.md section 14)."""

    TOOL_ERROR = "TOOL_ERROR"
    """The tool ran and reported an error; the message is the tool's (status ERROR)."""
    TOOL_NOT_FOUND = "TOOL_NOT_FOUND"
    """The conversation has no such tool: not one of its servers, or the server lacks it (status ERROR)."""
    SERVER_UNAVAILABLE = "SERVER_UNAVAILABLE"
    """The tool's MCP server is not connected right now, or the servers are still starting (status ERROR)."""
    UNAUTHORIZED = "UNAUTHORIZED"
    """The caller's roles do not allow the tool (status ERROR)."""
    TIMEOUT = "TIMEOUT"
    """The server did not answer within its ``timeout_seconds``; the call was cancelled there (status ERROR)."""
    TOOL_FAILED = "TOOL_FAILED"
    """The call broke: the server refused it, disconnected during it or answered wrongly (status ERROR)."""
    REJECTED = "REJECTED"
    """A member rejected the call at approval (status CANCELLED)."""
    APPROVAL_TIMEOUT = "APPROVAL_TIMEOUT"
    """Nobody approved the call within ``approval_timeout_seconds`` (status CANCELLED)."""
    CANCELLED = "CANCELLED"
    """``TOOL_CANCEL``, ``RUN_CANCEL`` or the end of the transaction stopped the call (status CANCELLED)."""


class RunOutcome(enum.StrEnum):
    """``RUN_FINISHED.status``: how an agent's turn ended."""

    OK = "OK"
    """The agent finished its turn."""
    CANCELLED = "CANCELLED"
    """``RUN_CANCEL`` (or the end of the transaction) stopped the turn and its tool calls."""
    ERROR = "ERROR"
    """The agent failed. The runtime says so with ``RUN_ERROR {run_id, code, message}`` instead."""


class ServerState(enum.StrEnum):
    """An MCP server's connection (``INFO mcp.server {state}``, ``/health`` ``mcp.<server>.state``)."""

    STARTING = "starting"
    """The runtime has not begun connecting it yet (it loads the MCP SDK first): ``/health`` only."""
    CONNECTING = "connecting"
    """The first connection attempt is in progress."""
    CONNECTED = "connected"
    """Connected: its tools are offered."""
    RECONNECTING = "reconnecting"
    """The connection was lost, or an attempt failed: a new attempt is due or in progress."""
    FAILED = "failed"
    """The last attempt failed; another follows after a backoff."""
    STOPPED = "stopped"
    """The bridge is closed."""


#: Everything the runtime understands, advertised in its HAI.
ALL_EVENTS: tuple[str, ...] = tuple(e.value for e in EventType)

#: What a client that sends no ``accept_events`` is assumed to accept: the transaction era.
TRANSACTION_ERA_EVENTS: frozenset[str] = frozenset(
    {
        "HAI",
        "PING",
        "PONG",
        "ERROR",
        "INFO",
        "FLOW_UPDATE",
        "REPLAY_REQUEST",
        "TRANSACTION_START",
        "TRANSACTION_END",
        "TRANSACTION_JOIN",
        "MESSAGE",
        "MESSAGE_UPDATE",
        "AUDIO",
        "TOOL_LIST",
        "TOOL_SCHEMA",
    }
)
