"""The values the bridge hands out: server statuses, tools, progress, elicitations, results.

Plain frozen dataclasses with no MCP SDK types in them, so callers never see the SDK. A server's
state (``ServerState``) is a name of the wire, so it lives in ``protocol.events``; it is re-exported here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from haip_runtime.protocol.events import ServerState as ServerState  # re-exported: statuses carry it


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
    task_support: TaskSupport = "forbidden"
    """Whether the server runs the tool as an MCP task (2025-11-25 `execution.taskSupport`)."""

    @property
    def full_name(self) -> str:
        return f"{self.server}.{self.name}"


TaskSupport = Literal["forbidden", "optional", "required"]


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
class TaskState:
    """Where an MCP task stands, as its server last said (`tasks/get`, `tasks/cancel`)."""

    task_id: str
    status: str
    """`working`, `input_required`, `completed`, `failed` or `cancelled`."""
    message: str | None
    local: bool = False
    """The bridge's own word on the task, not the server's: it waits for the lost connection to come
    back, or its cancel could not reach the server (`status` is then the last one the server said)."""
    cancel: bool = False
    """The outcome of the bridge's `tasks/cancel` (the call was cancelled: by a member, its run, its timeout)."""

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_TASK_STATES


TERMINAL_TASK_STATES = frozenset({"completed", "failed", "cancelled"})


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
OnTask = Callable[[TaskState], Awaitable[None]]
"""Told each new state of the MCP task a call runs as."""
OnElicit = Callable[[ElicitationRequest], Awaitable[ElicitationAnswer]]
