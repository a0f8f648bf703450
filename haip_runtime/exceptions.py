"""The one exception tree of haip-runtime.

Anything that can reach the wire carries a protocol ``code`` (PROTOCOL.md section 14) and becomes
wire data in one place, ``haip_runtime.protocol.errors``. Foreign exceptions are translated where
they enter, always with ``raise ... from exc``. Every exception class of the package is here.

    HaipError
    ├── ConfigError                 a haip.toml that cannot be used (one line: file, key path, expected)
    ├── PluginError                 a plugin (agent, in-process MCP server) that cannot be found, loaded or configured
    ├── ProtocolError (code)        something a peer sent; becomes a wire ERROR
    │   ├── DecodeError             INVALID_MESSAGE / MESSAGE_TOO_LARGE / UNSUPPORTED_TYPE
    │   ├── HandshakeError          HANDSHAKE_REQUIRED / VERSION_INCOMPATIBLE / AUTHENTICATION_FAILED
    │   ├── RequestRefusedError     an HTTP request refused (REST history): an HTTP status beside the code
    │   ├── StorageError            STORAGE_ERROR: the store could not read (a damaged database)
    │   ├── ClusterError            STORAGE_UNAVAILABLE: Redis, the cluster's bus, cannot be reached or refused
    │   └── ... any code from ErrorCode, raised as ProtocolError(code, message)
    ├── KeyUnavailableError         no JWKS key for a token; the authenticator refuses it (AUTHENTICATION_FAILED)
    ├── ToolError                   an MCP tool could not be called (code TOOL_NOT_FOUND / INTERNAL_ERROR)
    │   ├── ToolUnavailableError    its server is not connected
    │   └── ToolTimeoutError        the server did not answer in time
    ├── TaskRefusedError            an MCP client's task request at /mcp refused (no such task, ended, too many)
    ├── FakeToolError               raised by a fake tool of the agent harness: the call ends TOOL_ERROR
    ├── LlmError (code)             an LLM provider failed (LlmErrorCode); becomes RUN_ERROR {code, message}
    ├── SpeechError (code)          a speech provider failed (SpeechErrorCode); an ERROR to the member who spoke
    └── ClientError                 raised by the Python client library (haip_runtime.client.haip_client)
"""

from __future__ import annotations

from typing import Any

from haip_runtime.protocol.events import ErrorCode, LlmErrorCode, SpeechErrorCode

__all__ = [
    "ClientError",
    "ClusterError",
    "ConfigError",
    "DecodeError",
    "FakeToolError",
    "HaipError",
    "HandshakeError",
    "KeyUnavailableError",
    "LlmError",
    "PluginError",
    "ProtocolError",
    "RequestRefusedError",
    "SpeechError",
    "StorageError",
    "TaskRefusedError",
    "ToolError",
    "ToolTimeoutError",
    "ToolUnavailableError",
]


class HaipError(Exception):
    """The root of every error haip-runtime raises on purpose."""


class ConfigError(HaipError):
    """The configuration cannot be used. ``str(error)`` is one line: file, key path, what was expected;
    ``problems`` has one such line for each thing wrong, when there are several."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]


class PluginError(HaipError):
    """A plugin (an agent class, an in-process MCP server) cannot be found, imported or configured.
    ``str(error)`` is one line naming the config key; ``problems`` has one such line for each thing
    wrong, when there are several (every agent's, every option's)."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]


class ProtocolError(HaipError):
    """Something a peer sent broke the protocol; becomes ``ERROR {code, message, related_id, detail}``."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        related_id: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.related_id = related_id
        self.detail = detail


class DecodeError(ProtocolError):
    """Bytes that are not a valid envelope. ``detail["where"]`` names the offending field; ``seq`` is the
    frame's own ``seq`` when it could be read (a refused envelope still takes its place in the client's
    numbering: no gap to ask for)."""

    seq: str | None = None


class HandshakeError(ProtocolError):
    """The connection's first exchange failed; the connection is closed with ``close_code``."""

    def __init__(self, code: ErrorCode, message: str, *, close_code: int, related_id: str | None = None) -> None:
        super().__init__(code, message, related_id=related_id)
        self.close_code = close_code


class RequestRefusedError(ProtocolError):
    """An HTTP request refused: answered with HTTP ``status`` and the error body of ``code`` and ``message``."""

    def __init__(self, code: ErrorCode, message: str, *, status: int) -> None:
        super().__init__(code, message)
        self.status = status


class StorageError(ProtocolError):
    """The store failed to read what was asked (a damaged page, an I/O error): ``STORAGE_ERROR``, HTTP 503."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.STORAGE_ERROR, message)


class ClusterError(ProtocolError):
    """Redis, the bus between the nodes of a cluster, could not be reached in time or refused a command.

    ``STORAGE_UNAVAILABLE``: what was asked (an append, a lease) did not happen and may be retried.
    """

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.STORAGE_UNAVAILABLE, message)


class KeyUnavailableError(HaipError):
    """No key for a token: the JWKS has no such ``kid``, or cannot be fetched (``auth.jwks``)."""


class ToolError(HaipError):
    """A tool call could not be carried out (as opposed to a tool that ran and reported an error)."""

    code: ErrorCode = ErrorCode.INTERNAL_ERROR


class ToolUnavailableError(ToolError):
    """The tool is unknown, or its MCP server is not connected right now."""

    code = ErrorCode.TOOL_NOT_FOUND


class ToolTimeoutError(ToolError):
    """The MCP server did not answer within the server's ``timeout_seconds``."""


class TaskRefusedError(HaipError):
    """An MCP client's request about an agent task refused: no such task (for this caller), it has
    already ended, or the user holds too many. The MCP door answers it as a JSON-RPC invalid-params error."""


class FakeToolError(HaipError):
    """Raise in a fake tool of ``haip_runtime.testing`` to return an error result (``is_error``) with this message.

    Not a ``ToolError``: the tool ran and reported a failure, as an MCP tool that fails does.
    """


class SpeechError(HaipError):
    """A speech provider could not hear or speak. ``message`` is readable by the user and never holds a key."""

    def __init__(self, code: SpeechErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class LlmError(HaipError):
    """An LLM provider could not answer. ``message`` is readable by the user and never holds a key."""

    def __init__(self, code: LlmErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ClientError(HaipError):
    """The Python client library got an ERROR, a closed connection or no answer in time."""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code
