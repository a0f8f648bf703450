"""The values the bridge hands out: server states and statuses, tools, progress, elicitations, results.

Plain frozen dataclasses with no MCP SDK types in them, so callers never see the SDK.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal


class ServerState(enum.Enum):
    CONNECTING = "connecting"
    """The first connection attempt is in progress."""
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    """The connection was lost, or an attempt failed: a new attempt is due or in progress."""
    FAILED = "failed"
    """The last attempt failed; another follows after a backoff."""
    STOPPED = "stopped"
    """The bridge is closed."""


@dataclass(frozen=True)
class ToolInfo:
    server: str
    name: str
    """The bare MCP tool name."""
    description: str
    input_schema: dict[str, Any]
    output_schema: dict[str, Any] | None
    annotations: dict[str, Any] | None
    """MCP tool annotations in wire form (`readOnlyHint`, ...)."""

    @property
    def full_name(self) -> str:
        return f"{self.server}.{self.name}"


@dataclass(frozen=True)
class ServerStatus:
    name: str
    state: ServerState
    tools: tuple[ToolInfo, ...]
    """The tools `allowed_tools` lets through, while CONNECTED; empty otherwise."""
    error: str | None
    """Why the last attempt failed or the connection was lost, in one line."""
    connects: int
    """How many times the server got connected."""


@dataclass(frozen=True)
class Progress:
    progress: float
    total: float | None
    message: str | None


@dataclass(frozen=True)
class ElicitationRequest:
    """An MCP server asking the user for input during a tool call (form mode)."""

    message: str
    schema: dict[str, Any]
    """The JSON schema of the expected answer (flat object of primitive fields)."""


@dataclass(frozen=True)
class ElicitationAnswer:
    action: Literal["accept", "decline", "cancel"]
    content: dict[str, Any] | None = None
    """With `accept`: values matching the request's schema."""


@dataclass(frozen=True)
class ToolResult:
    """What a tool that ran returned; `is_error` when the tool itself reported a failure."""

    is_error: bool
    content: list[dict[str, Any]]
    """MCP content blocks in wire form (`{"type": "text", "text": ...}`, ...)."""
    structured_content: dict[str, Any] | None


OnProgress = Callable[[Progress], Awaitable[None]]
OnElicit = Callable[[ElicitationRequest], Awaitable[ElicitationAnswer]]
